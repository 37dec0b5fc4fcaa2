"""The distributed online store: Aerospike through the official client
(PyPI ``aerospike`` >= 19; install with ``pip install tally[aerospike]``).

Same interface as :class:`tally.service.lmdb_store.LmdbStore`, so the pipeline
and readers take either: ``register_view``, ``schema``, ``views``, ``write``,
``get_many``, ``get``, ``count``, ``flush``, ``close``, plus ``write_async``,
``get_many_async`` and ``get_async`` for asyncio callers.

Layout
------
- Namespace: the one given. Per-view TTLs need the namespace to set
  ``nsup-period`` > 0 (or ``allow-ttl-without-nsup true``): otherwise the server
  refuses every write that carries a TTL with result 22 (FAIL_FORBIDDEN).
- Set: one per view, ``set_prefix + view`` (at most 63 bytes).
- Record: one per entity, keyed by the entity key as ``int`` (int64 views) or
  ``str`` (string views). Never ``bytes``: the client copies a ``bytes`` key
  (and a ``str`` key, through UTF-8) as a C string, so it is cut at the first
  NUL byte. A string key that contains NUL is therefore sent as a
  ``bytearray`` of its UTF-8 (a blob key: its digest carries another type
  byte, so it can collide with no ``str`` key).
- Bins: one per feature through a short-name map (``f0``, ``f1``, ... since
  bin names are capped at 15 bytes), plus ``_et`` newest event time, ``_wt``
  write time, ``_vu`` valid until and ``_vv`` view version (epoch ms ints). A
  null (a null feature, no event time, no expiry) is a missing bin: writing
  ``None`` deletes the bin on the server; reading a missing bin gives ``None``,
  never zero.
- Metadata: set ``set_prefix + "_meta"`` (no view set can have that name:
  view names never start with ``_``), key = view name, bins ``schema`` (the
  ``ViewSchema.to_bytes()`` blob, the same bytes LMDB stores), ``names``
  (map feature name -> bin name), ``view`` and ``layout``. The name map only
  grows: a feature keeps its bin across view versions, a new feature gets the
  next free ``fN``, and bins of features a newer version dropped are deleted
  whenever a record is rewritten.

Writes
------
``write`` takes the same ``Records`` (columns) as every store
(``tally.core.record``) and turns them into bins column-wise.
Records go out in ``batch_write`` calls of ``chunk_size`` ``Write`` records.
A batch call does not raise for single-record failures, so every record's
result code is checked: retryable codes (timeouts, no response, connection
and node errors, cluster changes, hot keys, device overload) are retried with
exponential backoff up to ``max_attempts`` attempts in all; any other code is
final. Retrying is safe even when a write is *in doubt* (it may have been
applied): a record is a function of the view state, so writing it again
gives the same record. It does assume one writer per view at a time (the
pipeline writes its batches in order); two concurrent ``write`` calls for the
same entity could land in either order. Records that still fail raise
:class:`AerospikeWriteError` listing each key and code, after every other
record of the call has been written.

Reads
-----
``batch_read`` in chunks; result 2 (not found, which includes expired) gives
``None``; retryable codes are retried like writes; anything else raises
:class:`AerospikeReadError`.

Client facts this relies on (aerospike-client-python 19.x source):
``batch_write`` stores the C status in ``BatchRecords.result`` and each
record's ``result``/``in_doubt`` and raises only for errors before the call
(``src/main/client/batch_write.c``); ``batch_read`` returns one
``BatchRecord`` per key in request order (``src/main/client/batch_read.c``);
``None`` converts to a nil value (``src/main/conversions.c``) and a nil write
deletes the bin on the server; the blocking calls release the GIL, so the
async wrappers run them in a thread pool.

Long because the client's behaviour it relies on is written down
beside the code (result codes, policies, key types).
"""
import asyncio
import concurrent.futures
import random
import threading
import time
from datetime import timedelta

