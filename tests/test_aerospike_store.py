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
  The restart test also needs ``TALLY_AEROSPIKE_RESTART_CMD`` (a shell command
  that restarts the server, e.g. ``docker restart aerospike``) and a namespace
  with persistent storage.
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

from tally.service.store.aerospike import (
    RETRYABLE, TTL_NEVER_EXPIRE, AerospikeReadError, AerospikeStore, AerospikeStoreError,
    AerospikeWriteError, parse_hosts, ttl_seconds, user_key)
from tally.service.store.lmdb import LmdbStore, StoreError
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
        for (ns, set_name, kid), record in list(self.client.data.items()):
            if ns == self.namespace and set_name == self.set_name and self.client._live(record):
                bins = {b: v for b, v in record["bins"].items()
                        if self.bins is None or b in self.bins}
                if callback((None, {"ttl": 0, "gen": 1}, bins)) is False:
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
    """

    def __init__(self, nsup_period=120, max_record_bytes=1 << 20):
        self.nsup_period = nsup_period
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

    def ttl_of(self, meta):
        if meta is None:
            return 0
        if set(meta) - {"ttl", "gen"} or not isinstance(meta.get("ttl", 0), int):
            raise FakeAerospikeError(-2, "bad metadata")
        return meta.get("ttl", 0)

    def _live(self, record):
        return record["void_time"] is None or record["void_time"] > self.now

    def _size(self, bins):
        size = 0
        for name, value in bins.items():
            size += len(name) + (len(value) if isinstance(value, (bytes, bytearray, str)) else 8)
        return size

    def _apply(self, kid, ops, ttl):
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
        self.data[kid] = {"bins": bins, "void_time": void_time}
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
            prepared.append((record, kid, self.ttl_of(record.meta)))
        self.calls.append(("batch_write", [r.key[2] for r in batch_records.batch_records],
                           policy_batch, threading.get_ident()))
        if self.batch_write_raises:
            raise self.batch_write_raises.pop(0)
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
                code = self._apply(kid, record.ops, ttl)
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
        code = self._apply(self.key_id(key), [{"op": aerospike.OPERATOR_WRITE, "bin": b, "val": v}
                                               for b, v in bins.items()], self.ttl_of(meta))
        if code:
            raise FakeAerospikeError(code, "put failed")

    def get(self, key, policy=None):
        self.check_policy(policy, {"key", "replica", "deserialize", "read_touch_ttl_percent",
                                   "read_mode_ap", "read_mode_sc"})
        record = self.data.get(self.key_id(key))
        if record is None or not self._live(record):
            raise FakeAerospikeError(2, "AEROSPIKE_ERR_RECORD_NOT_FOUND")
        bins = {b: (bytearray(v) if isinstance(v, bytes) else v) for b, v in record["bins"].items()}
        return key, {"gen": 1, "ttl": 0}, bins

    def remove(self, key, meta=None, policy=None):
        if self.data.pop(self.key_id(key), None) is None:
            raise FakeAerospikeError(2, "AEROSPIKE_ERR_RECORD_NOT_FOUND")

    def query(self, namespace, set_name=None):
        return FakeQuery(self, namespace, set_name)

    def truncate(self, namespace, set_name, nanos, policy=None):
        for kid in [k for k in self.data if k[0] == namespace and k[1] == set_name]:
            del self.data[kid]

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


def sample(schema, n, seed=0):
    """Records arguments with nulls, no-event and no-expiry sentinels."""
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
    return values, event_time, 1_700_000_000_000, valid_until


def make_store(fake=None, **kwargs):
    fake = fake or FakeAerospikeClient()
    store = AerospikeStore("127.0.0.1:3000", "test", client=fake, **kwargs)
    store.sleeps = []
    store._sleep = store.sleeps.append
    return store, fake


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
    records = Records(*sample(SCHEMA, len(keys)))
    store.write("clicks", keys, records)
    with LmdbStore(tmp_path / "lmdb") as lmdb:
        lmdb.register_view(SCHEMA)
        lmdb.write("clicks", keys, records)
        expected = lmdb.get_many("clicks", keys)
    got = store.get_many("clicks", keys)
    assert got == expected
    assert [list(g) for g in got] == [list(e) for e in expected]     # same key order
    assert any(g["n"] is None for g in got) and any(g["_event_time"] is None for g in got)
    assert any(g["_valid_until"] is None for g in got)
    assert store.get("clicks", int(keys[3])) == expected[3]


def test_write_columns_equals_write(fake_store):
    store, fake = fake_store
    args = sample(SCHEMA, 12, seed=3)
    store.write("clicks", list(range(12)), Records(*args))
    by_records = {k: fake.stored("test", "tally_clicks", k) for k in range(12)}
    fake.data.clear()
    store.register_view(SCHEMA)
    store.write_columns("clicks", np.arange(12), *args)
    assert {k: fake.stored("test", "tally_clicks", k) for k in range(12)} == by_records


def test_bin_names_are_short_and_mapped_and_schema_is_stored(fake_store):
    store, fake = fake_store
    store.write("clicks", [5], Records(*sample(SCHEMA, 1, seed=1)))
    assert store.bin_names("clicks") == {"n": "f0", "avg": "f1",
                                         "a_much_longer_feature_name": "f2"}
    stored = fake.stored("test", "tally_clicks", 5)
    assert set(stored) <= {"f0", "f1", "f2", "_et", "_wt", "_vu", "_vv"}
    assert all(len(b.encode()) <= 15 for b in stored)
    meta = fake.stored("test", "tally__meta", "clicks")
    assert bytes(meta["schema"]) == SCHEMA.to_bytes()
    assert meta["names"] == store.bin_names("clicks") and meta["view"] == "clicks"
    # a second store on the same cluster finds the view from the metadata alone
    other, _ = make_store(fake)
    assert other.views() == ["clicks"]
    assert other.schema("clicks") == SCHEMA
    assert other.get("clicks", 5) == store.get("clicks", 5)


def test_ops_are_the_clients_own_write_operations(fake_store):
    store, fake = fake_store
    writes = []
    real_batch_write = fake.batch_write

    def spy(batch, policy=None):
        writes.extend(batch.batch_records)
        return real_batch_write(batch, policy)

    fake.batch_write = spy
    store.write("clicks", [1], Records(*sample(SCHEMA, 1, seed=2)))
    (record,) = writes
    assert isinstance(record, Write) and record.key == ("test", "tally_clicks", 1)
    for op in record.ops:
        assert op == as_ops.write(op["bin"], op["val"])
        assert op["val"] is None or type(op["val"]) in (int, float)    # no numpy scalars


def test_nulls_are_missing_bins_never_zero(fake_store):
    store, fake = fake_store
    values = {"n": (np.array([7]), np.array([True])),
              "avg": (np.array([1.5]), np.array([True])),
              "a_much_longer_feature_name": (np.array([0.0]), np.array([False]))}
    store.write_columns("clicks", [1], values, [INT64_MIN], 10, [INT64_MAX])
    stored = fake.stored("test", "tally_clicks", 1)
    assert "f2" not in stored and "_et" not in stored and "_vu" not in stored
    assert store.get("clicks", 1) == {"n": 7, "avg": 1.5, "a_much_longer_feature_name": None,
                                      "_event_time": None, "_write_time": 10,
                                      "_valid_until": None, "_view_version": 3}
    # a value that becomes null is deleted on the server, not left stale or zeroed
    values["n"] = (np.array([0]), np.array([False]))
    store.write_columns("clicks", [1], values, [5], 11, [20])
    assert "f0" not in fake.stored("test", "tally_clicks", 1)
    got = store.get("clicks", 1)
    assert got["n"] is None and got["_event_time"] == 5 and got["_valid_until"] == 20
    # a record missing bins altogether (written by something else) reads as nulls
    fake.put(("test", "tally_clicks", 2), {"_wt": 3})
    assert store.get("clicks", 2) == {"n": None, "avg": None,
                                      "a_much_longer_feature_name": None, "_event_time": None,
                                      "_write_time": 3, "_valid_until": None,
                                      "_view_version": None}


def test_missing_keys_are_none(fake_store):
    store, _ = fake_store
    store.write("clicks", [1, 3], Records(*sample(SCHEMA, 2)))
    got = store.get_many("clicks", [0, 1, 2, 3, 4])
    assert [g is None for g in got] == [True, False, True, False, True]
    assert store.get_many("clicks", []) == []


def test_string_keys_never_collide_at_nul():
    store, fake = make_store()
    store.register_view(STR_SCHEMA)
    # the fake, like the C client, cuts str and bytes keys at NUL
    assert fake.key_id(("test", "s", "ab\x00cd")) == fake.key_id(("test", "s", "ab"))
    assert fake.key_id(("test", "s", b"ab\x00cd")) == fake.key_id(("test", "s", "ab"))
    assert user_key("string", "ab") == "ab"
    assert user_key("string", "ab\x00cd") == bytearray(b"ab\x00cd")
    keys = ["ab", "ab\x00cd", "ab\x00", "é", ""]
    values = {"n": (np.arange(len(keys)), np.ones(len(keys), bool))}
    store.write_columns("users", keys, values, np.arange(len(keys)), 1, INT64_MAX)
    assert [r["n"] for r in store.get_many("users", keys)] == list(range(len(keys)))
    assert store.count("users") == len(keys)


def test_int_keys_are_python_ints_in_int64_range():
    assert user_key("int64", np.int64(-5)) == -5 and type(user_key("int64", np.int64(1))) is int
    for bad in (1 << 63, 1.5, "12", True):
        with pytest.raises((ValueError, TypeError)):
            user_key("int64", bad)


def test_writes_are_chunked(fake_store):
    store, fake = fake_store
    store.chunk_size = 1000
    n = 2500
    store.write("clicks", np.arange(n), Records(*sample(SCHEMA, n)))
    sizes = [len(keys) for method, keys, _, _ in fake.calls if method == "batch_write"]
    assert sizes == [1000, 1000, 500]
    assert store.count("clicks") == n
    got = store.get_many("clicks", np.arange(n))
    assert [len(keys) for method, keys, _, _ in fake.calls if method == "batch_read"] == \
        [1000, 1000, 500]
    assert all(g is not None for g in got)


def test_duplicate_keys_in_one_write_last_row_wins(fake_store):
    store, fake = fake_store
    values = {"n": (np.array([1, 2, 3]), np.ones(3, bool)),
              "avg": (np.zeros(3), np.ones(3, bool)),
              "a_much_longer_feature_name": (np.zeros(3), np.ones(3, bool))}
    store.write_columns("clicks", [9, 8, 9], values, [1, 1, 1], 1, [1, 1, 1])
    (call,) = [keys for method, keys, _, _ in fake.calls if method == "batch_write"]
    assert sorted(call) == [8, 9]
    assert store.get("clicks", 9)["n"] == 3


def test_policies_carry_timeouts(fake_store):
    store, fake = fake_store
    store.write("clicks", [1], Records(*sample(SCHEMA, 1)))
    store.get("clicks", 1)
    policies = {method: policy for method, _, policy, _ in fake.calls}
    assert policies["batch_write"] == {"total_timeout": 2000, "socket_timeout": 500,
                                       "max_retries": 1}
    assert policies["batch_read"] == {"total_timeout": 1000, "socket_timeout": 250,
                                      "max_retries": 2}
    for policy in policies.values():
        assert policy["socket_timeout"] < policy["total_timeout"]   # lets client retries fire


def test_ttl_meta_per_view():
    assert ttl_seconds(None) == 0
    assert ttl_seconds(-1) == TTL_NEVER_EXPIRE == aerospike.TTL_NEVER_EXPIRE
    assert ttl_seconds(timedelta(hours=1)) == 3600
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError):
            ttl_seconds(bad)
    store, fake = make_store(ttl_by_view={"clicks": 60, "forever": -1})
    metas = []
    real_batch_write = fake.batch_write

    def spy(batch, policy=None):
        metas.extend((r.key[1], r.meta) for r in batch.batch_records)
        return real_batch_write(batch, policy)

    fake.batch_write = spy
    for view in ("clicks", "forever", "plain"):
        store.register_view(ViewSchema(view, 1, "int64", (("n", "int64"),)))
        store.write_columns(view, [1, 2], {"n": (np.array([1, 2]), np.ones(2, bool))},
                            [1, 1], 1, [1, 1])
    assert metas == [("tally_clicks", {"ttl": 60})] * 2 + \
        [("tally_forever", {"ttl": TTL_NEVER_EXPIRE})] * 2 + [("tally_plain", {"ttl": 0})] * 2
    fake.now += 59
    assert store.get("clicks", 1) is not None
    fake.now += 2
    assert store.get("clicks", 1) is None and store.get("forever", 1) is not None
    assert store.get("plain", 1) is not None


def test_ttl_without_nsup_is_refused_with_a_hint():
    store, fake = make_store(FakeAerospikeClient(nsup_period=0), ttl_by_view={"clicks": 60})
    store.register_view(SCHEMA)      # the metadata record never expires: allowed
    with pytest.raises(AerospikeWriteError, match="nsup-period") as error:
        store.write("clicks", [1, 2], Records(*sample(SCHEMA, 2)))
    assert {code for _, code, _ in error.value.failures} == {22}
    assert store.sleeps == []        # not retried: it would never succeed


def test_timeouts_are_retried_and_nothing_is_lost(fake_store):
    store, fake = fake_store
    for key in (3, 7, 11):
        fake.write_failures[key] = [9]
    fake.write_failures[7] = [9, -15, 0]
    fake.applied_in_doubt.add(3)     # its first attempt landed although it timed out
    keys = np.arange(20)
    records = Records(*sample(SCHEMA, 20))
    store.write("clicks", keys, records)
    batches = [k for method, k, _, _ in fake.calls if method == "batch_write"]
    assert batches[1:] == [[3, 7, 11], [7]]          # only the failed records go again
    assert len(store.sleeps) == 2
    assert store.stats["retried"] == 4 and store.stats["in_doubt"] == 4
    assert all(store.get("clicks", int(k)) is not None for k in keys)
    assert store.get_many("clicks", keys) == [store.get("clicks", int(k)) for k in keys]


def test_retries_are_bounded(fake_store):
    store, fake = fake_store
    store.max_attempts = 4
    fake.write_failures[5] = [9] * 10
    with pytest.raises(AerospikeWriteError) as error:
        store.write("clicks", np.arange(10), Records(*sample(SCHEMA, 10)))
    assert error.value.failures == [(5, 9, True)]
    assert error.value.written == 9
    assert len(store.sleeps) == 3
    assert len(fake.write_failures[5]) == 6                # 4 attempts consumed
    assert store.get("clicks", 5) is None and store.get("clicks", 4) is not None


def test_backoff_grows_and_is_capped():
    store, fake = make_store(backoff_ms=100, backoff_max_ms=300, max_attempts=5)
    store.register_view(SCHEMA)
    fake.write_failures[1] = [9, 9, 9, 9]
    store.write("clicks", [1], Records(*sample(SCHEMA, 1)))
    assert len(store.sleeps) == 4
    for sleep, cap in zip(store.sleeps, (0.1, 0.2, 0.3, 0.3)):
        assert cap / 2 <= sleep <= cap


def test_a_permanent_failure_fails_only_its_record(fake_store):
    store, fake = fake_store
    fake.permanent_write_failures[4] = 13                 # record too big
    keys = np.arange(8)
    with pytest.raises(AerospikeWriteError, match="RECORD_TOO_BIG") as error:
        store.write("clicks", keys, Records(*sample(SCHEMA, 8)))
    assert error.value.failures == [(4, 13, False)] and error.value.code == 13
    assert store.sleeps == []                              # never retried
    got = store.get_many("clicks", keys)
    assert [g is None for g in got] == [k == 4 for k in range(8)]


def test_a_record_too_big_for_the_fake_server():
    store, fake = make_store(FakeAerospikeClient(max_record_bytes=250))
    wide = ViewSchema("wide", 1, "int64", tuple((f"x{i}", "int64") for i in range(30)))
    store.register_view(wide)
    n = 3
    values = {name: (np.arange(n), np.array([True, False, True]) if name != "x0"
                     else np.ones(n, bool)) for name, _ in wide.features}
    # row 1 is mostly nulls (missing bins), so only rows 0 and 2 exceed the limit
    with pytest.raises(AerospikeWriteError) as error:
        store.write_columns("wide", [10, 11, 12], values, [1] * n, 1, [1] * n)
    assert [(k, c) for k, c, _ in error.value.failures] == [(10, 13), (12, 13)]
    assert store.get("wide", 11) is not None


def test_exceptions_from_the_call_itself(fake_store):
    store, fake = fake_store
    records = Records(*sample(SCHEMA, 3))
    fake.batch_write_raises.append(FakeAerospikeError(11, "No connection to aerospike cluster"))
    store.write("clicks", [1, 2, 3], records)                # retried as a whole
    assert len(store.sleeps) == 1 and store.get("clicks", 3) is not None
    fake.batch_write_raises.append(FakeAerospikeError(-2, "bad parameter"))
    with pytest.raises(FakeAerospikeError):
        store.write("clicks", [1, 2, 3], records)            # not retryable: raised as is


def test_metadata_commands_are_retried_or_explained():
    store, fake = make_store()
    real_put = fake.put
    outcomes = [FakeAerospikeError(9, "timeout", in_doubt=True), None]

    def flaky_put(*args, **kwargs):
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return real_put(*args, **kwargs)

    fake.put = flaky_put
    store.register_view(SCHEMA)
    assert len(store.sleeps) == 1 and store.schema("clicks") == SCHEMA
    outcomes.append(FakeAerospikeError(22, "Operation not allowed at this time"))
    with pytest.raises(AerospikeStoreError, match="nsup-period") as error:
        store.register_view(SCHEMA)
    assert error.value.code == 22 and len(store.sleeps) == 1
    assert issubclass(AerospikeWriteError, AerospikeStoreError)
    assert issubclass(AerospikeReadError, AerospikeStoreError)


def test_read_failures_are_retried_or_raised(fake_store):
    store, fake = fake_store
    store.write("clicks", [1, 2], Records(*sample(SCHEMA, 2)))
    fake.read_failures[2] = [9]
    assert store.get_many("clicks", [1, 2])[1] is not None
    fake.batch_read_truncated = 1                             # call failed before results
    assert store.get_many("clicks", [1, 2, 3])[2] is None
    assert len(store.sleeps) == 2
    fake.read_failures[1] = [4]
    with pytest.raises(AerospikeReadError, match="REQUEST_INVALID"):
        store.get("clicks", 1)


def test_unknown_and_invalid_views(fake_store):
    store, _ = fake_store
    with pytest.raises(StoreError, match="unknown view 'nope'.*clicks"):
        store.get("nope", 1)
    with pytest.raises(ValueError, match="reserved"):
        store.register_view(ViewSchema("_meta", 1, "int64", ()))
    with pytest.raises(ValueError, match="63 bytes"):
        store.register_view(ViewSchema("v" * 60, 1, "int64", ()))


def test_schema_versions_keep_bins_and_drop_retired_ones(fake_store):
    store, fake = fake_store
    store.write("clicks", [1, 2], Records(*sample(SCHEMA, 2, seed=5)))
    old = store.get("clicks", 2)
    v4 = ViewSchema("clicks", 4, "int64", (("avg", "float64"), ("fresh", "int64")))
    store.register_view(v4)
    assert store.bin_names("clicks") == {"n": "f0", "avg": "f1",
                                         "a_much_longer_feature_name": "f2", "fresh": "f3"}
    # an old record reads under the new schema by feature name
    assert store.get("clicks", 2) == {"avg": old["avg"], "fresh": None,
                                      "_event_time": old["_event_time"],
                                      "_write_time": old["_write_time"],
                                      "_valid_until": old["_valid_until"], "_view_version": 3}
    store.write("clicks", [1], Records(*sample(v4, 1)))
    assert set(fake.stored("test", "tally_clicks", 1)) <= {"f1", "f3", "_et", "_wt", "_vu", "_vv"}
    assert store.get("clicks", 1)["_view_version"] == 4


def test_views_count_truncate_and_drop(fake_store):
    store, _ = fake_store
    store.register_view(STR_SCHEMA)
    assert store.views() == ["clicks", "users"]
    store.write("clicks", np.arange(5), Records(*sample(SCHEMA, 5)))
    assert store.count("clicks") == 5 and store.count("users") == 0
    store.truncate("clicks")
    assert store.count("clicks") == 0 and store.schema("clicks") == SCHEMA
    store.drop_view("users")
    assert store.views() == ["clicks"]


def test_async_wrappers_run_off_the_event_loop(fake_store):
    store, fake = fake_store
    keys = np.arange(50)
    records = Records(*sample(SCHEMA, 50))

    async def main():
        loop_thread = threading.get_ident()
        await asyncio.gather(store.write_async("clicks", keys[:25], records[:25]),
                             store.write_async("clicks", keys[25:], records[25:]))
        got = await store.get_many_async("clicks", keys)
        one = await store.get_async("clicks", 7)
        return loop_thread, got, one

    loop_thread, got, one = asyncio.run(main())
    assert all(g is not None for g in got) and one == got[7]
    assert loop_thread not in {thread for _, _, _, thread in fake.calls}


def test_parse_hosts():
    assert parse_hosts("a:3100") == [("a", 3100)]
    assert parse_hosts("a:1,b") == [("a", 1), ("b", 3000)]
    assert parse_hosts(["[::1]:3001", ("c", 5)]) == [("::1", 3001), ("c", 5)]
    with pytest.raises(ValueError):
        parse_hosts("")


def test_retryable_codes_exclude_permanent_ones():
    assert {9, -15, -10, -8, 11, 14, 18}.issubset(RETRYABLE)
    assert RETRYABLE.isdisjoint({0, 2, 4, 8, 12, 13, 21, 22, -2})


def test_real_client_accepts_the_config_and_fails_only_to_connect():
    """The real client (validate_keys=True) checks every config and policy key
    before connecting; a port with no server then gives ConnectionError -10."""
    with pytest.raises(aerospike.exception.AerospikeError) as error:
        AerospikeStore("127.0.0.1:1", "test")
    assert error.value.code == -10
    with pytest.raises(aerospike.exception.ParamError):
        AerospikeStore("127.0.0.1:1", "test", config={"policies": {"batch": {"total_timout": 1}}})


# ---------------------------------------------------------------------------
# Integration tests against a real server (skipped unless TALLY_AEROSPIKE)
# ---------------------------------------------------------------------------

SERVER = os.environ.get("TALLY_AEROSPIKE")
NAMESPACE = os.environ.get("TALLY_AEROSPIKE_NAMESPACE", "test")
needs_server = pytest.mark.skipif(not SERVER, reason="set TALLY_AEROSPIKE=host:port")


@pytest.fixture
def server_store():
    """A store on fixed test sets (``tallytest_*``: a namespace holds a bounded
    number of set names, so runs reuse them), emptied before and after."""
    prefix = os.environ.get("TALLY_AEROSPIKE_SET_PREFIX", "tallytest_")
    store = AerospikeStore(SERVER, NAMESPACE, set_prefix=prefix, ttl_by_view={"short": 2},
                           max_attempts=8)

    def empty():
        for view in store.views():
            store.drop_view(view)
        time.sleep(0.05)    # truncation spares records written later than its time (ms)

    empty()
    yield store
    empty()
    store.close()


@pytest.mark.aerospike
@needs_server
def test_server_write_read_matches_lmdb(server_store, tmp_path):
    server_store.register_view(SCHEMA)
    n = 3000
    keys = np.arange(n, dtype=np.int64) * 104729 - 10**9
    records = Records(*sample(SCHEMA, n))
    server_store.write("clicks", keys, records)
    with LmdbStore(tmp_path / "lmdb") as lmdb:
        lmdb.register_view(SCHEMA)
        lmdb.write("clicks", keys, records)
        expected = lmdb.get_many("clicks", keys)
    assert server_store.get_many("clicks", keys) == expected
    assert server_store.count("clicks") == n
    assert server_store.views() == ["clicks"]
    # string keys, including one that a str/bytes key would cut at NUL
    server_store.register_view(STR_SCHEMA)
    skeys = ["ab", "ab\x00cd", "é"]
    server_store.write_columns("users", skeys, {"n": (np.arange(3), np.ones(3, bool))},
                               [1, 2, 3], 4, [5, 6, 7])
    assert [r["n"] for r in server_store.get_many("users", skeys)] == [0, 1, 2]


@pytest.mark.aerospike
@needs_server
def test_server_missing_keys_and_nulls(server_store):
    server_store.register_view(SCHEMA)
    values = {"n": (np.array([1, 0]), np.array([True, False])),
              "avg": (np.array([0.5, 0.0]), np.array([True, False])),
              "a_much_longer_feature_name": (np.zeros(2), np.zeros(2, bool))}
    server_store.write_columns("clicks", [1, 2], values, [INT64_MIN, 3], 4, [INT64_MAX, 9])
    got = server_store.get_many("clicks", [1, 2, 3])
    assert got[2] is None
    assert got[1]["n"] is None and got[1]["avg"] is None and got[0]["_event_time"] is None
    values["n"] = (np.array([0, 0]), np.array([False, False]))
    server_store.write_columns("clicks", [1, 2], values, [1, 1], 5, [9, 9])
    assert server_store.get("clicks", 1)["n"] is None          # the bin was deleted


@pytest.mark.aerospike
@needs_server
def test_server_ttl_expiry(server_store):
    server_store.register_view(ViewSchema("short", 1, "int64", (("n", "int64"),)))
    try:
        server_store.write_columns("short", [1, 2], {"n": (np.array([1, 2]), np.ones(2, bool))},
                                   [1, 1], 1, [1, 1])
    except AerospikeWriteError as error:
        if error.code == 22:
            pytest.skip(f"namespace {NAMESPACE!r} has nsup-period 0: {error}")
        raise
    assert server_store.get("short", 1)["n"] == 1
    time.sleep(3.5)
    assert server_store.get_many("short", [1, 2]) == [None, None]


@pytest.mark.aerospike
@needs_server
def test_server_per_record_failure_is_reported_and_others_written(server_store):
    server_store.register_view(SCHEMA)
    records = Records(*sample(SCHEMA, 3))
    server_store.write("clicks", [1, 2, 3], records)
    # larger than any namespace's max-record-size (the write block is at most 8 MiB)
    big = [as_ops.write("pad", b"x" * (10 << 20))]
    good = [("k", i, [as_ops.write("_wt", 7)]) for i in (1, 3)]
    with pytest.raises(AerospikeWriteError) as error:
        server_store.write_bins("clicks", [good[0], ("big", 2, big), good[1]])
    assert [(k, c) for k, c, _ in error.value.failures] == [("big", 13)]
    assert error.value.written == 2
    assert server_store.get("clicks", 1)["_write_time"] == 7
    assert server_store.get("clicks", 3)["_write_time"] == 7


RESTART = os.environ.get("TALLY_AEROSPIKE_RESTART_CMD")


@pytest.mark.aerospike
@needs_server
@pytest.mark.skipif(not RESTART, reason="set TALLY_AEROSPIKE_RESTART_CMD to a restart command")
def test_server_restart_mid_writes_loses_nothing(server_store):
    """Writes keep going through a server restart; bounded retries carry
    them over it (the namespace needs persistent storage)."""
    server_store.max_attempts = 40
    server_store.backoff_max_ms = 1000
    server_store.register_view(SCHEMA)
    n, rounds = 2000, 30
    keys = np.arange(n)
    last = {}
    errors = []

    def writer():
        try:
            for r in range(rounds):
                values, event_time, _, valid_until = sample(SCHEMA, n, seed=r)
                records = Records(values, event_time, r, valid_until)
                server_store.write("clicks", keys, records)
                last["round"] = r
                time.sleep(0.2)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1.0)
    subprocess.run(RESTART, shell=True, check=True, timeout=300)
    thread.join(timeout=600)
    assert not errors, errors
    assert last["round"] == rounds - 1
    got = server_store.get_many("clicks", keys)
    assert all(g is not None and g["_write_time"] == rounds - 1 for g in got)
