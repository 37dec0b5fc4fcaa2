"""The distributed online store: Aerospike through the official client
(PyPI ``aerospike`` 19.x; install with ``pip install tally[aerospike]``).

Same interface as :class:`tally.service.store.lmdb.LmdbStore` (candidate
versions and atomic promotion included), plus ``write_async`` and
``get_many_async`` for asyncio callers: the client has no asyncio API, its
calls release the GIL, so these run in the store's thread pool and never
block (nor retry on) the event loop.

Layout (metadata layout 2)
--------------------------
- Namespace: the one given; it must exist (checked when the store opens).
  Records carry the view's ``online_expiry`` as their TTL, which needs the
  namespace to set ``nsup-period`` > 0 (else the server refuses such writes
  with 22 FAIL_FORBIDDEN).
- **Pointer record**, one per view, in set ``set_prefix + "_meta"`` (no view
  set can have that name: view names never start with ``_``), key = view
  name, bins: ``view``; ``cur``, the served version (0: none); ``vers``, a
  map version -> {``features``, ``key``, ``set``, ``exp``}: each version's
  schema, the set holding its records and its expiry in ms; ``next``, the
  next set number; ``layout``. Every change (register, promote, drop,
  truncate) reads it and writes it back with a generation check
  (``POLICY_GEN_EQ``; ``POLICY_EXISTS_CREATE`` for a new view), again on a
  conflict, so concurrent processes never lose each other's changes.
- **One set per view version**: ``set_prefix + view + "_" + n``. A version's
  records are never shared with another version, so a promotion is the one
  write of ``cur`` and a reader, which reads one pointer and then one set,
  sees the old version or the new one, never a mix. Readers re-read the
  pointer at most ``meta_refresh_s`` (1 s) after they last did, and at once
  when asked for a version they do not know.
- **Drops and truncations are pointer changes**: the view (or version) gets
  a new set number and the old sets are truncated only to free memory.
  Community Edition has no durable deletes (a cold restart brings deleted and
  truncated records back from storage): nothing here relies on a delete, and
  set numbers are never reused, so records that come back are never read.
- Record: one per entity, keyed by the entity key as ``int`` (int64 views) or
  ``str`` (string views) and stored with it (``POLICY_KEY_SEND``), so a set
  can be listed (:meth:`items`). Never ``bytes``: the client copies a
  ``bytes`` key (and a ``str`` key, through UTF-8) as a C string, so it is
  cut at the first NUL byte; a string key that contains NUL is sent as a
  ``bytearray`` of its UTF-8 (a blob key: its digest carries another type
  byte, so it can collide with no ``str`` key).
- Bins: ``f0``, ``f1``, ... for the version's features in order (bin names
  are capped at 15 bytes), plus ``_et`` newest event time, ``_wt`` write time,
  ``_vu`` valid until and ``_vv`` view version (epoch ms ints). Values are
  native: int, float, str, a list of those (``list<T>``), a list of
  ``[value, count]`` lists (``top_k<T>``). A null is a missing bin.

Writes and reads
----------------
``batch_write``/``batch_read`` in chunks of at most the server's
``batch-max-requests`` (read when the store opens; 1,000 at most), with the
parent policy's ``concurrent`` set so that a batch across N nodes is N
parallel round trips. A batch call does not raise for single-record
failures, so the call's own result (batch-level codes: a batch too large,
queues full) and then every record's result code are checked. Retryable
codes (timeouts, no response, connection and node errors, cluster changes,
hot keys) are retried with capped exponential backoff until
``retry_budget_s`` (60 s) has passed since the first failure: longer than a
node restart. Retrying a write is safe even when it is *in doubt*: a record
is a function of the view state, so writing it again gives the same record.
Records that still fail raise :class:`AerospikeWriteError` after every other
record of the call was written. Every client exception that leaves the store
is a :class:`AerospikeStoreError` (a ``StoreError``) with the client's code.
``get_views`` reads several views (a feature service's) in one batch across
their sets. The per-record work runs for every record of every call, so it
is compiled: a read record's dict by a function generated per view version
(``_generated``), a write's ``Write`` record and operations by one C loop
over the call's columns (``batchwrite``).

Long because the client's and the server's behaviour it relies on (result
codes, policies, key types, Community Edition's deletes) is written down
beside the code that relies on it.
"""
import asyncio
import concurrent.futures
import copy
import math
import random
import threading
import time

import numpy as np

from tally.core.record import INT64_MAX, INT64_MIN, ViewSchema
from tally.service.store import StoreError
from tally.service.store.batchwrite import write_records

META_SUFFIX = "_meta"
META_LAYOUT = 2
EVENT_TIME_BIN, WRITE_TIME_BIN, VALID_UNTIL_BIN, VIEW_VERSION_BIN = "_et", "_wt", "_vu", "_vv"
MAX_SET_NAME_BYTES = 63        # AS_SET_MAX_SIZE 64 with the NUL (C client as_key.h)
MAX_CHUNK = 1000               # records per batch call when the server sets no lower limit
META_UPDATE_ATTEMPTS = 100     # generation conflicts in a row before giving up

