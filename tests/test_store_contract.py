"""The OnlineStore contract: one suite, run over every store backend.

Each backend must give back exactly what was written (an independent oracle:
the columns themselves, decoded by hand here), None for an unknown entity
and for a null feature, and the header fields with their sentinels. LMDB runs
always; Aerospike runs on the fake client of test_aerospike_store and, with
``TALLY_AEROSPIKE=host:port``, on a real server.
"""
import os
import uuid

import numpy as np
import pytest

from tally.core.record import INT64_MAX, INT64_MIN, Records, ViewSchema
from tally.service.store import OnlineStore, RecordRefused, StoreError, open_store

SCHEMA = ViewSchema("contract", 1, "int64", (("n", "int64"), ("avg", "float64")))
VARIABLE_SCHEMA = ViewSchema("contract_v", 1, "int64", (
    ("n", "int64"), ("name", "string"), ("recent", "list<int64>"), ("lengths", "list<float64>"),
    ("tags", "list<string>"), ("top_ids", "top_k<int64>"), ("top_len", "top_k<float64>"),
    ("top_tags", "top_k<string>")))
STRING_SCHEMA = ViewSchema("contract_s", 1, "string", (("n", "int64"),))


def _lmdb(tmp_path):
    return open_store(f"lmdb://{tmp_path / 'store'}")


def _aerospike_fake(tmp_path):
    from test_aerospike_store import make_store
    return make_store()[0]


def _aerospike_server(tmp_path):
    address = os.environ.get("TALLY_AEROSPIKE")
    if not address:
        pytest.skip("set TALLY_AEROSPIKE=host:port")
    return open_store(f"aerospike://{address}/test?set_prefix=c{uuid.uuid4().hex[:8]}_")


BACKENDS = {"lmdb": _lmdb, "aerospike-fake": _aerospike_fake,
            "aerospike-server": _aerospike_server}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path):
    store = BACKENDS[request.param](tmp_path)
    yield store
    store.close()


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    counts, avgs = rng.integers(-10**12, 10**12, n), rng.normal(size=n)
    valid = rng.random(n) > 0.3
    event_time = rng.integers(1, 10**12, n)
    event_time[::5] = INT64_MIN
    valid_until = rng.integers(1, 10**12, n)
    valid_until[1::5] = INT64_MAX
    values = {"n": (counts, np.ones(n, bool)), "avg": (avgs, valid)}
    return Records(values, event_time, 1_700_000_000_000, valid_until)


def _expected(records, i):
    """What a lookup of entity i must return: by hand, from the columns."""
    n_values, _ = records.values["n"]
    avg_values, avg_valid = records.values["avg"]
    event_time, valid_until = int(records.event_time[i]), int(records.valid_until[i])
    return {"n": int(n_values[i]), "avg": float(avg_values[i]) if avg_valid[i] else None,
            "_event_time": None if event_time == INT64_MIN else event_time,
            "_write_time": 1_700_000_000_000,
            "_valid_until": None if valid_until == INT64_MAX else valid_until,
            "_view_version": 1}


def test_is_an_online_store(store):
    assert isinstance(store, OnlineStore)


def test_written_records_read_back_exactly(store):
    store.register_view(SCHEMA)
    keys = np.arange(-50, 150, 2)
    records = _records(len(keys))
    store.write("contract", keys, records)
    got = store.get_many("contract", [int(k) for k in keys])
    assert got == [_expected(records, i) for i in range(len(keys))]
    assert store.get("contract", int(keys[7])) == _expected(records, 7)


def test_unknown_entities_are_none_and_rewrites_win(store):
    store.register_view(SCHEMA)
    store.write("contract", [1, 2], _records(2, seed=1))
    newer = _records(2, seed=2)
    store.write("contract", [2, 3], newer)
    assert store.get("contract", 4) is None
    assert store.get_many("contract", [3, 2]) == [_expected(newer, 1), _expected(newer, 0)]


