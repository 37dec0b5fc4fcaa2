"""The lookup server (issue 7): the online store over the network.

Two ports, one process, one event loop (uvloop):

* **msgpack over TCP** (default 127.0.0.1:8255), for services. Every message
  is a frame: 4 bytes of payload length (unsigned big-endian), then one
  msgpack map. Requests of a connection are answered in the order they
  arrive, each reply echoing the request's ``id``, so a client may pipeline
  any number of them (``tally.service.lookup.client``). Ops::

    {"id": 1, "op": "get", "view": "user_reading", "keys": [42, 7],
     "features": ["total_readtime"]}           # features: optional subset
      -> {"id": 1, "ok": true, "records": [{"total_readtime": 12.5,
          "_event_time": ..., "_write_time": ..., "_valid_until": ...,
          "_view_version": 1}, null]}          # null: the entity has no record
    {"id": 2, "op": "ping"}               -> {"id": 2, "ok": true}
    {"id": 3, "op": "views"}              -> {"id": 3, "ok": true, "views":
          {"user_reading": {"key_type": "int64", "version": 1,
                            "features": {"total_readtime": "float64", ...}}}}
    {"id": 4, "op": "auth", "token": "s3cret"} -> {"id": 4, "ok": true}

  ``id`` is optional (it is echoed as null). Keys must match the view's key
  type exactly: msgpack integers (within int64) for an int64 view, strings
  for a string view. A refused request gets an error frame and the
  connection goes on::

    {"id": 1 | null, "ok": false, "error": {"code": "...", "message": "..."}}

  ``id`` is null when the request's id could not be read. Codes:
  ``bad_frame`` (not msgpack, trailing bytes, non-string map keys),
  ``not_a_map``, ``bad_request`` (a missing field or one of the wrong type),
  ``unknown_op``, ``unauthorized``, ``unknown_view``, ``unknown_feature``,
  ``bad_key``, ``batch_too_big`` (more keys than ``max_batch``),
  ``frame_too_big``, ``store_error`` (the store could not answer, e.g. a
  record written under a newer schema), ``internal`` (a bug; logged).

  Frames longer than ``max_frame_bytes`` are read and discarded, then
  answered with ``frame_too_big`` (id null) on the same connection. A length
  above ``max(64 MiB, 4 * max_frame_bytes)`` is taken for garbage -- most
  often an HTTP client on the msgpack port ("GET " reads as 1.2 GB) -- and is
  answered with ``frame_too_big`` and the connection closed, since nothing
  after it can be trusted to be in step.

* **HTTP/1.1 + JSON** (default 127.0.0.1:8256), for humans and tools:
  ``GET /v1/features/{view}/{key}[?features=a,b]``,
  ``POST /v1/features/{view}`` with ``{"keys": [...], "features": [...]}``,
  ``GET /v1/views``, ``GET /health`` and ``GET /metrics`` (Prometheus text
  format). Keep-alive; ``Content-Length`` bodies only (no chunked uploads).
  Errors are ``{"ok": false, "error": {"code", "message"}}`` with a matching
  status (400, 401, 404, 405, 413, 500). Non-finite floats are written as
  ``NaN``/``Infinity``, as Python's json does.

**Token.** With ``token`` set (``--token`` or ``$TALLY_TOKEN``) both ports
need it. TCP: send ``{"op": "auth", "token": ...}`` first, or put a
``"token"`` field in any request; the first request with the right token
authenticates the connection for its lifetime, a wrong one is answered
``unauthorized`` (the connection stays open, unauthenticated). HTTP:
``Authorization: Bearer <token>``, else 401. ``ping`` and ``/health`` stay
open, so that liveness probes need no secret; they reveal nothing.

**Reads** go through libtally (``EmbeddedReader``): read-only, never
blocking the writer, which is another process (the pipeline). They run
inline on the event loop: a single-key lookup costs a few microseconds and
100 keys a few hundred (see bench/RESULTS.md), less than handing the work to
a thread and back. A server living inside the writer's own process must read
through that ``LmdbStore`` instead (LMDB allows one open per process): pass
the store object rather than a path.

The view catalog (names and served schemas, for ``views`` and the key and
feature checks) is reloaded every ``catalog_refresh`` seconds (1) and when a
request names a view the catalog lacks but the store has. libtally cannot
list views, so with a path a helper child process holding the store open
read-only lists them. libtally also binds an open view to the version served
when it was opened: when a reload shows a promoted version, the reader is
reopened, so a promotion is served within ``catalog_refresh`` seconds.
"""
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from bisect import bisect_left
from urllib.parse import parse_qs, unquote, urlsplit