# TTL values of the write policy (aerospike.TTL_* in 19.x).
TTL_NEVER_EXPIRE = 0xFFFFFFFF
OPERATOR_WRITE = 1             # aerospike.OPERATOR_WRITE, a literal in generated code

# Result codes (as_status.h of the C client the 19.x wheels embed).
OK = 0
RECORD_NOT_FOUND = 2
GENERATION_ERROR = 3
RECORD_EXISTS = 5
NAMESPACE_NOT_FOUND = 20
FAIL_FORBIDDEN = 22
BATCH_DISABLED, BATCH_MAX_REQUESTS_EXCEEDED, BATCH_QUEUES_FULL = 150, 151, 152
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
    32,     # XDR_KEY_BUSY
    BATCH_QUEUES_FULL,
})
CODE_NAMES = {
    -16: "BATCH_FAILED", -15: "NO_RESPONSE", -14: "MAX_ERROR_RATE", -12: "MAX_RETRIES_EXCEEDED",
    -10: "CONNECTION", -8: "INVALID_NODE", -7: "NO_MORE_CONNECTIONS", -2: "PARAM", -1: "CLIENT",
    1: "SERVER", 2: "RECORD_NOT_FOUND", 3: "GENERATION", 4: "REQUEST_INVALID",
    5: "RECORD_EXISTS", 7: "CLUSTER_CHANGE", 8: "SERVER_FULL", 9: "TIMEOUT", 11: "CLUSTER",
    12: "BIN_INCOMPATIBLE_TYPE", 13: "RECORD_TOO_BIG", 14: "RECORD_BUSY", 18: "DEVICE_OVERLOAD",
    20: "NAMESPACE_NOT_FOUND", 21: "BIN_NAME", 22: "FAIL_FORBIDDEN", 32: "XDR_KEY_BUSY",
    150: "BATCH_DISABLED", 151: "BATCH_MAX_REQUESTS_EXCEEDED", 152: "BATCH_QUEUES_FULL",
}
_HINTS = {
    FAIL_FORBIDDEN: "a view with an online_expiry needs the namespace to set nsup-period > 0 "
                    "(or allow-ttl-without-nsup true)",
    13: "the record is larger than the namespace's max-record-size",
    NAMESPACE_NOT_FOUND: "the namespace is not configured on the cluster",
    BATCH_DISABLED: "the server has batch commands disabled",
}

SERVICE_PREFIX = "_service:"

def code_name(code):
    return CODE_NAMES.get(code, str(code))


class AerospikeStoreError(StoreError, RuntimeError):
    """The server or client refused a command (``code`` says why)."""

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


def parse_hosts(hosts, tls_name=None):
    """``"h:p"``, ``"h1:p1,h2:p2"``, ``"[::1]:3000"`` or a list of those or of
    ``(host, port)`` tuples -> ``[(host, port[, tls_name]), ...]`` (port 3000
    if none)."""
    if isinstance(hosts, str):
        hosts = [h for h in hosts.split(",") if h.strip()]
    result = []
    for host in hosts:
        if isinstance(host, (tuple, list)):
            addr, port = str(host[0]), int(host[1])
        else:
            host = host.strip()
            if host.startswith("["):                       # [ipv6]:port
                addr, _, rest = host[1:].partition("]")
                port = rest.lstrip(":") or "3000"
            elif host.count(":") == 1:
                addr, port = host.split(":")
            else:
                addr, port = host, "3000"
            try:
                port = int(port)
            except ValueError:
                raise StoreError(f"Aerospike host {host!r}: the port must be a number "
                                 "(write host:port)") from None
        result.append((addr, port) if tls_name is None else (addr, port, tls_name))
    if not result:
        raise StoreError("no Aerospike hosts given: write aerospike://host:port/namespace")
    return result


def ttl_of(expiry_ms):
    """A view's ``online_expiry`` (ms; 0 = never) -> the records' TTL in whole
    seconds, rounded up (a record never expires before its expiry)."""
    if not expiry_ms:
        return TTL_NEVER_EXPIRE
    return max(1, math.ceil(expiry_ms / 1000))


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


def _key_list(keys):
    return keys.tolist() if isinstance(keys, np.ndarray) else list(keys)


def user_keys(key_type, keys):
    """``user_key`` of every key, as a list; a list of Python ints in range
    (what a lookup sends, and what ``ndarray.tolist`` gives) is checked
    in C-speed passes instead of key by key."""
    keys = _key_list(keys)
    if key_type == "int64":
        if keys and set(map(type, keys)) == {int} and \
                INT64_MIN <= min(keys) and max(keys) <= INT64_MAX:
            return keys
    elif set(map(type, keys)) <= {str} and not any("\x00" in k for k in keys):
        return keys
    return [user_key(key_type, k) for k in keys]