import numpy as np

from tally.service.store import StoreError
from tally.core.errors import RecordError
from tally.core.record import INT64_MAX, INT64_MIN, ViewSchema

META_SUFFIX = "_meta"
META_LAYOUT = 1
EVENT_TIME_BIN, WRITE_TIME_BIN, VALID_UNTIL_BIN, VIEW_VERSION_BIN = "_et", "_wt", "_vu", "_vv"
SYSTEM_BINS = (EVENT_TIME_BIN, WRITE_TIME_BIN, VALID_UNTIL_BIN, VIEW_VERSION_BIN)
MAX_SET_NAME_BYTES = 63        # AS_SET_MAX_SIZE 64 with the NUL (C client as_key.h)
MAX_BIN_NAME_BYTES = 15        # AS_BIN_NAME_MAX_LEN (C client as_bin.h)

# TTL values of the record metadata (aerospike.TTL_* in 19.x).
TTL_NAMESPACE_DEFAULT = 0
TTL_NEVER_EXPIRE = 0xFFFFFFFF

# Result codes (as_status.h of the C client the 19.x wheels embed).
OK = 0
RECORD_NOT_FOUND = 2
FAIL_FORBIDDEN = 22
RETRYABLE = frozenset({
    9,      # TIMEOUT (client or server)
    -15,    # NO_RESPONSE: the record's sub-batch never got an answer
    -10,    # CONNECTION
    -8,     # INVALID_NODE: no node for the partition (node down, restart)
    -7,     # NO_MORE_CONNECTIONS
    -12,    # MAX_RETRIES_EXCEEDED
    -14,    # MAX_ERROR_RATE: node circuit breaker open
    7,      # CLUSTER_CHANGE
    11,     # CLUSTER: partition unavailable (also "no connection to cluster")
    14,     # RECORD_BUSY: hot key
    18,     # DEVICE_OVERLOAD
    20,     # NAMESPACE_NOT_FOUND: the client reports "Cluster is empty" so
            # while every node is gone; a wrong namespace fails after the retries
    32,     # XDR_KEY_BUSY
})
CODE_NAMES = {
    -16: "BATCH_FAILED", -15: "NO_RESPONSE", -14: "MAX_ERROR_RATE", -12: "MAX_RETRIES_EXCEEDED",
    -10: "CONNECTION", -8: "INVALID_NODE", -7: "NO_MORE_CONNECTIONS", -2: "PARAM", -1: "CLIENT",
    1: "SERVER", 2: "RECORD_NOT_FOUND", 4: "REQUEST_INVALID", 7: "CLUSTER_CHANGE",
    8: "SERVER_FULL", 9: "TIMEOUT", 11: "CLUSTER", 12: "BIN_INCOMPATIBLE_TYPE",
    13: "RECORD_TOO_BIG", 14: "RECORD_BUSY", 18: "DEVICE_OVERLOAD", 20: "NAMESPACE_NOT_FOUND",
    21: "BIN_NAME", 22: "FAIL_FORBIDDEN", 32: "XDR_KEY_BUSY",
}
_HINTS = {
    FAIL_FORBIDDEN: "a write with a TTL needs the namespace to set nsup-period > 0 "
                    "(or allow-ttl-without-nsup true)",
    13: "the record is larger than the namespace's max-record-size (write-block-size)",
}

SERVICE_PREFIX = "_service:"


def code_name(code):
    return CODE_NAMES.get(code, str(code))