import msgpack

from tally.service.store.lmdb import LmdbStore, StoreError
from tally.service.lookup.client import DEFAULT_HOST, DEFAULT_PORT, FRAME_HEADER_BYTES
from tally.core.record import INT64_MAX, INT64_MIN, RecordError, ViewSchema

DEFAULT_HTTP_PORT = 8256
DEFAULT_MAX_FRAME_BYTES = 1 << 20
DEFAULT_MAX_BATCH = 1000
GARBAGE_FRAME_BYTES = 64 << 20
MAX_HTTP_HEAD_BYTES = 64 << 10
DEFAULT_CATALOG_REFRESH_SECONDS = 1.0
OPS = ("get", "ping", "views", "auth")
OPEN_OPS = ("ping",)                     # answered without a token
HTTP_STATUS = {"bad_frame": 400, "not_a_map": 400, "bad_request": 400, "unknown_op": 400,
               "unauthorized": 401, "unknown_view": 404, "unknown_feature": 400,
               "bad_key": 400, "batch_too_big": 413, "frame_too_big": 413,
               "store_error": 500, "internal": 500, "not_found": 404,
               "method_not_allowed": 405, "headers_too_big": 431,
               "not_implemented": 501}
HTTP_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                405: "Method Not Allowed", 413: "Content Too Large",
                431: "Request Header Fields Too Large", 500: "Internal Server Error",
                501: "Not Implemented"}
RECORD_META = ("_event_time", "_write_time", "_valid_until", "_view_version")

log = logging.getLogger("tally.server")


class RequestError(Exception):
    """A refused request: becomes an error frame, or an HTTP error."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


# ---- metrics -------------------------------------------------------------------

class Metrics:
    """Counters and latency histograms, rendered in Prometheus' text format.
    Labels come from fixed sets (transports, ops, error codes), never from
    client input, so their number stays bounded."""

    BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
               50e-3, 100e-3, 250e-3, 1.0)

    def __init__(self):
        self.requests = {}        # (transport, op, status) -> count
        self.latency = {}         # (transport, op) -> [bucket counts..., +Inf, sum]
        self.keys = {}            # transport -> keys looked up
        self.connections = {"tcp": 0, "http": 0}

    def observe(self, transport, op, status, seconds, n_keys=0):
        label = (transport, op, status)
        self.requests[label] = self.requests.get(label, 0) + 1
        histogram = self.latency.get((transport, op))
        if histogram is None:
            histogram = self.latency[(transport, op)] = [0] * (len(self.BUCKETS) + 2)
        histogram[bisect_left(self.BUCKETS, seconds)] += 1
        histogram[-1] += seconds
        if n_keys:
            self.keys[transport] = self.keys.get(transport, 0) + n_keys

    def render(self):
        lines = ["# HELP tally_lookup_requests_total Requests answered, by status "
                 "(ok or an error code).",
                 "# TYPE tally_lookup_requests_total counter"]
        for (transport, op, status), count in sorted(self.requests.items()):
            lines.append(f'tally_lookup_requests_total{{transport="{transport}",op="{op}",'
                         f'status="{status}"}} {count}')
        lines += ["# HELP tally_lookup_errors_total Refused requests, by error code.",
                  "# TYPE tally_lookup_errors_total counter"]
        for (transport, code), count in sorted(self._errors().items()):
            lines.append(f'tally_lookup_errors_total{{transport="{transport}",code="{code}"}} '
                         f'{count}')
        lines += self._render_latency()
        lines += ["# HELP tally_lookup_keys_total Entity keys looked up.",
                  "# TYPE tally_lookup_keys_total counter"]
        lines += [f'tally_lookup_keys_total{{transport="{t}"}} {n}'
                  for t, n in sorted(self.keys.items())]
        lines += ["# HELP tally_lookup_connections Open client connections.",
                  "# TYPE tally_lookup_connections gauge"]
        lines += [f'tally_lookup_connections{{transport="{t}"}} {n}'
                  for t, n in sorted(self.connections.items())]
        return "\n".join(lines) + "\n"

    def _errors(self):
        errors = {}
        for (transport, _, status), count in self.requests.items():
            if status != "ok":
                errors[(transport, status)] = errors.get((transport, status), 0) + count
        return errors

    def _render_latency(self):
        name = "tally_lookup_request_duration_seconds"
        lines = [f"# HELP {name} Time from a request read to its answer written.",
                 f"# TYPE {name} histogram"]
        for (transport, op), histogram in sorted(self.latency.items()):
            labels = f'transport="{transport}",op="{op}"'
            cumulative = 0
            for bound, count in zip(self.BUCKETS + ("+Inf",), histogram[:-1]):
                cumulative += count
                lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
            lines.append(f"{name}_sum{{{labels}}} {histogram[-1]:.9f}")
            lines.append(f"{name}_count{{{labels}}} {cumulative}")
        return lines


# ---- stores --------------------------------------------------------------------

# The schema helper: a child process that holds the store open read-only and,
# for each line on stdin, prints the served schemas as one JSON line.
_SCHEMA_HELPER = """
import json, sys
from tally.service.store.lmdb import LmdbStore
with LmdbStore(sys.argv[1], readonly=True) as store:
    for _ in sys.stdin:
        print(json.dumps({view: store.schema(view).to_bytes().hex()
                          for view in store.views()}), flush=True)
