"""The Aerospike online store.

Two kinds of tests:

- Logic tests (run everywhere) drive ``AerospikeStore`` through
  ``FakeAerospikeClient`` below: a FAKE, in-memory stand-in that mimics the
  documented semantics of ``aerospike.Client.batch_write/batch_read/put/get``
  in the official client 19.x, including per-record result codes, ``in_doubt``,
  nil writes deleting bins, TTL refusal without nsup, and keys cut at NUL. It
  takes the real ``aerospike_helpers`` batch record classes and operation
  dicts, so what the store builds is what the real client would receive. It
  proves the store's retry/result-checking, bin mapping, chunking, TTL and
  null handling - not that a server behaves like the fake.
- Integration tests (marker ``aerospike``) run the real client against a real
  server named by ``TALLY_AEROSPIKE=host:port`` (namespace
  ``TALLY_AEROSPIKE_NAMESPACE``, default ``test``) and are skipped otherwise.
  The tests that restart the server live in test_aerospike_server.py.
"""
import asyncio
import os
import subprocess
import threading
import time
from datetime import timedelta

import numpy as np
import pytest

import aerospike
from aerospike_helpers.batch.records import BatchRecord, BatchRecords, Write
from aerospike_helpers.operations import operations as as_ops

from tally.service.store import StoreError, open_store, parse_aerospike_url
from tally.service.store.aerospike import (
    RETRYABLE, TTL_NEVER_EXPIRE, AerospikeReadError, AerospikeStore, AerospikeStoreError,
    AerospikeWriteError, parse_hosts, ttl_of, user_key)
from tally.service.store.lmdb import LmdbStore
from tally.core.record import INT64_MAX, INT64_MIN, Records, ViewSchema

INT64_RANGE = (-(1 << 63), (1 << 63) - 1)
BASE_POLICY_KEYS = {"total_timeout", "socket_timeout", "max_retries", "sleep_between_retries",
                    "timeout_delay", "connect_timeout", "compress", "expressions", "txn"}


# ---------------------------------------------------------------------------
# The fake client (logic tests only)
# ---------------------------------------------------------------------------

class FakeAerospikeError(Exception):
    """Like aerospike.exception.AerospikeError: carries code, msg and in_doubt."""

    def __init__(self, code, msg="", in_doubt=False):
        super().__init__(code, msg)
        self.code, self.msg, self.in_doubt = code, msg, in_doubt


class FakeQuery:
    def __init__(self, client, namespace, set_name):
        self.client, self.namespace, self.set_name = client, namespace, set_name
        self.bins = None

    def select(self, *bins):
        self.bins = list(bins)

    def foreach(self, callback, policy=None, options=None):
        if self.client.closed:
            raise FakeAerospikeError(11, "No connection to aerospike cluster")
        for (ns, set_name, kid), record in list(self.client.data.items()):
            if ns == self.namespace and set_name == self.set_name and self.client._live(record):
                bins = {b: v for b, v in record["bins"].items()
                        if self.bins is None or b in self.bins}
                user = kid[1].decode() if kid[0] == "str" else kid[1]
                key = (ns, set_name, user if record.get("key_sent") else None)
                if callback((key, {"ttl": 0, "gen": record["gen"]}, bins)) is False:
                    break