class AerospikeStoreError(StoreError, RuntimeError):
    """The server or client refused a command for good (``code`` says why)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class AerospikeWriteError(AerospikeStoreError):
    """Some records of a write failed after the retries; every other record of
    the call was written. ``failures`` lists ``(key, code, in_doubt)``."""

    def __init__(self, view, failures, written):
        self.view, self.failures, self.written = view, failures, written
        # retrying cannot mend a write refused for a code the server keeps giving
        self.permanent = bool(failures) and all(code not in RETRYABLE
                                                for _, code, _ in failures)
        codes = {}
        for _, code, _ in failures:
            codes[code] = codes.get(code, 0) + 1
        summary = ", ".join(f"{n} x {code_name(c)} ({c})" for c, n in sorted(codes.items()))
        hints = "; ".join(_HINTS[c] for c in codes if c in _HINTS)
        sample = ", ".join(repr(k) for k, _, _ in failures[:5])
        super().__init__(
            f"view {view!r}: {len(failures)} record(s) not written ({summary}), "
            f"{written} written; first keys: {sample}" + (f"; {hints}" if hints else ""),
            code=failures[0][1] if failures else None)


class AerospikeReadError(AerospikeStoreError):
    """Some records could not be read after the retries."""


def parse_hosts(hosts):
    """``"h:p"``, ``"h1:p1,h2:p2"``, ``"[::1]:3000"`` or a list of those or of
    ``(host, port)`` tuples -> ``[(host, port), ...]`` (port 3000 if none)."""
    if isinstance(hosts, str):
        hosts = [h for h in hosts.split(",") if h.strip()]
    result = []
    for host in hosts:
        if isinstance(host, (tuple, list)):
            result.append((str(host[0]), int(host[1])))
            continue
        host = host.strip()
        if host.startswith("["):                       # [ipv6]:port
            addr, _, rest = host[1:].partition("]")
            port = rest.lstrip(":") or "3000"
        elif host.count(":") == 1:
            addr, port = host.split(":")
        else:
            addr, port = host, "3000"
        result.append((addr, int(port)))
    if not result:
        raise ValueError("no Aerospike hosts given")
    return result


def ttl_seconds(ttl):
    """A view TTL -> the record metadata ``ttl``: None = the namespace's
    default-ttl, a positive number of seconds (or a timedelta), -1 = never."""
    if ttl is None:
        return TTL_NAMESPACE_DEFAULT
    if isinstance(ttl, timedelta):
        ttl = ttl.total_seconds()
    if ttl == -1 or ttl == TTL_NEVER_EXPIRE:
        return TTL_NEVER_EXPIRE
    seconds = int(ttl)
    if seconds != ttl or not 0 < seconds < TTL_NEVER_EXPIRE - 3:
        raise ValueError(f"TTL {ttl!r}: use None (namespace default), whole seconds > 0, "
                         "or -1 (never expire)")
    return seconds


def user_key(key_type, key):
    """An entity key -> the user key of its record: int for int64 views, str
    for string views (a bytearray of the UTF-8 if it contains NUL)."""
    if key_type == "int64":
        if isinstance(key, (bool, np.bool_)):
            raise TypeError(f"entity key {key!r} is a bool, not an int64")
        value = int(key)
        if value != key or not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"entity key {key!r} is not an int64")
        return value
    text = str(key)
    return bytearray(text.encode()) if "\x00" in text else text


def _nullable(column, valid):
    """A numpy column -> list of Python numbers with None where not valid."""
    out = column.tolist()
    if not valid.all():
        for i in np.flatnonzero(~valid).tolist():
            out[i] = None
    return out


class _ViewMeta:
    """A view's schema and its feature -> bin name map (a cache of the metadata record)."""

    def __init__(self, schema, names):
        self.schema = schema
        self.names = dict(names)
        self.bins = [self.names[name] for name, _ in schema.features]
        current = set(self.bins)
        self.retired = sorted(b for b in self.names.values() if b not in current)
        self.read_bins = self.bins + list(SYSTEM_BINS)


def _merge_names(schema, existing):
    """Keep each known feature's bin; give new features the next free fN."""
    names = dict(existing or {})
    used = {int(b[1:]) for b in names.values() if b[:1] == "f" and b[1:].isdigit()}
    next_free = max(used, default=-1) + 1
    for name, _ in schema.features:
        if name not in names:
            names[name] = f"f{next_free}"
            next_free += 1
    for b in names.values():
        if len(b.encode()) > MAX_BIN_NAME_BYTES:
            raise ValueError(f"bin name {b!r} is longer than {MAX_BIN_NAME_BYTES} bytes")
    return names