def _last_rows(ukeys):
    """The rows to write when a key repeats (the last of each, in order of
    first appearance); None when none does."""
    try:
        last = dict(zip(ukeys, range(len(ukeys))))
    except TypeError:                        # bytearray keys (str with NUL): unhashable
        last = {(type(k), bytes(k)) if isinstance(k, bytearray) else k: i
                for i, k in enumerate(ukeys)}
    return None if len(last) == len(ukeys) else list(last.values())


# ---- values: the Records contract <-> native bins ------------------------------

def _column(values, n):
    """A Records header field (an array or one value for all) -> n int64s."""
    return np.broadcast_to(np.asarray(values, dtype=np.int64), (n,))


def _to_bins(dtype, column, valid):
    """A Records column -> one bin value per row (None where not valid)."""
    if dtype in ("int64", "float64"):
        out = np.asarray(column, dtype=dtype).tolist()
    elif dtype.startswith("top_k<"):
        out = [None if v is None else [[item, int(count)] for item, count in v]
               for v in column]
    elif dtype.startswith("list<"):                  # a list as it is: the client only reads it
        out = [v if v is None or type(v) is list else list(v) for v in column]
    else:                                            # string
        out = list(column)
    valid = np.asarray(valid, dtype=bool)
    if not valid.all():
        for i in np.flatnonzero(~valid).tolist():
            out[i] = None
    return out


HEADER_FIELDS = (("_event_time", EVENT_TIME_BIN), ("_write_time", WRITE_TIME_BIN),
                 ("_valid_until", VALID_UNTIL_BIN), ("_view_version", VIEW_VERSION_BIN))


def _top_k(value):
    return None if value is None else list(map(tuple, value))


def _generated(signature, body, helpers=()):
    """A function compiled from source, once per view version, for the
    per-record work of reads: a dict display of constant keys and bin names
    is built in about half the time of any loop over the features (and
    decoding is most of a lookup's own cost)."""
    namespace = dict(helpers)
    exec(f"def generated({signature}):\n    " + "\n    ".join(body) + "\n", namespace)
    return namespace["generated"]


def _compile_decoder(schema, bins):
    """``decode(bins) -> record dict`` (the dicts LMDB returns). Only this
    store writes a version's set, with that version's types, so bin values
    are taken as they are (int, float, str, a list of those) but for top_k's
    pairs, which LMDB gives as tuples. The writer stores no sentinel (a null,
    no event time, no expiry: a missing bin), so a missing bin reads None."""
    fields = []
    for (name, dtype), b in zip(schema.features, bins):
        value = f"get({b!r})"
        fields.append(f"{name!r}: _top_k({value})" if dtype.startswith("top_k<")
                      else f"{name!r}: {value}")
    fields += [f"{name!r}: get({b!r})" for name, b in HEADER_FIELDS]
    return _generated("bins", ["get = bins.get", f"return {{{', '.join(fields)}}}"],
                      {"_top_k": _top_k})


def _write_op(bin_name, value=None):
    """A write of ``value`` to a bin (a nil one, None, deletes it)."""
    return {"op": OPERATOR_WRITE, "bin": bin_name, "val": value}


class _Version:
    """One view version as the pointer record describes it. A record's
    operations are a write of every bin: ``op_templates`` (the features',
    then the event time's and the valid-until's, each record's value set in
    a copy: see ``batchwrite``), then the write time's (one per call, as in
    Records) and ``version_op``, shared by every record of a call."""
    __slots__ = ("schema", "set_name", "ttl", "bins", "decode", "op_templates", "version_op")

    def __init__(self, schema, set_name, expiry_ms):
        self.schema, self.set_name, self.ttl = schema, set_name, ttl_of(expiry_ms)
        self.bins = [f"f{i}" for i in range(len(schema.features))]
        self.decode = _compile_decoder(schema, self.bins)
        self.op_templates = [_write_op(b) for b in self.bins + [EVENT_TIME_BIN,
                                                                 VALID_UNTIL_BIN]]
        self.version_op = _write_op(VIEW_VERSION_BIN, schema.version)


class _Pointer:
    """A cache of a view's pointer record. A version unchanged since the
    ``previous`` cache keeps its ``_Version`` (and so its compiled decoder):
    readers re-read the pointer every ``meta_refresh_s``."""
    __slots__ = ("served", "versions", "read_at")

    def __init__(self, view, bins, previous=None):
        self.served = bins.get("cur") or None
        self.versions = {}
        known = previous.versions if previous is not None else {}
        for version, entry in (bins.get("vers") or {}).items():
            schema = ViewSchema(view, int(version), entry["key"],
                                tuple((str(n), str(t)) for n, t in entry["features"]))
            found = known.get(int(version))
            if found is None or (found.schema, found.set_name, found.ttl) != (
                    schema, entry["set"], ttl_of(entry.get("exp", 0))):
                found = _Version(schema, entry["set"], entry.get("exp", 0))
            self.versions[int(version)] = found
        self.read_at = time.monotonic()


def _entry(schema, set_name, expiry_ms):
    return {"features": [[name, dtype] for name, dtype in schema.features],
            "key": schema.key_type, "set": set_name, "exp": int(expiry_ms)}