"""


class SchemaHelper:
    """Lists the store's views and their served schemas from a child process:
    libtally cannot list views, and LMDB allows one open of an environment
    per process. The child starts once (~0.2 s); each listing then costs a
    pipe round trip and one read transaction."""

    def __init__(self, path):
        self.path = path
        self.child = None

    async def schemas(self):
        if self.child is None or self.child.returncode is not None:
            self.child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _SCHEMA_HELPER, self.path, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.child.stdin.write(b"list\n")
        await self.child.stdin.drain()
        line = await self.child.stdout.readline()
        if not line:                        # it died; the next call starts another
            error = (await self.child.stderr.read()).decode(errors="replace").strip()
            raise StoreError(f"could not list the views of {self.path!r}: {error[-500:]}")
        return {view: ViewSchema.from_bytes(view, bytes.fromhex(raw))
                for view, raw in json.loads(line).items()}

    async def close(self):
        if self.child is not None and self.child.returncode is None:
            self.child.stdin.close()        # the helper ends at end of input
            try:
                await asyncio.wait_for(self.child.wait(), timeout=5)
            except asyncio.TimeoutError:
                self.child.kill()
                await self.child.wait()


class EmbeddedStore:
    """Reads through libtally; the writer is another process."""

    def __init__(self, path):
        self.path = str(path)
        self.reader = self._open_reader()
        self.helper = SchemaHelper(self.path)
        self.versions = {}                  # view -> version served at the last listing

    def _open_reader(self):
        from tally.service.store.embedded import EmbeddedReader
        return EmbeddedReader(self.path)

    def get_many(self, view, keys):
        if len(keys) == 1:                  # skips get_many's array set-up
            return [self.reader.get(view, keys[0])]
        return self.reader.get_many(view, keys)

    def has_view(self, view):
        """Cheap (libtally opens the view, or finds none), unlike listing."""
        try:
            self.reader.schema_names(view)
        except StoreError:
            return False
        return True

    async def load_schemas(self):
        """{view: ViewSchema of its served version}. libtally binds an open
        view to the version served when it was opened, so when a version is
        promoted the reader is reopened (between two requests: all of them
        run on the event loop's thread)."""
        schemas = await self.helper.schemas()
        served = {view: schema.version for view, schema in schemas.items()}
        if any(self.versions.get(view, version) != version for view, version in served.items()):
            log.info("a view version was promoted; reopening the store")
            self.reader.close()
            self.reader = self._open_reader()
        self.versions = served
        return schemas

    async def close(self):
        await self.helper.close()
        self.reader.close()


class SharedLmdbStore:
    """Reads through the writer's own LmdbStore, for a server in its process
    (it follows promotions by itself)."""

    def __init__(self, store):
        self.path = store.path
        self.store = store

    def get_many(self, view, keys):
        return self.store.get_many(view, keys)

    def has_view(self, view):
        try:
            self.store.schema(view)
        except StoreError:
            return False
        return True

    async def load_schemas(self):
        return {view: self.store.schema(view) for view in self.store.views()}

    async def close(self):
        pass                                # the writer owns the store


class ViewCatalog:
    """The store's served view schemas, for key and feature checks and the
    ``views`` op. The server reloads it every ``refresh_seconds`` (a promoted
    version is followed within that time), and at once when a request names
    a view that the store has but the catalog lacks (one created since)."""

    def __init__(self, store):
        self.store = store
        self.schemas = {}
        self._loading = None

    async def reload(self):
        if self._loading is None:           # one load at a time, shared
            self._loading = asyncio.ensure_future(self._load())
        try:
            await asyncio.shield(self._loading)
        finally:
            if self._loading is not None and self._loading.done():
                self._loading = None

    async def _load(self):
        self.schemas = await self.store.load_schemas()

    async def schema(self, view):
        schema = self.schemas.get(view)
        if schema is None and self.store.has_view(view):
            try:
                await self.reload()
            except StoreError as error:
                raise RequestError("store_error", str(error)) from error
            schema = self.schemas.get(view)
        if schema is None:
            raise RequestError("unknown_view", f"unknown view {view!r}; known views: "
                               f"{sorted(self.schemas)}")
        return schema

    async def refresh_every(self, seconds):
        """Reload forever, every ``seconds``; failures are logged, not fatal."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.reload()
            except Exception as error:
                log.warning("could not reload the view catalog: %s", error)


def open_store(store):
    """A path -> EmbeddedStore; an open LmdbStore (the writer's) -> SharedLmdbStore."""
    if isinstance(store, LmdbStore):
        return SharedLmdbStore(store)
    return EmbeddedStore(store)


# ---- the lookups themselves, shared by both transports --------------------------

class Session:
    """What a TCP connection remembers: whether it has shown the token."""
    __slots__ = ("authenticated",)

    def __init__(self, authenticated=False):
        self.authenticated = authenticated


class LookupService:
    def __init__(self, store, token=None, max_batch=DEFAULT_MAX_BATCH):
        self.store = store
        self.catalog = ViewCatalog(store)
        self.token = None if token is None else token.encode()
        self.max_batch = max_batch
        self._ops = {"get": self._op_get, "ping": self._op_ping, "views": self._op_views,
                     "auth": self._op_ping}

    def token_ok(self, token):
        """Compared in constant time, so response timing does not leak it."""
        return self.token is None or (token is not None and
                                      hmac.compare_digest(token.encode(), self.token))

    async def handle(self, request, session):
        """One decoded request map -> the reply's fields (besides id and ok)."""
        op = request.get("op")
        if not isinstance(op, str):
            raise RequestError("bad_request", "a request needs an 'op' string")
        handler = self._ops.get(op)
        if handler is None:
            raise RequestError("unknown_op", f"unknown op {op!r}; ops: {', '.join(OPS)}")
        self._authorize(op, request, session)
        return await handler(request)

    def _authorize(self, op, request, session):
        if self.token is None or op in OPEN_OPS:
            return
        token = request.get("token")
        if token is not None:
            if not isinstance(token, str):
                raise RequestError("bad_request", "'token' must be a string")
            if not self.token_ok(token):
                raise RequestError("unauthorized", "wrong token")
            session.authenticated = True
        elif not session.authenticated:
            raise RequestError("unauthorized", 'this server needs a token: send '
                               '{"op": "auth", "token": ...} first, or a "token" field')

    async def _op_ping(self, request):
        return {}

    async def _op_views(self, request):
        return {"views": describe_all(self.catalog.schemas)}

    async def _op_get(self, request):
        view = request.get("view")
        if not isinstance(view, str):
            raise RequestError("bad_request", "'get' needs a 'view' string")
        keys = request.get("keys")
        if not isinstance(keys, list):
            raise RequestError("bad_request", "'get' needs a 'keys' array")
        return {"records": await self.lookup(view, keys, request.get("features"))}

    async def lookup(self, view, keys, features=None):
        """Records of ``keys`` (None where an entity has none), with only
        ``features`` (plus the _-prefixed header fields) if given."""
        if len(keys) > self.max_batch:
            raise RequestError("batch_too_big", f"{len(keys)} keys in one request; the "
                               f"limit is {self.max_batch}: split the batch")
        schema = await self.catalog.schema(view)
        check_keys(schema, keys)
        wanted = check_features(schema, features)
        records = self._read(view, keys)
        if wanted is None:
            return records
        return [None if r is None else select(r, wanted) for r in records]

    def _read(self, view, keys):
        try:
            return self.store.get_many(view, keys)
        except StoreError as error:         # dropped since the catalog loaded
            raise RequestError("unknown_view", str(error)) from error
        except (RecordError, OSError, ValueError, OverflowError) as error:
            log.warning("lookup in view %r failed: %s", view, error)
            raise RequestError("store_error", f"{type(error).__name__}: {error}") from error


def describe_all(schemas):
    return {name: {"key_type": schema.key_type, "version": schema.version,
                   "features": dict(schema.features)}
            for name, schema in sorted(schemas.items())}


def check_keys(schema, keys):
    """Keys must have the view's key type exactly: a string "42" is not the
    integer 42, and a bool is not an integer (msgpack has both)."""
    if schema.key_type == "int64":
        if not all(type(k) is int for k in keys):
            bad = next(k for k in keys if type(k) is not int)
            raise RequestError("bad_key", f"view {schema.view!r} has int64 keys; got {bad!r}")
        if keys and (min(keys) < INT64_MIN or max(keys) > INT64_MAX):
            raise RequestError("bad_key", "a key does not fit in an int64")
    elif not all(type(k) is str for k in keys):
        bad = next(k for k in keys if type(k) is not str)
        raise RequestError("bad_key", f"view {schema.view!r} has string keys; got {bad!r}")


def check_features(schema, features):
    if features is None:
        return None
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise RequestError("bad_request", "'features' must be an array of feature names")
    names = {name for name, _ in schema.features}
    unknown = [f for f in features if f not in names]
    if unknown:
        raise RequestError("unknown_feature", f"view {schema.view!r} has no feature "
                           f"{unknown[0]!r}; its features: {[n for n, _ in schema.features]}")
    return tuple(features) + RECORD_META


def select(record, wanted):
    try:
        return {name: record[name] for name in wanted}
    except KeyError:                        # promoted between catalog and read
        raise RequestError("store_error", "the view's served version changed during the "
                           "request; retry")


# ---- connections ---------------------------------------------------------------

class Connections:
    """The open connections of one front end: counted for /metrics, and
    closed by the server's close() (asyncio's Server.close() only stops
    accepting new ones)."""

    def __init__(self, transport, metrics):
        self.transport = transport
        self.metrics = metrics
        self.open_ones = {}                 # handler task -> its writer

    @contextlib.asynccontextmanager
    async def open(self, writer):
        task = asyncio.current_task()
        self.open_ones[task] = writer
        self.metrics.connections[self.transport] += 1
        try:
            yield
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                            # the client went away mid-request
        finally:
            self.metrics.connections[self.transport] -= 1
            del self.open_ones[task]
            writer.close()

    async def close_all(self):
        """Close every connection; each handler then ends at its next read.
        (Cancelling the handlers instead trips Python 3.11's streams, which
        log a cancelled handler as an error.)"""
        tasks = list(self.open_ones)
        for writer in self.open_ones.values():
            writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


# ---- msgpack over TCP -----------------------------------------------------------

def encode_frame_bytes(payload):
    return len(payload).to_bytes(FRAME_HEADER_BYTES, "big") + payload


def error_reply(request_id, code, message):
    return msgpack.packb({"id": request_id, "ok": False,
                          "error": {"code": code, "message": message}})


def decode_request(payload):
    try:
        request = msgpack.unpackb(payload, raw=False)
    except Exception as error:              # any decoding failure is the client's
        raise RequestError("bad_frame", f"the frame is not one msgpack value: {error}")
    if not isinstance(request, dict):
        raise RequestError("not_a_map", f"a request is a msgpack map, not "
                           f"{type(request).__name__}")
    return request


def request_id_of(request):
    request_id = request.get("id")
    if request_id is not None and type(request_id) is not int:
        raise RequestError("bad_request", "'id' must be an integer")
    return request_id


class TcpFrontEnd:
    def __init__(self, service, metrics, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
                 http_port=None):
        self.service = service
        self.metrics = metrics
        self.connections = Connections("tcp", metrics)
        self.max_frame_bytes = max_frame_bytes
        self.garbage_bytes = max(GARBAGE_FRAME_BYTES, 4 * max_frame_bytes)
        self.http_port = http_port

    async def serve_connection(self, reader, writer):
        session = Session()
        async with self.connections.open(writer):
            while await self._serve_frame(reader, writer, session):
                pass

    async def _serve_frame(self, reader, writer, session):
        """Answer one frame; False when the connection is to close."""
        try:
            header = await reader.readexactly(FRAME_HEADER_BYTES)
        except asyncio.IncompleteReadError:
            return False                    # a clean close between frames
        started = time.perf_counter()
        length = int.from_bytes(header, "big")
        if length > self.max_frame_bytes:
            keep_open = await self._refuse_oversized(reader, writer, length)
            self.metrics.observe("tcp", "invalid", "frame_too_big",
                                 time.perf_counter() - started)
            return keep_open
        payload = await reader.readexactly(length)
        reply, op, status, n_keys = await self._answer(payload, session)
        writer.write(encode_frame_bytes(reply))
        await writer.drain()                # waits only if the client stops reading
        self.metrics.observe("tcp", op, status, time.perf_counter() - started, n_keys)
        return True

    async def _answer(self, payload, session):
        """-> (reply payload, op label, status label, keys looked up)."""
        request_id, op = None, "invalid"
        try:
            request = decode_request(payload)
            request_id = request_id_of(request)
            op = request.get("op") if request.get("op") in OPS else "invalid"
            body = await self.service.handle(request, session)
        except RequestError as error:
            return error_reply(request_id, error.code, error.message), op, error.code, 0
        except Exception:
            log.exception("internal error answering a %s request", op)
            return error_reply(request_id, "internal", "internal server error; see its log"), \
                op, "internal", 0
        reply = {"id": request_id, "ok": True}
        reply.update(body)
        n_keys = len(body["records"]) if op == "get" else 0
        return msgpack.packb(reply), op, "ok", n_keys

    async def _refuse_oversized(self, reader, writer, length):
        """Discard a frame longer than allowed, then refuse it; close if its
        length is garbage (see the module docstring)."""
        if length > self.garbage_bytes:
            hint = f" (HTTP is served on port {self.http_port})" if self.http_port else ""
            message = (f"frame length {length} is not plausible; closing. Is this an HTTP "
                       f"or other non-Tally client on the msgpack port?{hint}")
            writer.write(encode_frame_bytes(error_reply(None, "frame_too_big", message)))
            await writer.drain()
            return False
        remaining = length
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 16))
            if not chunk:
                return False
            remaining -= len(chunk)
        message = f"frame of {length} bytes exceeds max_frame_bytes={self.max_frame_bytes}"
        writer.write(encode_frame_bytes(error_reply(None, "frame_too_big", message)))
        await writer.drain()
        return True