class FakeAerospikeClient:
    """A FAKE client for logic tests; see the module docstring.

    Failure injection, all keyed by the user key as the store sends it:
    - ``write_failures[key] = [9, 0]``: the key's successive write attempts
      get these result codes (0 = write it); the list is consumed.
    - ``applied_in_doubt``: keys whose first failing attempt is applied
      anyway while it reports a timeout in doubt (a write that landed).
    - ``permanent_write_failures[key] = 13``: every attempt fails so.
    - ``read_failures[key] = [9]``: the same for reads.
    - ``batch_write_raises``: exceptions raised by the next batch_write calls.
    - ``batch_read_truncated``: count of next batch_read calls that return no
      records with overall result 9 (the call failed before its callback).
    - ``max_record_bytes``: a larger record fails with 13 RECORD_TOO_BIG.
    - ``nsup_period = 0``: writes with a TTL fail with 22 FAIL_FORBIDDEN.
    - ``batch_max_requests``: a larger batch fails as a whole with 151 (each
      record -15, as the client reports it).
    """

    def __init__(self, nsup_period=120, max_record_bytes=1 << 20, batch_max_requests=0,
                 namespaces=("test",)):
        self.nsup_period = nsup_period
        self.batch_max_requests = batch_max_requests
        self.namespaces = namespaces
        self.max_record_bytes = max_record_bytes
        self.now = 1_000_000.0
        self.data = {}
        self.write_failures, self.permanent_write_failures = {}, {}
        self.read_failures = {}
        self.applied_in_doubt = set()
        self.batch_write_raises = []
        self.batch_read_truncated = 0
        self.calls = []            # (method, [user keys], policy, thread id)
        self.closed = False

    # -- what the C client does with keys and values --
    @staticmethod
    def key_id(key):
        if not isinstance(key, tuple) or len(key) != 3:
            raise FakeAerospikeError(-2, "key tuple must be (Namespace, Set, Key)")
        ns, set_name, k = key
        if not isinstance(ns, str) or not isinstance(set_name, str):
            raise FakeAerospikeError(-2, "namespace and set must be strings")
        if len(set_name.encode()) > 63:
            raise FakeAerospikeError(-2, "set name too long")
        if isinstance(k, str):      # PyUnicode_AsUTF8String + strdup: cut at NUL
            kid = ("str", k.encode().split(b"\0")[0])
        elif isinstance(k, int):
            if not INT64_RANGE[0] <= k <= INT64_RANGE[1]:
                raise FakeAerospikeError(-2, "integer value for KEY exceeds sys.maxsize")
            kid = ("int", int(k))
        elif isinstance(k, bytearray):
            if not k:
                raise FakeAerospikeError(-2, "Byte array size cannot be 0")
            kid = ("blob", bytes(k))
        elif isinstance(k, bytes):  # strdup of the C string: cut at NUL
            kid = ("str", k.split(b"\0")[0])
        else:
            raise FakeAerospikeError(-2, "key is invalid")
        return (ns, set_name, kid)

    @staticmethod
    def check_value(value):
        # np.float64 subclasses float and passes, as in the real client; other
        # numpy scalars would go to the (absent) Python serializer
        if value is None or isinstance(value, (str, bytes, bytearray, float)):
            return
        if isinstance(value, int):
            if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
                raise FakeAerospikeError(-2, "integer value exceeds sys.maxsize")
            return
        if isinstance(value, list):
            for v in value:
                FakeAerospikeClient.check_value(v)
            return
        if isinstance(value, dict):
            for k, v in value.items():
                FakeAerospikeClient.check_value(k)
                FakeAerospikeClient.check_value(v)
            return
        raise FakeAerospikeError(-1, f"cannot serialize {type(value).__name__}")

    @staticmethod
    def check_bin(name):
        if not isinstance(name, str) or len(name.encode()) > 15:
            raise FakeAerospikeError(21, f"bin name {name!r}")

    @staticmethod
    def check_policy(policy, extra=()):
        if policy is not None:
            bad = set(policy) - BASE_POLICY_KEYS - set(extra)
            if bad:
                raise FakeAerospikeError(-2, f"{bad} invalid policy dictionary keys")

    def ttl_of(self, meta, policy):
        if meta is not None and (set(meta) - {"gen"}):     # the store uses no deprecated meta ttl
            raise FakeAerospikeError(-2, "bad metadata")
        return (policy or {}).get("ttl", 0)

    def _live(self, record):
        return record["void_time"] is None or record["void_time"] > self.now

    def _size(self, bins):
        size = 0
        for name, value in bins.items():
            size += len(name) + (len(value) if isinstance(value, (bytes, bytearray, str)) else 8)
        return size

    def _apply(self, kid, ops, ttl, key_sent=False):
        """Apply write ops as the server does; returns a result code."""
        if ttl not in (0, TTL_NEVER_EXPIRE, aerospike.TTL_DONT_UPDATE,
                       aerospike.TTL_CLIENT_DEFAULT) and self.nsup_period == 0:
            return 22                          # disallowed ttl with nsup-period 0
        record = self.data.get(kid)
        bins = dict(record["bins"]) if record and self._live(record) else {}
        for op in ops:
            if op["op"] != aerospike.OPERATOR_WRITE:
                raise FakeAerospikeError(-2, "the fake supports write ops only")
            if op["val"] is None:              # nil particle: delete the bin
                bins.pop(op["bin"], None)
            else:
                bins[op["bin"]] = op["val"]
        if self._size(bins) > self.max_record_bytes:
            return 13
        if ttl == aerospike.TTL_DONT_UPDATE and record:
            void_time = record["void_time"]
        elif ttl in (0, TTL_NEVER_EXPIRE, aerospike.TTL_CLIENT_DEFAULT):
            void_time = None                   # namespace default-ttl 0: never
        else:
            void_time = self.now + ttl
        generation = record["gen"] + 1 if record and self._live(record) else 1
        self.data[kid] = {"bins": bins, "void_time": void_time, "ttl": ttl, "gen": generation,
                          "key_sent": key_sent}
        return 0

    # -- client API --
    def batch_write(self, batch_records, policy_batch=None):
        if self.closed:
            raise FakeAerospikeError(11, "No connection to aerospike cluster")
        if not isinstance(batch_records, BatchRecords):
            raise FakeAerospikeError(-2, "batch_records must be a BatchRecords instance")
        self.check_policy(policy_batch, {"concurrent", "allow_inline", "allow_inline_ssd",
                                         "respond_all_keys", "replica"})
        prepared = []
        for record in batch_records.batch_records:     # conversion errors raise, as in C
            if not isinstance(record, Write) or not isinstance(record.ops, list) or not record.ops:
                raise FakeAerospikeError(-2, "py_ops_list must be a list of operation dicts")
            kid = self.key_id(record.key)
            for op in record.ops:
                self.check_bin(op["bin"])
                self.check_value(op["val"])
            self.check_policy(record.policy, {"key", "exists", "gen", "commit_level",
                                              "durable_delete", "ttl", "on_locking_only"})
            prepared.append((record, kid, self.ttl_of(record.meta, record.policy)))
        self.calls.append(("batch_write", [r.key[2] for r in batch_records.batch_records],
                           policy_batch, threading.get_ident()))
        if self.batch_write_raises:
            raise self.batch_write_raises.pop(0)
        if self.batch_max_requests and len(prepared) > self.batch_max_requests:
            for record, _, _ in prepared:
                record.result, record.in_doubt = -15, False
            batch_records.result = 151
            return batch_records
        worst = 0
        for record, kid, ttl in prepared:
            user = record.key[2]
            user = bytes(user) if isinstance(user, bytearray) else user
            code = self.permanent_write_failures.get(user)
            if code is None and self.write_failures.get(user):
                code = self.write_failures[user].pop(0)
            in_doubt = False
            if code:
                in_doubt = code in (9, -15)
                if user in self.applied_in_doubt:
                    self.applied_in_doubt.discard(user)
                    self._apply(kid, record.ops, ttl)
            else:
                code = self._apply(kid, record.ops, ttl,
                                   (record.policy or {}).get("key") == aerospike.POLICY_KEY_SEND)
            record.result, record.in_doubt = code, in_doubt
            record.record = (record.key, {"gen": 1, "ttl": ttl}, {}) if code == 0 else None
            if code not in (0, 2, 27):
                worst = -16
        batch_records.result = worst
        return batch_records

    def batch_read(self, keys, bins=None, policy=None):
        if self.closed:
            raise FakeAerospikeError(11, "No connection to aerospike cluster")
        if not isinstance(keys, list):
            raise FakeAerospikeError(-2, "keys should be a list of aerospike key tuples")
        self.check_policy(policy, {"concurrent", "allow_inline", "allow_inline_ssd",
                                   "respond_all_keys", "replica", "read_touch_ttl_percent",
                                   "deserialize", "read_mode_ap", "read_mode_sc"})
        kids = [self.key_id(k) for k in keys]
        self.calls.append(("batch_read", [k[2] for k in keys], policy, threading.get_ident()))
        if self.batch_read_truncated:
            self.batch_read_truncated -= 1
            result = BatchRecords([])
            result.result = 9
            return result
        out = BatchRecords([])
        worst = 0
        for key, kid in zip(keys, kids):
            record = BatchRecord(key)
            user = bytes(key[2]) if isinstance(key[2], bytearray) else key[2]
            code = self.read_failures[user].pop(0) if self.read_failures.get(user) else 0
            stored = self.data.get(kid)
            if code:
                record.result = code
            elif stored is None or not self._live(stored):
                record.result = 2
            else:
                record.result = 0
                record.record = (key, {"gen": 1, "ttl": 0},
                                 {b: v for b, v in stored["bins"].items()
                                  if bins is None or b in bins})
            if record.result not in (0, 2, 27):
                worst = -16
            out.batch_records.append(record)
        out.result = worst
        return out

    def put(self, key, bins, meta=None, policy=None, serializer=None):
        self.check_policy(policy, {"key", "exists", "gen", "commit_level", "durable_delete",
                                   "ttl", "replica", "compression_threshold",
                                   "on_locking_only"})
        for name, value in bins.items():
            self.check_bin(name)
            self.check_value(value)
        policy = policy or {}
        kid = self.key_id(key)
        stored = self.data.get(kid)
        exists = stored is not None and self._live(stored)
        if policy.get("exists") == aerospike.POLICY_EXISTS_CREATE and exists:
            raise FakeAerospikeError(5, "AEROSPIKE_ERR_RECORD_EXISTS")
        if policy.get("gen") == aerospike.POLICY_GEN_EQ and \
                (stored["gen"] if exists else 0) != (meta or {}).get("gen"):
            raise FakeAerospikeError(3, "AEROSPIKE_ERR_RECORD_GENERATION")
        code = self._apply(kid, [{"op": aerospike.OPERATOR_WRITE, "bin": b, "val": v}
                                 for b, v in bins.items()], self.ttl_of(meta, policy))
        if code:
            raise FakeAerospikeError(code, "put failed")

    def get(self, key, policy=None):
        self.check_policy(policy, {"key", "replica", "deserialize", "read_touch_ttl_percent",
                                   "read_mode_ap", "read_mode_sc"})
        record = self.data.get(self.key_id(key))
        if record is None or not self._live(record):
            raise FakeAerospikeError(2, "AEROSPIKE_ERR_RECORD_NOT_FOUND")
        bins = {b: (bytearray(v) if isinstance(v, bytes) else v) for b, v in record["bins"].items()}
        return key, {"gen": record["gen"], "ttl": 0}, bins

    def remove(self, key, meta=None, policy=None):
        if self.data.pop(self.key_id(key), None) is None:
            raise FakeAerospikeError(2, "AEROSPIKE_ERR_RECORD_NOT_FOUND")

    def query(self, namespace, set_name=None):
        return FakeQuery(self, namespace, set_name)

    def truncate(self, namespace, set_name, nanos, policy=None):
        for kid in [k for k in self.data if k[0] == namespace and k[1] == set_name]:
            del self.data[kid]

    def info_all(self, command, policy=None):
        if self.closed:
            raise FakeAerospikeError(11, "No connection to aerospike cluster")
        if command == "namespaces":
            answer = ";".join(self.namespaces)
        elif command == "get-config:context=service":
            answer = f"batch-index-threads=2;batch-max-requests={self.batch_max_requests}"
        elif command.startswith("namespace/"):
            answer = "objects=0;effective_replication_factor=1"
        elif command.startswith("sets/"):
            _, ns, set_name = command.split("/")
            live = sum(1 for k, r in self.data.items()
                       if k[:2] == (ns, set_name) and self._live(r))
            answer = f"objects={live}:tombstones=0:truncate_lut=0" if live else ""
        else:
            raise FakeAerospikeError(-2, f"the fake knows no info command {command!r}")
        return {"BB9000000000001": (None, f"{command}\t{answer}\n")}

    def get_nodes(self):
        return [] if self.closed else [("127.0.0.1", 3000)]

    def close(self):
        self.closed = True

    # -- test helpers --
    def stored(self, namespace, set_name, user):
        record = self.data.get(self.key_id((namespace, set_name, user)))
        return None if record is None or not self._live(record) else record["bins"]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