def _error_code(error):
    code = getattr(error, "code", None)
    return code if isinstance(code, int) else None


def _wrap(error, what):
    """A client exception -> AerospikeStoreError naming the command and code."""
    if isinstance(error, StoreError):
        return error
    code = _error_code(error)
    hint = f" ({_HINTS[code]})" if code in _HINTS else ""
    return AerospikeStoreError(f"{what}: {error}{hint}", code)


class AerospikeStore:
    """The online store on an Aerospike cluster; see the module docstring."""

    def __init__(self, hosts, namespace, set_prefix="tally_", *, chunk_size=None,
                 retry_budget_s=60.0, backoff_ms=50, backoff_max_ms=2000,
                 write_timeout_ms=2000, read_timeout_ms=1000, socket_timeout_ms=None,
                 meta_refresh_s=1.0, executor_workers=8, config=None, client=None):
        """``hosts``: see :func:`parse_hosts`. ``chunk_size``: records per
        batch call (default: the server's ``batch-max-requests``, at most
        1,000). ``retry_budget_s``: how long retryable failures are retried
        (the sleeps grow from ``backoff_ms`` to ``backoff_max_ms``).
        ``write_timeout_ms``/``read_timeout_ms``: each call's ``total_timeout``;
        ``socket_timeout_ms`` (default: a quarter of it) lets the client retry
        within a call. ``meta_refresh_s``: how stale a reader's view of the
        pointer records may be. ``config`` is merged into the client config
        (``user``, ``password``, ``tls``, ``policies``...). ``client``: an
        already-built client (tests pass a fake one)."""
        if chunk_size is not None and not 1 <= chunk_size <= 5000:
            raise ValueError("chunk_size must be between 1 and 5000")
        if not retry_budget_s >= 0:
            raise ValueError("retry_budget_s must be 0 or more")
        self.namespace = namespace
        self.set_prefix = set_prefix
        self.meta_set = set_prefix + META_SUFFIX
        _check_set_name(self.meta_set)
        self.retry_budget_s = float(retry_budget_s)
        self.backoff_ms, self.backoff_max_ms = backoff_ms, backoff_max_ms
        self.meta_refresh_s = meta_refresh_s
        self.stats = {"batch_calls": 0, "retried": 0, "in_doubt": 0, "failed": 0}
        self._sleep = time.sleep
        self._lock = threading.Lock()
        self._pointers = {}
        self._as = aerospike = _client_module()
        from aerospike_helpers.batch.records import BatchRecords, Write
        self._BatchRecords, self._Write = BatchRecords, Write
        self.write_policy = _policy(write_timeout_ms, socket_timeout_ms, 1)
        self.write_policy["key"] = aerospike.POLICY_KEY_SEND
        self.read_policy = _policy(read_timeout_ms, socket_timeout_ms, 2)
        self.batch_read_policy = dict(self.read_policy, concurrent=True)
        self.batch_write_policy = dict(_policy(write_timeout_ms, socket_timeout_ms, 1),
                                       concurrent=True)
        self.client = client if client is not None else self._connect(hosts, config)
        try:
            self._check_namespace()
            self.chunk_size = chunk_size or self._server_batch_limit()
        except BaseException:
            self.client.close()
            raise
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=executor_workers, thread_name_prefix="tally-aerospike")

    def _connect(self, hosts, config):
        config = dict(config or {})
        client_config = {
            "hosts": parse_hosts(hosts, config.pop("tls_name", None)),
            "policies": {"batch": dict(self.batch_read_policy),
                         "batch_parent_write": dict(self.batch_write_policy),
                         "read": dict(self.read_policy), "write": dict(self.write_policy)},
            "validate_keys": True,
        }
        for name, value in config.items():
            if name == "policies":       # merge per policy, keeping our timeouts
                for kind, policy in value.items():
                    client_config["policies"].setdefault(kind, {}).update(policy)
            else:
                client_config[name] = value
        try:
            return self._as.client(client_config)    # connects now; raises if it cannot
        except Exception as error:  # noqa: BLE001 - every client error carries .code
            hosts_text = ", ".join(f"{h[0]}:{h[1]}" for h in client_config["hosts"])
            raise _wrap(error, f"cannot connect to Aerospike at {hosts_text} (is the "
                        "server up, and are the host, port, TLS and user right?)") from error

    def _info(self, command):
        """{node: answer} of an info command on every node."""
        try:
            answers = self.client.info_all(command)
        except Exception as error:  # noqa: BLE001
            raise _wrap(error, f"info {command!r}") from error
        out = {}
        for node, answer in answers.items():
            error, text = answer if isinstance(answer, tuple) else (None, answer)
            if error is None and text is not None:
                out[node] = text.split("\t", 1)[-1].strip()
        return out

    def _check_namespace(self):
        """A wrong namespace fails here, once, rather than as a retried write."""
        known = set()
        for text in self._info("namespaces").values():
            known.update(n for n in text.split(";") if n)
        if self.namespace not in known:
            raise AerospikeStoreError(
                f"Aerospike namespace {self.namespace!r} does not exist; the cluster has "
                f"{sorted(known)}: name one of them in the store URL", NAMESPACE_NOT_FOUND)

    def _server_batch_limit(self):
        limits = [MAX_CHUNK]
        for text in self._info("get-config:context=service").values():
            value = _info_fields(text).get("batch-max-requests")
            if value and value.isdigit() and int(value) > 0:
                limits.append(int(value))
        return min(limits)

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
        it (durability then follows the namespace's storage settings)."""

    # -- views ------------------------------------------------------------

    def register_view(self, schema: ViewSchema, current=True, expiry_ms=0):
        """Record a view version (its schema, its own set, ``expiry_ms`` as its
        records' TTL); ``current=False`` registers a candidate, served once
        promoted. Registering a version again with the same features is a
        no-op (its expiry may change); with other features, an error."""
        if not schema.view or schema.view.startswith("_"):
            raise StoreError(f"view name {schema.view!r}: names starting with '_' are "
                             "reserved")
        view, version = schema.view, schema.version

        def change(bins):
            entry = bins["vers"].get(version)
            if entry is None:
                entry = bins["vers"][version] = _entry(schema, self._new_set(view, bins),
                                                       expiry_ms)
            elif _Pointer(view, {"vers": {version: entry}}).versions[version].schema != schema:
                raise StoreError(f"view {view!r} v{version} is already registered with other "
                                 "features; register the change as a new version")
            entry["exp"] = int(expiry_ms)
            if current:
                bins["cur"] = version
            return bins
        self._update_pointer(view, change, create=True)

    def promote(self, view, version):
        """Serve ``version`` of ``view`` from now on: one write of the pointer."""
        def change(bins):
            if version not in bins["vers"]:
                raise StoreError(f"view {view!r} has no version {version} in this store")
            bins["cur"] = version
            return bins
        self._update_pointer(view, change)

    def schema(self, view, version=None) -> ViewSchema:
        return self._version(view, version).schema

    def views(self):
        """The views with a served version (a query of the small pointer set)."""
        found = []

        def run():
            found.clear()
            query = self.client.query(self.namespace, self.meta_set)
            query.select("view", "cur")
            query.foreach(lambda record: found.append(record[2] or {}),
                          {"total_timeout": self.read_policy["total_timeout"] * 10})
        self._retry_single(run, "list views")
        return sorted(b["view"] for b in found if b.get("view") and b.get("cur"))

    def count(self, view, version=None):
        """Records of a view version, from the servers' set statistics (no
        scan): objects on every node over the replication factor. Records
        expired but not yet removed by nsup are counted."""
        set_name = self._version(view, version).set_name
        objects = sum(int(_info_fields(text, ":").get("objects", 0))
                      for text in self._info(f"sets/{self.namespace}/{set_name}").values())
        factors = [int(_info_fields(text).get("effective_replication_factor", 1) or 1)
                   for text in self._info(f"namespace/{self.namespace}").values()]
        return objects // max(1, min(factors, default=1))

    def truncate(self, view):
        """Empty the served version of ``view``: it moves to a new, empty set
        (a durable pointer write); the old set is truncated to free memory."""
        old = []

        def change(bins):
            version = bins.get("cur")
            if not version:
                raise StoreError(f"view {view!r} has no served version")
            old.append(bins["vers"][version]["set"])
            bins["vers"][version]["set"] = self._new_set(view, bins)
            return bins
        self._update_pointer(view, change)
        self._free_sets(old)

    def drop_view(self, view):
        """Forget every version of ``view`` (a durable pointer write; its sets
        are truncated to free memory and are never read again)."""
        old = []

        def change(bins):
            old.extend(entry["set"] for entry in bins["vers"].values())
            bins["vers"], bins["cur"] = {}, 0
            return bins
        self._update_pointer(view, change)
        self._free_sets(old)

    def _free_sets(self, sets):
        for set_name in sets:
            try:
                self.client.truncate(self.namespace, set_name, 0)
            except Exception as error:  # noqa: BLE001 - only memory is at stake
                if _error_code(error) not in RETRYABLE:
                    raise _wrap(error, f"truncate set {set_name!r}") from error

    def _new_set(self, view, bins):
        set_name = f"{self.set_prefix}{view}_{bins['next']}"
        _check_set_name(set_name)
        bins["next"] += 1
        return set_name

    # -- the pointer records ----------------------------------------------

    def _meta_key(self, view):
        return (self.namespace, self.meta_set, view)

    def _read_pointer(self, view):
        """(bins, generation) of the view's pointer record; (None, 0) if none."""
        def call():
            try:
                _, meta, bins = self.client.get(self._meta_key(view), dict(self.read_policy))
            except Exception as error:  # noqa: BLE001 - client exceptions carry .code
                if _error_code(error) == RECORD_NOT_FOUND:
                    return None, 0
                raise
            if bins.get("layout") != META_LAYOUT:
                raise StoreError(f"view {view!r}: pointer record layout {bins.get('layout')!r} "
                                 f"is not {META_LAYOUT}; use a new set_prefix")
            return bins, meta["gen"]
        return self._retry_single(call, f"read the pointer of view {view!r}")

    def _update_pointer(self, view, change, create=False):
        """Read, ``change(bins) -> bins``, write back if the record has not
        changed since (generation check), else again."""
        aerospike = self._as
        for _ in range(META_UPDATE_ATTEMPTS):
            bins, generation = self._read_pointer(view)
            if bins is None:
                if not create:
                    raise StoreError(f"unknown view {view!r}; known views: {self.views()}")
                bins = {"view": view, "layout": META_LAYOUT, "cur": 0, "vers": {}, "next": 1}
            bins = change(copy.deepcopy(bins))
            policy = dict(self.write_policy, ttl=TTL_NEVER_EXPIRE)
            if generation:
                policy["gen"] = aerospike.POLICY_GEN_EQ
            else:
                policy["exists"] = aerospike.POLICY_EXISTS_CREATE
            try:
                self._retry_single(lambda: self.client.put(
                    self._meta_key(view), bins, meta={"gen": generation}, policy=policy),
                    f"update the pointer of view {view!r}", passthrough=(GENERATION_ERROR,
                                                                         RECORD_EXISTS))
            except Exception as error:  # noqa: BLE001
                if _error_code(error) in (GENERATION_ERROR, RECORD_EXISTS):
                    continue                     # another process changed it: again
                raise
            with self._lock:
                self._pointers[view] = _Pointer(view, bins, self._pointers.get(view))
            return
        raise AerospikeStoreError(f"view {view!r}: the pointer record kept changing under "
                                  f"{META_UPDATE_ATTEMPTS} updates", GENERATION_ERROR)

    def _pointer(self, view, fresh=False):
        pointer = self._pointers.get(view)
        if fresh or pointer is None or time.monotonic() - pointer.read_at > self.meta_refresh_s:
            bins, _ = self._read_pointer(view)
            pointer = _Pointer(view, bins or {}, pointer)
            with self._lock:
                self._pointers[view] = pointer
        return pointer

    def _version(self, view, version=None):
        """The ``_Version`` served (or ``version``), re-reading the pointer
        when it is stale or lacks what is asked."""
        pointer = self._pointer(view)
        wanted = pointer.served if version is None else version
        if wanted not in pointer.versions:
            pointer = self._pointer(view, fresh=True)
            wanted = pointer.served if version is None else version
        found = pointer.versions.get(wanted)
        if found is None:
            if not pointer.versions:
                raise StoreError(f"unknown view {view!r}; known views: {self.views()}")
            raise StoreError(f"view {view!r} has no version {version} in this store"
                             if version is not None else f"view {view!r} has no served version")
        return found

    # -- feature services -------------------------------------------------
    # Stored in the metadata set under "_service:<name>" (view names never
    # start with "_"), in bins "service" and "service_name"; views() lists
    # only records with a "view" bin.

    def put_service(self, name, definition):
        self._retry_single(lambda: self.client.put(
            self._meta_key(SERVICE_PREFIX + name),
            {"service": bytearray(definition), "service_name": name},
            policy=dict(self.write_policy, ttl=TTL_NEVER_EXPIRE)),
            f"store feature service {name!r}")

    def service(self, name):
        def call():
            try:
                return self.client.get(self._meta_key(SERVICE_PREFIX + name),
                                       dict(self.read_policy))[2]
            except Exception as error:  # noqa: BLE001 - client exceptions carry .code
                if _error_code(error) == RECORD_NOT_FOUND:
                    return None
                raise
        bins = self._retry_single(call, f"read feature service {name!r}")
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
        def call():
            try:
                self.client.remove(self._meta_key(SERVICE_PREFIX + name))
            except Exception as error:  # noqa: BLE001 - client exceptions carry .code
                if _error_code(error) != RECORD_NOT_FOUND:
                    raise
        self._retry_single(call, f"drop feature service {name!r}")

    # -- writes -----------------------------------------------------------

    def write(self, view, keys, records, version=None):
        """Put one record per key (:class:`tally.core.record.Records`) into the
        served version or ``version``; of a key given twice, the later row
        wins (as with LMDB's putmulti). Raises AerospikeWriteError if some
        records still fail after the retries (the others are written)."""
        target = self._version(view, version)
        n = len(keys)
        if not n:
            return
        ukeys = user_keys(target.schema.key_type, keys)
        event_time = _column(records.event_time, n)
        valid_until = _column(records.valid_until, n)
        columns = [_to_bins(dtype, *records.values[name])
                   for name, dtype in target.schema.features]
        columns += [_to_bins("int64", event_time, event_time != INT64_MIN),
                    _to_bins("int64", valid_until, valid_until != INT64_MAX)]
        rows = _last_rows(ukeys)
        failures = self._write_records(self._batch_records(target, ukeys, columns,
                                                           records.write_time, rows))
        if failures:
            self.stats["failed"] += len(failures)
            key_list = _key_list(keys)
            raise AerospikeWriteError(
                view, [(key_list[i if rows is None else rows[i]], code, doubt)
                       for i, (code, doubt) in sorted(failures.items())],
                n - len(failures) if rows is None else len(rows) - len(failures))

    def _batch_records(self, target, ukeys, columns, write_time, rows):
        """The client's ``Write`` of every row (``rows``, or all if None): a
        record's bin values are ``columns[j][row]`` in the order of
        ``target.op_templates``, its TTL the version's, its key sent."""
        template = self._Write(None, None, policy={"ttl": target.ttl,
                                                   "key": self._as.POLICY_KEY_SEND})
        return write_records(self._Write, template.__dict__, self.namespace, target.set_name,
                             ukeys, columns, target.op_templates,
                             (_write_op(WRITE_TIME_BIN, int(write_time)), target.version_op),
                             rows)

    def _write_records(self, writes):
        """Batch-write the client's ``Write`` records; ``{i: (code,
        in_doubt)}`` of those that failed for good. A record sent again (a
        retry) is the same object: the client reads only its key, operations
        and policy, and sets its result anew."""
        BatchRecords = self._BatchRecords

        def send(chunk):
            batch = BatchRecords(writes[chunk.start:chunk.stop] if type(chunk) is range
                                 else [writes[i] for i in chunk])
            self.stats["batch_calls"] += 1
            self.client.batch_write(batch, self.batch_write_policy)
            code = _whole_batch_code(batch, len(chunk))
            if code is not None:         # unanswered writes may have landed
                return dict.fromkeys(chunk, (code, code == -15))
            return {i: (r.result, bool(r.in_doubt))
                    for i, r in zip(chunk, batch.batch_records) if r.result != OK}

        return self._run(len(writes), send, writing=True)

    async def write_async(self, view, keys, records, version=None):
        """``write`` in the store's thread pool, retries included."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.write, view, keys, records,
                                          version)

    # -- reads ------------------------------------------------------------

    def get_many(self, view, keys, version=None):
        """Decoded records for ``keys`` (the same dicts as ``LmdbStore.get``);
        None for entities with no record (or an expired one)."""
        return self._read([(view, self._version(view, version), keys)])[0]

    def get(self, view, key, version=None):
        return self.get_many(view, [key], version)[0]

    def get_views(self, reads):
        """``{view: keys}`` -> ``{view: records}`` of the served versions, in
        one batch call across the views' sets (chunked as ``get_many``): a
        feature service's vector costs one round trip per node, not one per
        view."""
        views = list(reads)
        found = self._read([(view, self._version(view), reads[view]) for view in views])
        return dict(zip(views, found))

    async def get_many_async(self, view, keys, version=None):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.get_many, view, keys, version)

    async def get_views_async(self, reads):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.get_views, reads)

    def _read(self, parts):
        """``[(view, _Version, keys)]`` -> one list of records per part, all
        parts' keys in one batch (every bin is read: a set holds exactly its
        version's bins)."""
        akeys, decoders, ends = [], [], []
        for _, target, keys in parts:
            set_name = target.set_name
            akeys += [(self.namespace, set_name, k) for k in user_keys(target.schema.key_type,
                                                                       keys)]
            decoders += [target.decode] * (len(akeys) - len(decoders))
            ends.append(len(akeys))
        n = len(akeys)
        results = [None] * n

        def send(chunk):
            self.stats["batch_calls"] += 1
            batch = self.client.batch_read(akeys if len(chunk) == n else
                                           [akeys[i] for i in chunk], None,
                                           self.batch_read_policy)
            code = _whole_batch_code(batch, len(chunk))
            if code is not None:
                return dict.fromkeys(chunk, (code, False))
            failed = {}
            for i, record in zip(chunk, batch.batch_records):
                code = record.result
                if code == OK:
                    results[i] = decoders[i](record.record[2])
                elif code != RECORD_NOT_FOUND:
                    failed[i] = (code, False)
            return failed

        failures = self._run(n, send, writing=False) if n else {}
        if failures:
            first = min(failures)
            part = next(j for j, end in enumerate(ends) if first < end)
            view, _, keys = parts[part]
            key = keys[first - (ends[part - 1] if part else 0)]
            code = failures[first][0]
            raise AerospikeReadError(
                f"view {view!r}: {len(failures)} of {n} records could not be read "
                f"(first: key {key!r}, {code_name(code)} ({code}))", code=code)
        return [results[start:end] for start, end in zip([0] + ends, ends)]

    def items(self, view, version=None):
        """Every (entity key, record) of a view version: a scan of its set,
        which works because the keys are stored with the records."""
        target = self._version(view, version)
        found = []

        def run():
            found.clear()
            query = self.client.query(self.namespace, target.set_name)
            query.foreach(lambda record: found.append((record[0][2], record[2])),
                          {"total_timeout": 0})
        self._retry_single(run, f"scan view {view!r}")
        return [(bytes(k).decode() if isinstance(k, (bytes, bytearray)) else k,
                 target.decode(bins or {})) for k, bins in found]

    # -- retries ----------------------------------------------------------

    def _run(self, n, send, writing):
        """Send records 0..n-1 in chunks through ``send(chunk) -> {index:
        (code, in_doubt)}`` of the chunk's records not done (empty when all
        are: the common case costs no loop here), retrying retryable codes
        within the retry budget; returns that map of the records that failed
        for good."""
        pending, failures = range(n), {}
        deadline, attempt = None, 0
        while pending:
            retry, start = {}, 0
            while start < len(pending):
                chunk_size = self.chunk_size
                chunk = pending[start:start + chunk_size]
                start += len(chunk)
                try:
                    failed = send(chunk)
                except Exception as error:  # noqa: BLE001 - client exceptions carry .code
                    code = _error_code(error)
                    if code != BATCH_MAX_REQUESTS_EXCEEDED and not self._retryable(code):
                        raise _wrap(error, "batch command") from error
                    doubt = writing and bool(getattr(error, "in_doubt", False))
                    failed = dict.fromkeys(chunk, (code, doubt))
                if failed.get(chunk[0], (OK,))[0] == BATCH_MAX_REQUESTS_EXCEEDED and \
                        chunk_size > 1:
                    self.chunk_size = max(1, chunk_size // 2)   # the server's limit fell
                    failed = dict.fromkeys(chunk, (-15, False))  # so: send again, smaller
                for i, (code, doubt) in failed.items():
                    self.stats["in_doubt"] += doubt
                    if self._retryable(code):
                        retry[i] = (code, doubt)
                    else:
                        failures[i] = (code, doubt)
            if not retry:
                break
            deadline = deadline or time.monotonic() + self.retry_budget_s
            if time.monotonic() >= deadline:
                failures.update(retry)
                break
            attempt += 1
            self.stats["retried"] += len(retry)
            self._backoff(attempt)
            pending = sorted(retry)
        return failures

    def _retryable(self, code):
        """Retryable codes; NAMESPACE_NOT_FOUND only while the client has no
        node at all (a restart: the client then knows no namespace), since the
        namespace was checked when the store opened."""
        if code == NAMESPACE_NOT_FOUND:
            try:
                return not self.client.get_nodes()
            except Exception:  # noqa: BLE001 - a client that cannot say has none
                return True
        return code in RETRYABLE

    def _backoff(self, attempt):
        delay = min(self.backoff_max_ms, self.backoff_ms * 2 ** (attempt - 1))
        if delay > 0:
            self._sleep(delay * random.uniform(0.5, 1.0) / 1000)

    def _retry_single(self, call, what, passthrough=()):
        """``call()`` retried within the budget; client errors leave wrapped
        (codes in ``passthrough`` leave as they are, for the caller)."""
        deadline, attempt = None, 0
        while True:
            try:
                return call()
            except StoreError:
                raise
            except Exception as error:  # noqa: BLE001 - client exceptions carry .code
                code = _error_code(error)
                if code in passthrough:
                    raise
                deadline = deadline or time.monotonic() + self.retry_budget_s
                if not self._retryable(code) or time.monotonic() >= deadline:
                    raise _wrap(error, what) from error
                attempt += 1
                self._backoff(attempt)


def _whole_batch_code(batch, n):
    """The code of a batch call that failed as a whole (a batch-level code
    such as BATCH_MAX_REQUESTS_EXCEEDED, or records missing from the
    answer), for every record of it; None if each record has its own."""
    if batch.result in (BATCH_MAX_REQUESTS_EXCEEDED, BATCH_QUEUES_FULL, BATCH_DISABLED):
        return batch.result
    if len(batch.batch_records) != n:
        return batch.result if batch.result not in (OK, None, -16) else -15
    return None


def _info_fields(text, separator=";"):
    """'a=1;b=2' -> {'a': '1', 'b': '2'}."""
    fields = {}
    for part in text.replace(";", separator).split(separator):
        name, _, value = part.partition("=")
        if name:
            fields[name.strip()] = value.strip()
    return fields


def _client_module():
    try:
        import aerospike
    except ImportError as error:
        raise StoreError("the Aerospike store needs the official client: "
                         "pip install 'tally[aerospike]' (aerospike 19)") from error
    return aerospike


def _policy(total_ms, socket_ms, max_retries):
    if socket_ms is None:
        socket_ms = max(1, total_ms // 4)
    return {"total_timeout": int(total_ms), "socket_timeout": int(min(socket_ms, total_ms)),
            "max_retries": int(max_retries)}


def _check_set_name(name):
    encoded = name.encode()
    if len(encoded) > MAX_SET_NAME_BYTES or not name or ":" in name or ";" in name:
        raise StoreError(f"set name {name!r}: at most {MAX_SET_NAME_BYTES} bytes, "
                         "no ':' or ';' (shorten the view name or set_prefix)")
