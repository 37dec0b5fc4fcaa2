"""The HTTP/1.1 + JSON front end, for humans and tools:

``GET /v1/features/{view}/{key}[?features=a,b]``,
``POST /v1/features/{view}`` with ``{"keys": [...], "features": [...]}``,
``POST /v1/services/{service}`` with ``{"rows": [{"user": 42, ...}, ...]}``,
``GET /v1/views``, ``GET /health`` and ``GET /metrics`` (Prometheus text
format, or OpenMetrics when the Accept header asks for it). Keep-alive;
``Content-Length`` bodies only (no chunked uploads), the length in decimal
digits and said once. A key in the path of an int64
view is ``-?[0-9]+`` within int64.
Feature values are the msgpack protocol's, in JSON (strings, arrays for
lists, ``[[value, count], ...]`` for top_k: see
``tally.service.lookup.protocol``).
Errors are ``{"ok": false, "error": {"code", "message"}}`` with a matching
status (400, 401, 404, 405, 413, 431, 500, 501, 503): the codes of
``tally.service.lookup.protocol`` plus ``not_found``, ``method_not_allowed``,
``headers_too_big`` and ``not_implemented``; ``too_many_connections`` is a
503, answered before the request is read. Non-finite floats are written
as ``NaN``/``Infinity``, as Python's json does. With a token, requests need
``Authorization: Bearer <token>`` (else 401), except ``/health``.
"""
import asyncio
import json
import logging
import time
from urllib.parse import parse_qs, unquote, urlsplit

from tally.service.lookup.frontend import (DEFAULT_IDLE_TIMEOUT_SECONDS,
                                           DEFAULT_MAX_CONNECTIONS, Connections, count_request)
from tally.service.lookup.protocol import (DEFAULT_MAX_FRAME_BYTES, RequestError, describe_all,
                                           shorten)
from tally.service.metrics import exposition, scrape_registry

DEFAULT_HTTP_PORT = 8256
MAX_HTTP_HEAD_BYTES = 64 << 10
# Headers a request may carry once: two Content-Lengths are the classic
# request-smuggling ambiguity (which one frames the body?), two
# Authorizations leave unclear whose request it is.
SINGLE_HEADERS = ("content-length", "authorization")
HTTP_STATUS = {"bad_frame": 400, "not_a_map": 400, "bad_request": 400, "unknown_op": 400,
               "unauthorized": 401, "unknown_view": 404, "unknown_feature": 400,
               "bad_key": 400, "batch_too_big": 413, "frame_too_big": 413,
               "store_error": 500, "internal": 500, "not_found": 404,
               "method_not_allowed": 405, "headers_too_big": 431,
               "not_implemented": 501, "too_many_connections": 503}
HTTP_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized",
                404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large",
                431: "Request Header Fields Too Large", 500: "Internal Server Error",
                501: "Not Implemented", 503: "Service Unavailable"}

log = logging.getLogger("tally.server")


# ---- requests and responses ----------------------------------------------------

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
    if len(headers) < len(lines):           # some header repeated: rare, so checked apart
        refuse_repeated(lines)
    return headers


def refuse_repeated(lines):
    names = [line.partition(":")[0].strip().lower() for line in lines]
    for name in SINGLE_HEADERS:
        if names.count(name) > 1:
            raise HttpError("bad_request", f"header {name!r} is repeated")


async def read_body(reader, writer, headers, max_body):
    if "transfer-encoding" in headers:
        raise HttpError("not_implemented", "chunked request bodies are not supported; "
                        "send Content-Length")
    length = content_length(headers, max_body)
    if length > max_body:
        raise HttpError("frame_too_big", f"body of {length} bytes exceeds {max_body}")
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")     # curl waits for it
    return await reader.readexactly(length) if length else b""


def content_length(headers, max_body):
    """Content-Length is decimal digits only (int() would take "+14", "1_4"
    and " 14", which other parsers on the way may read otherwise)."""
    value = headers.get("content-length")
    if value is None:
        return 0
    if not (value.isdigit() and value.isascii()):   # ASCII digits are 0-9, nothing else
        raise HttpError("bad_request", f"Content-Length {value[:40]!r} is not decimal digits")
    try:
        return int(value)
    except ValueError:              # more digits than int() converts: no body is that big
        return max_body + 1


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


# ---- the front end ----------------------------------------------------------------