def _error_code(error):
    code = getattr(error, "code", None)
    return code if isinstance(code, int) else None


class AerospikeStore:
    """The online store on an Aerospike cluster; see the module docstring."""

    def __init__(self, hosts, namespace, set_prefix="tally_", ttl_by_view=None, *,
                 chunk_size=1000, max_attempts=6, backoff_ms=50, backoff_max_ms=2000,
                 write_timeout_ms=2000, read_timeout_ms=1000, socket_timeout_ms=None,
                 client_max_retries=None, executor_workers=4, config=None, client=None):
        """``hosts``: see :func:`parse_hosts`. ``ttl_by_view``: view -> TTL
        (see :func:`ttl_seconds`); views not listed use the namespace's
        default-ttl. ``chunk_size``: records per batch call (servers often cap
        batches with ``batch-max-requests``, e.g. 5000). ``max_attempts``:
        tries per record, the first included; the sleep before try k is
        ``backoff_ms * 2**(k-2)`` (with jitter), at most ``backoff_max_ms``.
        ``write_timeout_ms``/``read_timeout_ms`` are each batch call's
        ``total_timeout``; ``socket_timeout_ms`` (default: a quarter of it)
        must be below it for the client's own ``client_max_retries`` (default
        1 for writes, 2 for reads) to fire. ``config`` is merged into the
        client config (``user``, ``password``, ``tls``, ``policies``, ...). ``client``: an
        already-built client (tests pass a fake one)."""
        if not 1 <= chunk_size <= 5000:
            raise ValueError("chunk_size must be between 1 and 5000")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.namespace = namespace
        self.set_prefix = set_prefix
        self.meta_set = set_prefix + META_SUFFIX
        _check_set_name(self.meta_set)
        self.ttl_by_view = {view: ttl_seconds(ttl) for view, ttl in (ttl_by_view or {}).items()}
        self.chunk_size = chunk_size
        self.max_attempts = max_attempts
        self.backoff_ms = backoff_ms
        self.backoff_max_ms = backoff_max_ms
        self.write_policy = _policy(write_timeout_ms, socket_timeout_ms,
                                    1 if client_max_retries is None else client_max_retries)
        self.read_policy = _policy(read_timeout_ms, socket_timeout_ms,
                                   2 if client_max_retries is None else client_max_retries)
        self.stats = {"batch_calls": 0, "retried": 0, "in_doubt": 0, "failed": 0}
        self._sleep = time.sleep
        self._lock = threading.Lock()
        self._meta = {}
        aerospike = self._ops_module()    # lazy import: the package is an optional extra
        if client is None:
            client_config = {
                "hosts": parse_hosts(hosts),
                "policies": {"batch": dict(self.read_policy),
                             "batch_parent_write": dict(self.write_policy),
                             "read": dict(self.read_policy),
                             "write": dict(self.write_policy)},
                "validate_keys": True,
            }
            for name, value in (config or {}).items():
                if name == "policies":       # merge per policy, keeping our timeouts
                    for kind, policy in value.items():
                        client_config["policies"].setdefault(kind, {}).update(policy)
                else:
                    client_config[name] = value
            client = aerospike.client(client_config)    # connects now; raises if it cannot
        self.client = client
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=executor_workers, thread_name_prefix="tally-aerospike")

    # -- lifecycle --------------------------------------------------------

    def close(self):
        self._executor.shutdown(wait=True)
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def flush(self):
        """Nothing to do: the server has applied a write when it acknowledges
        it (durability then follows the namespace's storage and commit-level
        settings)."""

    # -- views ------------------------------------------------------------

    def set_name(self, view):
        return self.set_prefix + view

    def register_view(self, schema: ViewSchema, current=True):
        """Record the view's schema and bin-name map (merged with the map of
        an earlier version, so a feature keeps its bin). This backend serves
        one version per view: a candidate (``current=False``) is refused."""
        if not current:
            raise StoreError(f"view {schema.view!r} v{schema.version}: the Aerospike store "
                             "serves one version per view; compute candidates on the "
                             "embedded store")
        if not schema.view or schema.view.startswith("_"):
            raise ValueError(f"view name {schema.view!r}: names starting with '_' are reserved")
        _check_set_name(self.set_name(schema.view))
        existing = self._get_meta_record(schema.view)
        names = _merge_names(schema, existing["names"] if existing else None)
        bins = {"schema": schema.to_bytes(), "names": names, "view": schema.view,
                "layout": META_LAYOUT}
        self._retry_single(lambda: self.client.put(
            self._meta_key(schema.view), bins, meta={"ttl": TTL_NEVER_EXPIRE},
            policy=dict(self.write_policy)), f"register view {schema.view!r}")
        with self._lock:
            self._meta[schema.view] = _ViewMeta(schema, names)

    def schema(self, view, version=None) -> ViewSchema:
        self._check_version(view, version)
        return self._view_meta(view).schema

    def promote(self, view, version):
        """Serve ``version``: only the version registered last can be (one
        version per view on this backend)."""
        self._check_version(view, version)

    def _check_version(self, view, version):
        if version is not None and version != self._view_meta(view).schema.version:
            raise StoreError(f"view {view!r} has no version {version} in this store (the "
                             "Aerospike store serves one version per view)")

    def bin_names(self, view):
        """Feature name -> bin name for the view (every version's features)."""
        return dict(self._view_meta(view).names)

    def views(self):
        found = []

        def run():
            found.clear()
            query = self.client.query(self.namespace, self.meta_set)
            query.select("view")
            # query policy left at the client's (total_timeout 0: no limit)
            query.foreach(lambda record: found.append((record[2] or {}).get("view")))

        self._retry_single(run, "list views")
        return sorted(v for v in found if v)

    def count(self, view, version=None):
        """Records in the view's set (a query that streams record metadata;
        expired records that the server has not removed yet are not counted)."""
        self._check_version(view, version)
        counter = [0]

        def one(record):
            counter[0] += 1

        def run():
            counter[0] = 0
            query = self.client.query(self.namespace, self.set_name(view))
            query.select(WRITE_TIME_BIN)
            query.foreach(one)      # query policy: the client's (no total timeout)

        self._retry_single(run, f"count view {view!r}")
        return counter[0]

    def truncate(self, view):
        """Delete every record of the view (keeps its schema)."""
        self._view_meta(view)
        self.client.truncate(self.namespace, self.set_name(view), 0)

    def drop_view(self, view):
        """Delete the view's records and its schema."""
        self.truncate(view)
        try:
            self.client.remove(self._meta_key(view))
        except Exception as error:       # noqa: BLE001 - client exceptions carry .code
            if _error_code(error) != RECORD_NOT_FOUND:
                raise
        with self._lock:
            self._meta.pop(view, None)

    # -- feature services -------------------------------------------------
    # Stored in the metadata set under "_service:<name>" (view names never
    # start with "_"), in bins "service" and "service_name"; views() lists
    # only records with a "view" bin.

    def put_service(self, name, definition):
        self._retry_single(lambda: self.client.put(
            self._meta_key(SERVICE_PREFIX + name),
            {"service": bytearray(definition), "service_name": name},
            meta={"ttl": TTL_NEVER_EXPIRE}, policy=dict(self.write_policy)),
            f"store feature service {name!r}")

    def service(self, name):
        bins = self._get_meta_record(SERVICE_PREFIX + name)
        if not bins or "service" not in bins:
            raise StoreError(f"unknown feature service {name!r}; known: {self.services()}")
        return bytes(bins["service"])

    def services(self):
        found = []

        def run():
            found.clear()
            query = self.client.query(self.namespace, self.meta_set)
            query.select("service_name")
            query.foreach(lambda record: found.append((record[2] or {}).get("service_name")))
        self._retry_single(run, "list feature services")
        return sorted(name for name in found if name)

    def drop_service(self, name):
        try:
            self.client.remove(self._meta_key(SERVICE_PREFIX + name))
        except Exception as error:       # noqa: BLE001 - client exceptions carry .code
            if _error_code(error) != RECORD_NOT_FOUND:
                raise

    # -- writes -----------------------------------------------------------

    def write(self, view, keys, records, version=None):
        """Put one record per key (:class:`tally.core.record.Records`). Raises
        AerospikeWriteError if some records still fail after the retries (the
        others are written)."""
        self._check_version(view, version)
        self.write_columns(view, keys, records.values, records.event_time,
                           records.write_time, records.valid_until)

    def write_columns(self, view, keys, values, event_time, write_time, valid_until):
        """``write`` from the columns themselves."""
        meta = self._view_meta(view)
        n = len(keys)
        if not n:
            return
        event_time = np.broadcast_to(np.asarray(event_time, dtype=np.int64), (n,))
        write_time = np.broadcast_to(np.asarray(write_time, dtype=np.int64), (n,))
        valid_until = np.broadcast_to(np.asarray(valid_until, dtype=np.int64), (n,))
        columns = {}
        for name, dtype in meta.schema.features:
            column, valid = values[name]
            columns[name] = (np.asarray(column, dtype=dtype), np.asarray(valid, dtype=bool))
        version = np.full(n, meta.schema.version, dtype=np.uint32)
        self._write_columns(view, meta, keys, columns, event_time, write_time, valid_until,
                            version)

    def _write_columns(self, view, meta, keys, values, event_time, write_time, valid_until,
                       version):
        n = len(keys)
        key_list = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        feature_values = [_nullable(*values[name]) for name, _ in meta.schema.features]
        et = event_time.tolist()
        wt = write_time.tolist()
        vu = valid_until.tolist()
        vv = version.tolist()
        op_write = self._op_write
        bins = meta.bins
        retired = [{"op": op_write, "bin": b, "val": None} for b in meta.retired]
        # later rows win, as with LMDB's putmulti
        last = {}
        for i, key in enumerate(key_list):
            ukey = user_key(meta.schema.key_type, key)
            last[(type(ukey), bytes(ukey)) if isinstance(ukey, bytearray) else ukey] = (ukey, i)
        entries = []
        for ukey, i in last.values():
            ops = [{"op": op_write, "bin": b, "val": column[i]}
                   for b, column in zip(bins, feature_values)]
            ops.append({"op": op_write, "bin": EVENT_TIME_BIN,
                        "val": None if et[i] == INT64_MIN else et[i]})
            ops.append({"op": op_write, "bin": WRITE_TIME_BIN, "val": wt[i]})
            ops.append({"op": op_write, "bin": VALID_UNTIL_BIN,
                        "val": None if vu[i] == INT64_MAX else vu[i]})
            ops.append({"op": op_write, "bin": VIEW_VERSION_BIN, "val": vv[i]})
            ops.extend(retired)
            entries.append((key_list[i], ukey, ops))
        self.write_bins(view, entries)
        return n

    def write_bins(self, view, entries):
        """The write path under ``write``: ``entries`` is a list of
        ``(entity key, user key, ops)`` with operation dicts as made by
        ``aerospike_helpers.operations.operations.write``. Chunks, retries,
        checks every record's result; raises AerospikeWriteError."""
        set_name = self.set_name(view)
        meta = {"ttl": self.ttl_by_view.get(view, TTL_NAMESPACE_DEFAULT)}
        records_module = self._records_module()

        def send(chunk):
            batch = records_module.BatchRecords([
                records_module.Write((self.namespace, set_name, entries[i][1]), entries[i][2],
                                     meta=meta) for i in chunk])
            self.stats["batch_calls"] += 1
            self.client.batch_write(batch, dict(self.write_policy))
            return [(r.result, bool(r.in_doubt)) for r in batch.batch_records]

        failures = self._run(len(entries), send, writing=True)
        if failures:
            self.stats["failed"] += len(failures)
            raise AerospikeWriteError(
                view, [(entries[i][0], code, doubt) for i, (code, doubt) in sorted(failures.items())],
                len(entries) - len(failures))

    async def write_async(self, view, keys, records):
        """``write`` in the store's thread pool (the client has no asyncio API;
        its calls release the GIL)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.write, view, keys, records)

    # -- reads ------------------------------------------------------------

    def get_many(self, view, keys, version=None):
        """Decoded records for ``keys`` (the same dicts as ``LmdbStore.get``);
        None for entities with no record (or an expired one)."""
        self._check_version(view, version)
        meta = self._view_meta(view)
        key_list = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        if not key_list:
            return []
        set_name = self.set_name(view)
        akeys = [(self.namespace, set_name, user_key(meta.schema.key_type, k)) for k in key_list]
        results = [None] * len(akeys)

        def send(chunk):
            self.stats["batch_calls"] += 1
            batch = self.client.batch_read([akeys[i] for i in chunk], meta.read_bins,
                                           dict(self.read_policy))
            got = batch.batch_records
            if len(got) != len(chunk):
                # the client returned before its per-key callback: the whole call failed
                code = batch.result if batch.result not in (OK, None) else -15
                return [(code, False)] * len(chunk)
            codes = []
            for i, record in zip(chunk, got):
                codes.append((record.result, False))
                if record.result == OK:
                    results[i] = self._decode(meta, record.record[2] if record.record else {})
            return codes

        failures = self._run(len(akeys), send, writing=False, ok_codes=(OK, RECORD_NOT_FOUND))
        if failures:
            code = next(iter(failures.values()))[0]
            raise AerospikeReadError(
                f"view {view!r}: {len(failures)} of {len(akeys)} records could not be read "
                f"(first: key {key_list[min(failures)]!r}, {code_name(code)} ({code}))", code=code)
        return results

    def get(self, view, key, version=None):
        return self.get_many(view, [key], version)[0]

    async def get_many_async(self, view, keys):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.get_many, view, keys)

    async def get_async(self, view, key):
        return (await self.get_many_async(view, [key]))[0]

    @staticmethod
    def _decode(meta, bins):
        bins = bins or {}
        result = {}
        for (name, dtype), b in zip(meta.schema.features, meta.bins):
            value = bins.get(b)
            if value is None:
                result[name] = None
            elif dtype == "float64":
                result[name] = float(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                result[name] = value
            else:
                raise RecordError(f"view {meta.schema.view!r}: bin {b!r} of int64 feature "
                                  f"{name!r} holds {value!r}")
        event_time = bins.get(EVENT_TIME_BIN)
        valid_until = bins.get(VALID_UNTIL_BIN)
        result["_event_time"] = None if event_time in (None, INT64_MIN) else event_time
        result["_write_time"] = bins.get(WRITE_TIME_BIN)
        result["_valid_until"] = None if valid_until in (None, INT64_MAX) else valid_until
        result["_view_version"] = bins.get(VIEW_VERSION_BIN)
        return result

    # -- retries ----------------------------------------------------------

    def _run(self, n, send, writing, ok_codes=(OK,)):
        """Send records 0..n-1 in chunks through ``send(chunk) -> [(code,
        in_doubt)]``, retrying retryable codes; returns ``{index: (code,
        in_doubt)}`` of the records that failed for good."""
        pending = list(range(n))
        failures = {}
        for attempt in range(1, self.max_attempts + 1):
            retry = {}
            for start in range(0, len(pending), self.chunk_size):
                chunk = pending[start:start + self.chunk_size]
                try:
                    codes = send(chunk)
                except Exception as error:  # noqa: BLE001 - client exceptions carry .code
                    code = _error_code(error)
                    if code not in RETRYABLE:
                        raise
                    # the call failed before or around sending: every record is
                    # pending (and, for writes, maybe applied)
                    codes = [(code, bool(getattr(error, "in_doubt", False)) and writing)] * len(chunk)
                for i, (code, doubt) in zip(chunk, codes):
                    if code in ok_codes:
                        continue
                    if doubt:
                        self.stats["in_doubt"] += 1
                    if code in RETRYABLE:
                        retry[i] = (code, doubt)
                    else:
                        failures[i] = (code, doubt)
            if not retry:
                break
            if attempt == self.max_attempts:
                failures.update(retry)
                break
            self.stats["retried"] += len(retry)
            self._backoff(attempt)
            pending = sorted(retry)
        return failures

    def _backoff(self, attempt):
        delay = min(self.backoff_max_ms, self.backoff_ms * 2 ** (attempt - 1))
        if delay > 0:
            self._sleep(delay * random.uniform(0.5, 1.0) / 1000)

    def _retry_single(self, call, what):
        for attempt in range(1, self.max_attempts + 1):
            try:
                return call()
            except Exception as error:  # noqa: BLE001 - client exceptions carry .code
                code = _error_code(error)
                if code not in RETRYABLE or attempt == self.max_attempts:
                    if code is not None and code in _HINTS:
                        raise AerospikeStoreError(f"{what}: {error} ({_HINTS[code]})",
                                                  code) from error
                    raise
                self._backoff(attempt)

    # -- metadata ---------------------------------------------------------

    def _meta_key(self, view):
        return (self.namespace, self.meta_set, view)

    def _get_meta_record(self, view):
        def call():
            try:
                return self.client.get(self._meta_key(view), dict(self.read_policy))[2]
            except Exception as error:  # noqa: BLE001 - client exceptions carry .code
                if _error_code(error) == RECORD_NOT_FOUND:
                    return None
                raise
        return self._retry_single(call, f"read the schema of view {view!r}")

    def _view_meta(self, view):
        meta = self._meta.get(view)
        if meta is None:
            bins = self._get_meta_record(view)
            if bins is None:
                raise StoreError(f"unknown view {view!r}; known views: {self.views()}")
            if bins.get("layout") != META_LAYOUT:
                raise RecordError(f"view {view!r}: metadata layout {bins.get('layout')!r} "
                                  "is not supported")
            schema = ViewSchema.from_bytes(view, bytes(bins["schema"]))
            meta = _ViewMeta(schema, bins["names"])
            with self._lock:
                self._meta[view] = meta
        return meta

    # -- client helpers (lazy imports) ------------------------------------

    def _ops_module(self):
        try:
            import aerospike
        except ImportError as error:
            raise ImportError("the Aerospike store needs the official client: "
                              "pip install 'tally[aerospike]' (aerospike>=19)") from error
        self._op_write = aerospike.OPERATOR_WRITE
        return aerospike

    @staticmethod
    def _records_module():
        from aerospike_helpers.batch import records
        return records


def _policy(total_ms, socket_ms, max_retries):
    if socket_ms is None:
        socket_ms = max(1, total_ms // 4)
    return {"total_timeout": int(total_ms), "socket_timeout": int(min(socket_ms, total_ms)),
            "max_retries": int(max_retries)}


def _check_set_name(name):
    encoded = name.encode()
    if len(encoded) > MAX_SET_NAME_BYTES or not name or ":" in name or ";" in name:
        raise ValueError(f"set name {name!r}: at most {MAX_SET_NAME_BYTES} bytes, "
                         "no ':' or ';' (shorten the view name or set_prefix)")