SCHEMA = ViewSchema("clicks", 3, "int64", (("n", "int64"), ("avg", "float64"),
                                          ("a_much_longer_feature_name", "float64")))
STR_SCHEMA = ViewSchema("users", 1, "string", (("n", "int64"),))
# record layout 2's variable types (the Records contract: object columns)
TYPED_SCHEMA = ViewSchema("typed", 1, "int64", (
    ("name", "string"), ("ids", "list<int64>"), ("scores", "list<float64>"),
    ("tags", "list<string>"), ("top", "top_k<string>"), ("top_ids", "top_k<int64>")))


def sample(schema, n, seed=0):
    """Records with nulls, no-event and no-expiry sentinels."""
    rng = np.random.default_rng(seed)
    values = {}
    for i, (name, dtype) in enumerate(schema.features):
        column = (rng.integers(-10**12, 10**12, n) if dtype == "int64"
                  else rng.normal(size=n))
        valid = np.ones(n, dtype=bool)
        valid[i::3] = False
        values[name] = (column, valid)
    event_time = rng.integers(1, 10**12, n).astype(np.int64)
    event_time[::4] = INT64_MIN
    valid_until = rng.integers(1, 10**12, n).astype(np.int64)
    valid_until[1::4] = INT64_MAX
    return Records(values, event_time, 1_700_000_000_000, valid_until)