# ---- HTTP/1.1 + JSON -----------------------------------------------------------

class HttpError(Exception):
    """An HTTP request that cannot be parsed: answered, then the connection closes."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class HttpRequest:
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive")

    def __init__(self, method, target, version, headers, body):
        parts = urlsplit(target)
        self.method = method
        self.path = parts.path
        self.query = parse_qs(parts.query)
        self.headers = headers
        self.body = body
        connection = headers.get("connection", "").lower()
        self.keep_alive = (connection != "close" if version == "HTTP/1.1"
                           else connection == "keep-alive")


async def read_http_request(reader, writer, max_body):
    """The next request on the connection, or None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise HttpError("bad_request", "the request ended inside its head")
        return None
    except asyncio.LimitOverrunError:
        raise HttpError("headers_too_big", f"request head over {MAX_HTTP_HEAD_BYTES} bytes")
    lines = head[:-4].decode("latin-1").split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
        raise HttpError("bad_request", f"not an HTTP/1.x request line: {lines[0][:100]!r}")
    headers = parse_headers(lines[1:])
    body = await read_body(reader, writer, headers, max_body)
    return HttpRequest(*request_line, headers, body)


def parse_headers(lines):
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise HttpError("bad_request", f"malformed header line {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def read_body(reader, writer, headers, max_body):
    if "transfer-encoding" in headers:
        raise HttpError("not_implemented", "chunked request bodies are not supported; "
                        "send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError("bad_request", "Content-Length is not a number")
    if length < 0:
        raise HttpError("bad_request", "Content-Length is negative")
    if length > max_body:
        raise HttpError("frame_too_big", f"body of {length} bytes exceeds {max_body}")
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")     # curl waits for it
    return await reader.readexactly(length) if length else b""


def http_response(status, body, keep_alive, content_type="application/json",
                  extra_headers=""):
    head = (f"HTTP/1.1 {status} {HTTP_REASONS.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n{extra_headers}\r\n")
    return head.encode("latin-1") + body


def json_body(value):
    return json.dumps(value, separators=(",", ":")).encode()


def error_json(code, message):
    return json_body({"ok": False, "error": {"code": code, "message": message}})


class HttpFrontEnd:
    FEATURES = "/v1/features/"

    def __init__(self, service, metrics, max_body=DEFAULT_MAX_FRAME_BYTES):
        self.service = service
        self.metrics = metrics
        self.connections = Connections("http", metrics)
        self.max_body = max_body
        self.started_at = time.monotonic()

    async def serve_connection(self, reader, writer):
        async with self.connections.open(writer):
            while await self._serve_request(reader, writer):
                pass

    async def _serve_request(self, reader, writer):
        """Answer one request; False when the connection is to close."""
        try:
            request = await read_http_request(reader, writer, self.max_body)
        except HttpError as error:
            body = error_json(error.code, error.message)
            writer.write(http_response(HTTP_STATUS[error.code], body, keep_alive=False))
            self.metrics.observe("http", "invalid", error.code, 0.0)
            return False
        if request is None:
            return False
        started = time.perf_counter()
        op, outcome, body, content_type, n_keys = await self._respond(request)
        status = 200 if outcome == "ok" else HTTP_STATUS[outcome]
        challenge = 'WWW-Authenticate: Bearer realm="tally"\r\n' if status == 401 else ""
        writer.write(http_response(status, body, request.keep_alive, content_type, challenge))
        await writer.drain()
        self.metrics.observe("http", op, outcome, time.perf_counter() - started, n_keys)
        return request.keep_alive

    async def _respond(self, request):
        """-> (op label, "ok" or an error code, body, content type, keys looked up)."""
        op = "invalid"
        try:
            op, handler, args = self._route(request)
            if op != "health" and not self.service.token_ok(bearer_token(request.headers)):
                raise RequestError("unauthorized", "send Authorization: Bearer <token>")
            result = await handler(*args)
        except RequestError as error:
            return op, error.code, error_json(error.code, error.message), "application/json", 0
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path)
            body = error_json("internal", "internal server error; see its log")
            return op, "internal", body, "application/json", 0
        if op == "metrics":
            return op, "ok", result.encode(), "text/plain; version=0.0.4; charset=utf-8", 0
        n_keys = len(result["records"]) if "records" in result else int("record" in result)
        return op, "ok", json_body(dict({"ok": True}, **result)), "application/json", n_keys

    def _route(self, request):
        """-> (op label, handler, args), or RequestError not_found / method_not_allowed."""
        path, method = request.path, request.method
        if path.startswith(self.FEATURES):
            parts = path[len(self.FEATURES):].split("/")
            if len(parts) == 2 and all(parts):
                expect(method, "GET")
                return "get", self._get_one, (unquote(parts[0]), unquote(parts[1]),
                                              request.query)
            if len(parts) == 1 and parts[0]:
                expect(method, "POST")
                return "post", self._post_many, (unquote(parts[0]), request.body)
        routes = {"/health": ("health", self._health), "/metrics": ("metrics", self._metrics),
                  "/v1/views": ("views", self._views)}
        if path in routes:
            expect(method, "GET")
            op, handler = routes[path]
            return op, handler, ()
        raise RequestError("not_found", f"no route {path!r}; see GET /v1/features/{{view}}/"
                           "{key}, POST /v1/features/{view}, /v1/views, /health, /metrics")

    async def _get_one(self, view, raw_key, query):
        schema = await self.service.catalog.schema(view)
        key = raw_key
        if schema.key_type == "int64":
            try:
                key = int(raw_key)
            except ValueError:
                raise RequestError("bad_key", f"view {view!r} has int64 keys; got {raw_key!r}")
        features = None
        if "features" in query:
            features = [f for value in query["features"] for f in value.split(",") if f]
        record = (await self.service.lookup(view, [key], features))[0]
        return {"view": view, "key": key, "record": record}

    async def _post_many(self, view, body):
        try:
            request = json.loads(body)
        except ValueError as error:
            raise RequestError("bad_request", f"the body is not JSON: {error}")
        if not isinstance(request, dict) or not isinstance(request.get("keys"), list):
            raise RequestError("bad_request", 'the body must be {"keys": [...]} (and '
                               'optionally "features": [...])')
        records = await self.service.lookup(view, request["keys"], request.get("features"))
        return {"view": view, "records": records}

    async def _views(self):
        return {"views": describe_all(self.service.catalog.schemas)}

    async def _health(self):
        return {"status": "serving", "uptime_seconds": round(time.monotonic() -
                                                             self.started_at, 3)}

    async def _metrics(self):
        return self.metrics.render()


def expect(method, allowed):
    if method != allowed:
        raise RequestError("method_not_allowed", f"use {allowed}, not {method}")


def bearer_token(headers):
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# ---- the server ----------------------------------------------------------------

class LookupServer:
    """Both front ends over one store. ``await start()``, then ``port`` and
    ``http_port`` hold the bound ports (pass 0 for any free one)."""

    def __init__(self, store, host=DEFAULT_HOST, port=DEFAULT_PORT,
                 http_port=DEFAULT_HTTP_PORT, token=None,
                 max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, max_batch=DEFAULT_MAX_BATCH,
                 catalog_refresh=DEFAULT_CATALOG_REFRESH_SECONDS):
        self.store = open_store(store)
        self.host = host
        self.port, self.http_port = port, http_port
        self.metrics = Metrics()
        self.service = LookupService(self.store, token=token, max_batch=max_batch)
        self.tcp = TcpFrontEnd(self.service, self.metrics, max_frame_bytes)
        self.http = HttpFrontEnd(self.service, self.metrics, max_body=max_frame_bytes)
        self.catalog_refresh = catalog_refresh
        self._servers = []
        self._refresher = None

    async def start(self):
        catalog = self.service.catalog
        await catalog.reload()                  # so the first request is not the one to wait
        self._refresher = asyncio.ensure_future(catalog.refresh_every(self.catalog_refresh))
        tcp = await asyncio.start_server(self.tcp.serve_connection, self.host, self.port)
        self._servers.append(tcp)
        self.port = tcp.sockets[0].getsockname()[1]
        if self.http_port is not None:
            http = await asyncio.start_server(self.http.serve_connection, self.host,
                                              self.http_port, limit=MAX_HTTP_HEAD_BYTES)
            self._servers.append(http)
            self.http_port = http.sockets[0].getsockname()[1]
            self.tcp.http_port = self.http_port
        return self

    async def close(self):
        for server in self._servers:
            server.close()
        await self.tcp.connections.close_all()
        await self.http.connections.close_all()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self._refresher is not None:
            self._refresher.cancel()
        await self.store.close()

    def describe(self):
        http = f", HTTP on http://{self.host}:{self.http_port}" if self.http_port else ""
        guard = "token required" if self.service.token else "no token"
        return (f"tally lookup-server: msgpack on {self.host}:{self.port}{http} "
                f"(store {self.store.path}, {len(self.service.catalog.schemas)} views, {guard})")


def new_event_loop():
    import uvloop
    return uvloop.new_event_loop()


def serve_lookups(store_path, host=DEFAULT_HOST, port=DEFAULT_PORT,
                  http_port=DEFAULT_HTTP_PORT, token=None,
                  max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, max_batch=DEFAULT_MAX_BATCH,
                  catalog_refresh=DEFAULT_CATALOG_REFRESH_SECONDS):
    """Serve until SIGINT or SIGTERM, on uvloop. Prints one line with the
    bound ports once it accepts connections. ``token=None`` reads
    ``$TALLY_TOKEN``; pass ``""`` to serve without one even if it is set."""
    token = os.environ.get("TALLY_TOKEN") if token is None else token
    server = LookupServer(store_path, host, port, http_port, token or None,
                          max_frame_bytes, max_batch, catalog_refresh)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve_until_signalled(server))
    finally:
        loop.close()
    return 0


async def _serve_until_signalled(server):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        if not server.service.token and server.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"tally lookup-server: warning: serving {server.host} without a token",
                  file=sys.stderr, flush=True)
        print(server.describe(), flush=True)
        await stop.wait()
    finally:
        await server.close()


@contextlib.contextmanager
def serve_in_background(store, **options):
    """Run a LookupServer on its own uvloop thread, e.g. beside a writer in
    this process (pass its LmdbStore) or in tests; yields the started server."""
    loop = new_event_loop()
    server = LookupServer(store, **options)
    thread = threading.Thread(target=loop.run_forever, name="tally-lookup-server",
                              daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