class HttpFrontEnd:
    FEATURES = "/v1/features/"
    SERVICES = "/v1/services/"

    def __init__(self, service, metrics, max_body=DEFAULT_MAX_FRAME_BYTES,
                 max_connections=DEFAULT_MAX_CONNECTIONS,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT_SECONDS):
        self.service = service
        self.metrics = metrics
        self.scrape = scrape_registry(metrics)      # the process's metrics beside the requests'
        self.connections = Connections("http", metrics, max_connections, idle_timeout)
        self.max_body = max_body
        self.started_at = time.monotonic()

    async def serve_connection(self, reader, writer):
        await self.connections.serve(reader, writer, self._refusal, self._serve_request)

    def _refusal(self):
        body = error_json("too_many_connections", self.connections.refusal_message())
        return http_response(503, body, keep_alive=False, extra_headers="Retry-After: 1\r\n")

    async def _serve_request(self, reader, writer, connection):
        """Answer one request; False when the connection is to close."""
        try:
            request = await read_http_request(reader, writer, self.max_body)
        except HttpError as error:
            if writer.is_closing():         # closed while idle: nobody to answer
                return False
            body = error_json(error.code, error.message)
            writer.write(http_response(HTTP_STATUS[error.code], body, keep_alive=False))
            count_request(self.metrics, "http", "invalid", error.code, 0.0)
            return False
        if request is None:
            return False
        started = connection.last_request = time.perf_counter()
        op, outcome, body, content_type, n_keys = await self._respond(request)
        status = 200 if outcome == "ok" else HTTP_STATUS[outcome]
        challenge = 'WWW-Authenticate: Bearer realm="tally"\r\n' if status == 401 else ""
        writer.write(http_response(status, body, request.keep_alive, content_type, challenge))
        await writer.drain()
        count_request(self.metrics, "http", op, outcome, time.perf_counter() - started, n_keys)
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
            body, content_type = result
            return op, "ok", body, content_type, 0
        n_keys = len(result.get("records", result.get("vectors", ()))) or \
            int("record" in result)
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
        if path.startswith(self.SERVICES) and "/" not in path[len(self.SERVICES):] \
                and path[len(self.SERVICES):]:
            expect(method, "POST")
            return "service", self._post_service, (unquote(path[len(self.SERVICES):]),
                                                   request.body)
        routes = {"/health": ("health", self._health, ()),
                  "/metrics": ("metrics", self._metrics, (request.headers.get("accept", ""),)),
                  "/v1/views": ("views", self._views, ())}
        if path in routes:
            expect(method, "GET")
            return routes[path]
        raise RequestError("not_found", f"no route {path!r}; see GET /v1/features/{{view}}/"
                           "{key}, POST /v1/features/{view}, POST /v1/services/{service}, /v1/views, "
                           "/health, /metrics")

    async def _get_one(self, view, raw_key, query):
        schema = await self.service.catalog.schema(view)
        key = raw_key
        if schema.key_type == "int64":
            key = int64_key(view, raw_key)
        features = None
        if "features" in query:
            features = [f for value in query["features"] for f in value.split(",") if f]
        record = (await self.service.lookup(view, [key], features))[0]
        return {"view": view, "key": key, "record": record}

    async def _post_many(self, view, body):
        request = json_request(body)
        if not isinstance(request, dict) or not isinstance(request.get("keys"), list):
            raise RequestError("bad_request", 'the body must be {"keys": [...]} (and '
                               'optionally "features": [...])')
        records = await self.service.lookup(view, request["keys"], request.get("features"))
        return {"view": view, "records": records}

    async def _post_service(self, name, body):
        request = json_request(body)
        if not isinstance(request, dict) or not isinstance(request.get("rows"), list):
            raise RequestError("bad_request", 'the body must be {"rows": [{"user": 42, ...}, '
                               '...]}: one map of entity keys per row')
        return {"service": name,
                "vectors": await self.service.lookup_service(name, request["rows"])}

    async def _views(self):
        return {"views": describe_all(self.service.catalog.schemas)}

    async def _health(self):
        return {"status": "serving", "uptime_seconds": round(time.monotonic() -
                                                             self.started_at, 3)}

    async def _metrics(self, accept):
        return exposition(self.scrape, accept)


def json_request(body):
    try:
        return json.loads(body)
    except ValueError as error:
        raise RequestError("bad_request", f"the body is not JSON: {error}")
    except RecursionError:
        raise RequestError("bad_request", "the body's JSON is nested too deeply")


def int64_key(view, text):
    """A key in the path of an int64 view: -?[0-9]+, since Python's int()
    also takes "+42", "4_2", " 42" and non-ASCII digits ("٤٢", "４２"). Out
    of int64 (at most 19 digits get this far) is refused by check_keys."""
    digits = text[1:] if text[:1] == "-" else text
    if not (digits.isdigit() and digits.isascii() and len(digits) <= 19):
        raise RequestError("bad_key", f"view {view!r} has int64 keys, written -?[0-9]+; "
                           f"got {shorten(text)}")
    return int(text)


def expect(method, allowed):
    if method != allowed:
        raise RequestError("method_not_allowed", f"use {allowed}, not {method}")


def bearer_token(headers):
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