def typed_sample(n, seed=0):
    """(Records, the Python values each row must read back as)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(0, 4))
        rows.append({
            "name": f"name-{i}-é" if i % 5 else None,
            "ids": [int(x) for x in rng.integers(-2**63, 2**63 - 1, k, dtype=np.int64)],
            "scores": [float(x) for x in rng.normal(size=k)],
            "tags": [f"t{j}" for j in range(k)] if i % 4 else None,
            "top": [(f"c{j}", int(10 - j)) for j in range(k)],
            "top_ids": [(2**62 + j, j + 1) for j in range(k)]})
    values = {}
    for name, _ in TYPED_SCHEMA.features:
        column = np.empty(n, dtype=object)
        column[:] = [row[name] for row in rows]
        values[name] = (column, np.array([row[name] is not None for row in rows]))
    return Records(values, np.arange(n), 5, np.full(n, INT64_MAX)), rows


def make_store(fake=None, **kwargs):
    fake = fake or FakeAerospikeClient()
    store = AerospikeStore("127.0.0.1:3000", "test", client=fake, **kwargs)
    store.sleeps = []
    store._sleep = store.sleeps.append
    return store, fake


def data_set(store, view, version=None):
    return store._version(view, version).set_name


@pytest.fixture
def fake_store():
    store, fake = make_store()
    store.register_view(SCHEMA)
    yield store, fake
    store.close()


# ---------------------------------------------------------------------------
# Logic tests with the fake client
# ---------------------------------------------------------------------------

def test_records_decode_exactly_like_lmdb(fake_store, tmp_path):
    store, _ = fake_store
    keys = np.arange(-20, 20, dtype=np.int64) * 7919
    records = sample(SCHEMA, len(keys))
    store.write("clicks", keys, records)
    with LmdbStore(tmp_path / "lmdb") as lmdb:
        lmdb.register_view(SCHEMA)
        lmdb.write("clicks", keys, records)
        expected = lmdb.get_many("clicks", keys)
    got = store.get_many("clicks", keys)
    assert got == expected
    assert [list(g) for g in got] == [list(e) for e in expected]     # same key order
    assert any(g["n"] is None for g in got) and any(g["_event_time"] is None for g in got)


def test_variable_types_are_native_bins_and_read_back_as_written(fake_store):
    store, fake = fake_store
    store.register_view(TYPED_SCHEMA)
    records, rows = typed_sample(30)
    store.write("typed", np.arange(30), records)
    got = store.get_many("typed", list(range(30)))
    assert [{name: g[name] for name, _ in TYPED_SCHEMA.features} for g in got] == rows
    stored = fake.stored("test", data_set(store, "typed"), 2)
    assert isinstance(stored["f1"], list) and isinstance(stored["f0"], str)
    assert all(isinstance(pair, list) and len(pair) == 2 for pair in stored["f4"])   # top_k


def test_nulls_are_missing_bins_never_zero(fake_store):
    store, fake = fake_store
    values = {"n": (np.array([7]), np.array([True])),
              "avg": (np.array([1.5]), np.array([True])),
              "a_much_longer_feature_name": (np.array([0.0]), np.array([False]))}
    store.write("clicks", [1], Records(values, [INT64_MIN], 10, [INT64_MAX]))
    stored = fake.stored("test", data_set(store, "clicks"), 1)
    assert "f2" not in stored and "_et" not in stored and "_vu" not in stored
    assert store.get("clicks", 1) == {"n": 7, "avg": 1.5, "a_much_longer_feature_name": None,
                                      "_event_time": None, "_write_time": 10,
                                      "_valid_until": None, "_view_version": 3}
    values["n"] = (np.array([0]), np.array([False]))          # a value that becomes null
    store.write("clicks", [1], Records(values, [5], 11, [20]))
    assert "f0" not in fake.stored("test", data_set(store, "clicks"), 1)


def test_string_keys_never_collide_at_nul():
    store, fake = make_store()
    store.register_view(STR_SCHEMA)
    keys = ["a", "a\x00b", "a\x00c"]
    n = len(keys)
    store.write("users", keys, Records({"n": (np.arange(n), np.ones(n, bool))}, [1] * n, 1,
                                       [INT64_MAX] * n))
    assert [r["n"] for r in store.get_many("users", keys)] == [0, 1, 2]
    assert user_key("string", "a\x00b") == bytearray(b"a\x00b")


def test_any_feature_name_and_repeated_keys_read_back_as_lmdb_does(tmp_path):
    """The per-version generated code spells feature names as literals: quotes,
    backslashes, braces and non-ASCII must survive; a repeated key keeps its
    last row, NUL keys included (they are unhashable bytearrays)."""
    schema = ViewSchema("odd", 1, "string", (("it's", "int64"), ('a"b\\', "float64"),
                                             ("{x}", "top_k<string>"), ("é", "list<int64>")))
    keys = ["k1", "k\x00", "k1", "k2", "k\x00"]
    n = len(keys)
    top = np.empty(n, dtype=object)
    top[:] = [[("a", 2), ("b", 1)], [], None, [("c", 5)], [("d", 1)]]
    ids = np.empty(n, dtype=object)
    ids[:] = [[1, 2], [3], [], None, [2**63 - 1]]
    records = Records({"it's": (np.arange(n) * 10, np.array([1, 1, 0, 1, 1], bool)),
                       'a"b\\': (np.arange(n) / 4, np.ones(n, bool)),
                       "{x}": (top, np.array([v is not None for v in top])),
                       "é": (ids, np.array([v is not None for v in ids]))},
                      np.arange(n) + 1, 7, np.full(n, INT64_MAX))
    store, _ = make_store()
    with LmdbStore(tmp_path / "lmdb") as lmdb:
        for target in (store, lmdb):
            target.register_view(schema)
            target.write("odd", keys, records)
        wanted = ["k1", "k\x00", "k2", "missing"]
        assert store.get_many("odd", wanted) == lmdb.get_many("odd", wanted)
    assert store.get("odd", "k1")["it's"] is None and store.get("odd", "k\x00")["{x}"] == [("d", 1)]


def test_writes_carry_the_ttl_of_the_views_expiry_keys_and_concurrency():
    store, fake = make_store()
    store.register_view(SCHEMA, expiry_ms=90_500)
    store.register_view(STR_SCHEMA)                            # 0: never expires
    writes = []
    real = fake.batch_write
    fake.batch_write = lambda batch, policy=None: (writes.append((batch, policy)),
                                                   real(batch, policy))[1]
    store.write("clicks", [1], sample(SCHEMA, 1))
    store.write("users", ["u"], Records({"n": (np.array([1]), np.array([True]))}, [1], 1,
                                        [INT64_MAX]))
    (clicks, parent), (users, _) = writes
    record = clicks.batch_records[0]
    assert record.meta is None                                  # no deprecated meta ttl
    assert record.policy == {"ttl": 91, "key": aerospike.POLICY_KEY_SEND}
    assert users.batch_records[0].policy["ttl"] == TTL_NEVER_EXPIRE
    assert parent["concurrent"] is True and store.batch_read_policy["concurrent"] is True
    for op in record.ops:
        assert op == as_ops.write(op["bin"], op["val"])
    assert ttl_of(0) == TTL_NEVER_EXPIRE and ttl_of(1) == 1 and ttl_of(30 * 86_400_000) == 2_592_000


def test_the_expiry_of_a_version_can_change_but_not_its_features(fake_store):
    store, fake = fake_store
    store.register_view(SCHEMA, expiry_ms=5000)
    assert store._version("clicks").ttl == 5
    other = ViewSchema("clicks", 3, "int64", (("n", "int64"),))
    with pytest.raises(StoreError, match="new version"):
        store.register_view(other)


def test_timeouts_are_retried_within_the_budget_and_nothing_is_lost(fake_store):
    store, fake = fake_store
    for key in (3, 7, 11):
        fake.write_failures[key] = [9]
    fake.write_failures[7] = [9, -15, 0]
    fake.applied_in_doubt.add(3)     # its first attempt landed although it timed out
    keys = np.arange(20)
    store.write("clicks", keys, sample(SCHEMA, 20))
    batches = [k for method, k, _, _ in fake.calls if method == "batch_write"]
    assert batches[1:] == [[3, 7, 11], [7]]          # only the failed records go again
    assert len(store.sleeps) == 2
    assert store.stats["retried"] == 4 and store.stats["in_doubt"] == 4
    assert all(r is not None for r in store.get_many("clicks", keys))


def test_retries_stop_when_the_budget_is_spent():
    store, fake = make_store(retry_budget_s=0.2, backoff_ms=100, backoff_max_ms=100)
    store._sleep = time.sleep
    store.register_view(SCHEMA)
    fake.write_failures[5] = [9] * 1000
    started = time.monotonic()
    with pytest.raises(AerospikeWriteError) as error:
        store.write("clicks", np.arange(10), sample(SCHEMA, 10))
    assert 0.2 <= time.monotonic() - started < 2
    assert error.value.failures == [(5, 9, True)] and error.value.written == 9
    assert not error.value.permanent                  # the writer waits it out


def test_a_permanent_failure_fails_only_its_record(fake_store):
    store, fake = fake_store
    fake.permanent_write_failures[4] = 13                 # record too big
    with pytest.raises(AerospikeWriteError, match="RECORD_TOO_BIG") as error:
        store.write("clicks", np.arange(8), sample(SCHEMA, 8))
    assert error.value.failures == [(4, 13, False)] and error.value.permanent
    assert store.sleeps == []                              # never retried
    assert [g is None for g in store.get_many("clicks", np.arange(8))] == \
        [k == 4 for k in range(8)]


def test_chunks_follow_the_servers_batch_limit():
    store, fake = make_store(FakeAerospikeClient(batch_max_requests=300))
    assert store.chunk_size == 300
    store.register_view(SCHEMA)
    store.write("clicks", np.arange(700), sample(SCHEMA, 700))
    sizes = [len(k) for method, k, _, _ in fake.calls if method == "batch_write"]
    assert sizes == [300, 300, 100]
    # a limit lowered since: the batch-level code halves the chunks, nothing is lost
    fake.batch_max_requests = 120
    store.write("clicks", np.arange(700), sample(SCHEMA, 700, seed=1))
    assert store.chunk_size == 75
    assert store.get_many("clicks", np.arange(700)) == \
        make_oracle_reads(store, sample(SCHEMA, 700, seed=1), 700)


def make_oracle_reads(store, records, n):
    values = {}
    for name, dtype in store.schema("clicks").features:
        column, valid = records.values[name]
        values[name] = [(float(c) if dtype == "float64" else int(c)) if ok else None
                        for c, ok in zip(column, valid)]
    out = []
    for i in range(n):
        row = {name: values[name][i] for name, _ in store.schema("clicks").features}
        et, vu = int(records.event_time[i]), int(records.valid_until[i])
        row.update(_event_time=None if et == INT64_MIN else et,
                   _write_time=int(records.write_time), _view_version=3,
                   _valid_until=None if vu == INT64_MAX else vu)
        out.append(row)
    return out


def test_a_wrong_namespace_fails_at_open_and_is_never_retried():
    with pytest.raises(StoreError, match="namespace 'nope' does not exist.*test"):
        AerospikeStore("127.0.0.1:3000", "nope", client=FakeAerospikeClient())
    store, fake = make_store()
    assert not store._retryable(20)                   # nodes are up: the namespace is gone
    fake.closed = True
    assert store._retryable(20)                       # no node at all: a restart


def test_client_exceptions_leave_wrapped(fake_store):
    store, fake = fake_store
    fake.batch_write_raises.append(FakeAerospikeError(-2, "bad parameter"))
    with pytest.raises(AerospikeStoreError, match="bad parameter") as error:
        store.write("clicks", [1], sample(SCHEMA, 1))
    assert error.value.code == -2
    fake.closed = True
    store.retry_budget_s = 0
    for call in (store.views, lambda: store.count("clicks")):
        with pytest.raises(StoreError):
            call()
    with pytest.raises(StoreError, match="cannot connect to Aerospike at 127.0.0.1:1"):
        AerospikeStore("127.0.0.1:1", "test", config={"connect_timeout": 200})


def test_candidates_have_their_own_set_and_promotion_is_one_pointer_write(fake_store):
    store, fake = fake_store
    store.write("clicks", [1, 2], sample(SCHEMA, 2))
    served = store.get_many("clicks", [1, 2])
    v4 = ViewSchema("clicks", 4, "int64", (("avg", "float64"), ("fresh", "int64")))
    store.register_view(v4, current=False)
    assert data_set(store, "clicks", 4) != data_set(store, "clicks", 3)
    store.write("clicks", [2, 3], sample(v4, 2, seed=9), version=4)
    reader, _ = make_store(fake)
    assert reader.get_many("clicks", [1, 2]) == served and reader.schema("clicks") == SCHEMA
    store.promote("clicks", 4)
    reader._pointers.clear()                            # as after meta_refresh_s
    got = reader.get_many("clicks", [1, 2, 3])
    assert got[0] is None and all(g["_view_version"] == 4 for g in got[1:])
    assert reader.get_many("clicks", [1], version=3) == served[:1]   # still readable by version
    with pytest.raises(StoreError, match="no version 9"):
        store.promote("clicks", 9)


def test_a_reader_rereads_the_pointer_when_it_is_stale_or_lacks_a_version(fake_store):
    store, fake = fake_store
    reader, _ = make_store(fake, meta_refresh_s=3600)
    assert reader.schema("clicks") == SCHEMA
    v4 = ViewSchema("clicks", 4, "int64", (("fresh", "int64"),))
    store.register_view(v4)
    assert reader.schema("clicks") == SCHEMA            # within meta_refresh_s: the cache
    assert reader.schema("clicks", 4) == v4             # unknown version: read again
    assert reader.schema("clicks") == v4


def test_pointer_updates_are_generation_checked(fake_store):
    store, fake = fake_store
    other, _ = make_store(fake)
    real_get = fake.get
    raced = []

    def get_then_race(key, policy=None):
        answer = real_get(key, policy)
        if not raced and key[1] == store.meta_set:    # another process registers in between
            raced.append(True)
            other.register_view(ViewSchema("clicks", 5, "int64", (("z", "int64"),)),
                                current=False)
        return answer

    fake.get = get_then_race
    store.register_view(ViewSchema("clicks", 4, "int64", (("y", "int64"),)), current=False)
    fake.get = real_get
    store._pointers.clear()
    versions = store._pointer("clicks").versions
    assert sorted(versions) == [3, 4, 5]                # neither registration was lost
    assert len({v.set_name for v in versions.values()}) == 3


def test_drop_and_truncate_are_pointer_writes_and_old_records_stay_unread(fake_store):
    store, fake = fake_store
    store.write("clicks", [1, 2], sample(SCHEMA, 2))
    old_set = data_set(store, "clicks")
    saved = dict(fake.data)
    store.truncate("clicks")
    assert store.get_many("clicks", [1, 2]) == [None, None] and store.count("clicks") == 0
    fake.data.update(saved)                             # a cold restart brings them back
    assert store.get_many("clicks", [1, 2]) == [None, None]
    store.drop_view("clicks")
    assert store.views() == []
    with pytest.raises(StoreError, match="unknown view"):
        store.get("clicks", 1)
    store.register_view(SCHEMA)                         # again: a new set, never an old one
    assert data_set(store, "clicks") != old_set
    assert store.get_many("clicks", [1, 2]) == [None, None]


def test_count_reads_set_statistics_not_records(fake_store):
    store, fake = fake_store
    store.write("clicks", np.arange(25), sample(SCHEMA, 25))
    assert store.count("clicks") == 25
    assert not any(method == "batch_read" for method, *_ in fake.calls)


def test_keys_are_stored_so_a_set_can_be_listed(fake_store):
    store, _ = fake_store
    store.write("clicks", [4, 9], sample(SCHEMA, 2))
    assert sorted(k for k, _ in store.items("clicks")) == [4, 9]
    assert dict(store.items("clicks"))[9] == store.get("clicks", 9)


def test_async_wrappers_run_off_the_event_loop(fake_store):
    store, fake = fake_store

    async def main():
        loop_thread = threading.get_ident()
        await store.write_async("clicks", [1], sample(SCHEMA, 1))
        got = await store.get_many_async("clicks", [1, 2])
        return loop_thread, got

    loop_thread, got = asyncio.run(main())
    assert got[0] is not None and got[1] is None
    assert all(thread != loop_thread for *_, thread in fake.calls)


def write_three_views(store, lmdb, n=40):
    """The same records of three views (int64 and string keys, numbers and
    every variable type) into ``store`` and into ``lmdb``, the oracle;
    returns the reads of a feature service: some keys of each, absent ones
    included."""
    typed, _ = typed_sample(n, seed=3)
    writes = {"clicks": (SCHEMA, np.arange(n) * 3, sample(SCHEMA, n, seed=1)),
              "users": (STR_SCHEMA, [f"u{i}" for i in range(n)], sample(STR_SCHEMA, n, seed=2)),
              "typed": (TYPED_SCHEMA, np.arange(n), typed)}
    for target in (store, lmdb):
        for view, (schema, keys, records) in writes.items():
            target.register_view(schema)
            target.write(view, keys, records)
    return {"clicks": [0, 3, 4, 117, 3], "users": ["u5", "nobody", "u0"],
            "typed": list(range(n - 3, n + 2))}


def test_a_multi_view_read_is_one_batch_and_reads_what_was_written(fake_store, tmp_path):
    store, fake = fake_store
    with LmdbStore(tmp_path / "lmdb") as lmdb:
        reads = write_three_views(store, lmdb)
        expected = {view: lmdb.get_many(view, keys) for view, keys in reads.items()}
    fake.calls.clear()
    assert store.get_views(reads) == expected
    batches = [keys for method, keys, _, _ in fake.calls if method == "batch_read"]
    assert batches == [[k for keys in reads.values() for k in keys]]      # one call
    assert store.get_views({}) == {}


def test_a_multi_view_read_is_chunked_within_the_batch_limit(tmp_path):
    store, fake = make_store(FakeAerospikeClient(batch_max_requests=4))
    with LmdbStore(tmp_path / "lmdb") as lmdb:
        reads = write_three_views(store, lmdb)
        expected = {view: lmdb.get_many(view, keys) for view, keys in reads.items()}
    fake.calls.clear()
    fake.read_failures[3] = [9]                 # one timeout: only that record is sent again
    assert store.get_views(reads) == expected
    sizes = [len(keys) for method, keys, _, _ in fake.calls if method == "batch_read"]
    assert max(sizes) <= 4 and sum(sizes) == sum(map(len, reads.values())) + 1


def test_a_multi_view_read_names_the_view_of_a_key_that_failed(tmp_path):
    store, fake = make_store(retry_budget_s=0)
    with LmdbStore(tmp_path / "lmdb") as lmdb:
        reads = write_three_views(store, lmdb)
    fake.read_failures["u0"] = [9]
    with pytest.raises(AerospikeReadError, match="view 'users'.*key 'u0', TIMEOUT"):
        store.get_views(reads)


def test_the_lookup_servers_remote_store_reads_a_service_in_one_batch(fake_store, tmp_path):
    from tally.service.lookup.service import RemoteStore
    store, fake = fake_store
    with LmdbStore(tmp_path / "lmdb") as lmdb:
        reads = write_three_views(store, lmdb)
        expected = {view: lmdb.get_many(view, keys) for view, keys in reads.items()}

    class OneViewAtATime:                 # a store with no multi-view read
        def __init__(self, store):
            self.get_many_async = store.get_many_async
    fake.calls.clear()
    assert asyncio.run(RemoteStore(store, "fake", owned=False).get_views(reads)) == expected
    assert [m for m, *_ in fake.calls] == ["batch_read"]
    fake.calls.clear()
    assert asyncio.run(RemoteStore(OneViewAtATime(store), "fake", owned=False)
                       .get_views(reads)) == expected
    assert [m for m, *_ in fake.calls] == ["batch_read"] * 3


def test_a_reread_pointer_keeps_the_compiled_decoders(fake_store):
    store, _ = fake_store
    before = store._version("clicks")
    assert store._pointer("clicks", fresh=True).versions[3] is before
    store.register_view(SCHEMA, expiry_ms=5000)            # its TTL changed: a new one
    assert store._version("clicks") is not before and store._version("clicks").ttl == 5


@pytest.mark.aerospike
@pytest.mark.skipif(not os.environ.get("TALLY_AEROSPIKE"), reason="set TALLY_AEROSPIKE=host:port")
def test_a_multi_view_read_on_the_real_server(tmp_path):
    import uuid
    url = (f"aerospike://{os.environ['TALLY_AEROSPIKE']}/"
           f"{os.environ.get('TALLY_AEROSPIKE_NAMESPACE', 'test')}"
           f"?set_prefix=m{uuid.uuid4().hex[:8]}_&chunk_size=4")
    with open_store(url) as store, LmdbStore(tmp_path / "lmdb") as lmdb:
        reads = write_three_views(store, lmdb)
        expected = {view: lmdb.get_many(view, keys) for view, keys in reads.items()}
        calls = store.stats["batch_calls"]
        assert store.get_views(reads) == expected
        assert store.stats["batch_calls"] - calls == 4           # 13 keys in chunks of 4
        assert asyncio.run(store.get_views_async(reads)) == expected


def test_parse_hosts():
    assert parse_hosts("a:1,b:2") == [("a", 1), ("b", 2)]
    assert parse_hosts("[::1]:3100,c") == [("::1", 3100), ("c", 3000)]
    assert parse_hosts("a:1", tls_name="x") == [("a", 1, "x")]
    with pytest.raises(StoreError, match="port"):
        parse_hosts("a:b")


def test_store_urls(monkeypatch):
    hosts, namespace, options = parse_aerospike_url(
        "aerospike://h1:3000,h2:3001/bar?set_prefix=p_&retry_budget_s=90&read_timeout_ms=50"
        "&tls_name=tn&tls_cafile=/ca.pem&chunk_size=200")
    assert (hosts, namespace) == ("h1:3000,h2:3001", "bar")
    assert options == {"set_prefix": "p_", "retry_budget_s": 90.0, "read_timeout_ms": 50,
                       "chunk_size": 200,
                       "config": {"tls_name": "tn", "tls": {"cafile": "/ca.pem",
                                                            "enable": True}}}
    monkeypatch.setenv("TALLY_AEROSPIKE_PASSWORD", "s3cret")
    _, _, options = parse_aerospike_url("aerospike://ann@h:3000/test?auth_mode=external")
    assert options["config"]["user"] == "ann" and options["config"]["password"] == "s3cret"
    assert options["config"]["policies"] == {"auth_mode": aerospike.AUTH_EXTERNAL}
    for url, message in [("aerospike://h:3000/", "namespace"),
                         ("aerospike://h/test?retry=1", "unknown option 'retry'"),
                         ("aerospike://h/test?chunk_size=x", "chunk_size='x' is not a int"),
                         ("aerospike://a:pw@h/test", "no password in the URL"),
                         ("lmdb://relative/path", "lmdb:///absolute/path"),
                         ("redis://h/1", "scheme 'redis' is unknown")]:
        with pytest.raises(StoreError, match=message):
            open_store(url)


def test_retryable_codes_exclude_permanent_ones():
    for code in (2, 4, 13, 20, 21, 22, 151, -2):
        assert code not in RETRYABLE