def test_string_keys(store):
    store.register_view(STRING_SCHEMA)
    keys = ["a", "é", "with space", "x" * 300]
    n = len(keys)
    store.write("contract_s", keys, Records({"n": (np.arange(n), np.ones(n, bool))},
                                            np.arange(n), 5, np.full(n, INT64_MAX)))
    got = store.get_many("contract_s", keys + ["missing"])
    assert [r and r["n"] for r in got] == [0, 1, 2, 3, None]


def test_schema_views_and_count(store):
    store.register_view(SCHEMA)
    store.write("contract", np.arange(10), _records(10))
    assert store.schema("contract") == SCHEMA
    assert "contract" in store.views()
    assert store.count("contract") == 10


def test_unknown_views_are_store_errors(store):
    with pytest.raises(StoreError):
        store.schema("no_such_view")
    store.flush()                                # a no-op or a sync: never an error


def test_feature_services_are_stored_beside_the_views(store):
    store.register_view(SCHEMA)
    first, second = b"tally-service 1 rank 1\nn contract n user\n", \
        b"tally-service 1 rank 2\navg contract avg user\n"
    store.put_service("rank", first)
    store.put_service("other", second)
    assert store.service("rank") == first
    store.put_service("rank", second)                 # a new version replaces it
    assert store.service("rank") == second
    assert sorted(store.services()) == ["other", "rank"]
    assert "contract" in store.views() and "rank" not in store.views()
    store.drop_service("other")
    store.drop_service("never_stored")                # no error
    assert store.services() == ["rank"]
    with pytest.raises(StoreError, match="unknown feature service 'other'"):
        store.service("other")


WORDS = ["", "a", "é", "🙂 x", "x" * 200]


def _variable_value(dtype, rng):
    """A random value of a variable type, by an independent recipe: the
    expected lookup result is this very object."""
    if dtype == "string":
        return WORDS[int(rng.integers(len(WORDS)))]
    count = int(rng.choice([0, 1, 4, 50]))
    item = dtype[dtype.index("<") + 1:-1]
    items = {"int64": lambda: rng.integers(-2**63, 2**63 - 1, size=count).tolist(),
             "float64": lambda: rng.normal(size=count).tolist(),
             "string": lambda: [WORDS[i] for i in rng.integers(0, len(WORDS), size=count)]}[item]()
    if dtype.startswith("list<"):
        return items
    return list(zip(items, rng.integers(1, 10**9, size=count).tolist()))


def _variable_records(n, seed=0):
    rng = np.random.default_rng(seed)
    values = {"n": (rng.integers(-10**12, 10**12, n), rng.random(n) > 0.2)}
    for name, dtype in VARIABLE_SCHEMA.features[1:]:
        column = np.empty(n, dtype=object)
        column[:] = [_variable_value(dtype, rng) for _ in range(n)]
        values[name] = (column, rng.random(n) > 0.2)
    return Records(values, rng.integers(1, 10**12, n), 1_700_000_000_000, np.full(n, INT64_MAX))


def _expected_variable(records, i):
    result = {}
    for name, dtype in VARIABLE_SCHEMA.features:
        values, valid = records.values[name]
        result[name] = (int(values[i]) if dtype == "int64" else values[i]) if valid[i] else None
    result.update(_event_time=int(records.event_time[i]), _write_time=1_700_000_000_000,
                  _valid_until=None, _view_version=1)
    return result


def test_strings_lists_and_top_k_read_back_exactly(store):
    store.register_view(VARIABLE_SCHEMA)
    keys = np.arange(-40, 40)
    records = _variable_records(len(keys))
    store.write("contract_v", keys, records)
    got = store.get_many("contract_v", [int(k) for k in keys] + [999])
    assert got == [_expected_variable(records, i) for i in range(len(keys))] + [None]
    assert store.schema("contract_v") == VARIABLE_SCHEMA
