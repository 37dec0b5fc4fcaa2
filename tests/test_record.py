"""The online record layout and the LMDB store, against hand-built expectations."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from tally.service.store.lmdb import LmdbStore, StoreError
from tally.core.record import (HEADER, INT64_MAX, INT64_MIN, RecordError, Records, ViewSchema,
                               decode_key, decode_record, decode_records, encode_keys,
                               encode_records)

SCHEMA = ViewSchema("v", 3, "int64", (("n", "int64"), ("total", "float64"), ("avg", "float64")))


def records(values, event_time=(5, INT64_MIN), valid_until=(INT64_MAX, 100)):
    return encode_records(SCHEMA, values, np.array(event_time), 77, np.array(valid_until))


def test_layout_byte_by_byte():
    rows = records({"n": (np.array([2, 0]), np.array([True, True])),
                    "total": (np.array([1.5, 0.0]), np.array([True, True])),
                    "avg": (np.array([0.75, np.nan]), np.array([True, False]))})
    assert [len(r) for r in rows] == [32 + 8 + 24] * 2 == [SCHEMA.fixed_size] * 2
    first = rows[0]
    assert HEADER.unpack_from(first) == (1, 0, 3, 3, 5, 77, INT64_MAX)
    assert first[32:40] == b"\0" * 8                       # no nulls
    assert struct.unpack_from("<qdd", first, 40) == (2, 1.5, 0.75)
    second = rows[1]
    assert second[32] == 0b100                              # feature 2 (avg) is null
    assert decode_record(SCHEMA, second) == {
        "n": 0, "total": 0.0, "avg": None, "_event_time": None, "_write_time": 77,
        "_valid_until": 100, "_view_version": 3}


def test_int_keys_sort_numerically_and_round_trip():
    keys = [-(1 << 63), -5, -1, 0, 1, 7, (1 << 63) - 1]
    encoded = encode_keys("int64", keys)
    assert encoded == sorted(encoded)
    assert [decode_key("int64", k) for k in encoded] == keys
    assert encode_keys("string", ["ü", "a"]) == ["ü".encode(), b"a"]


def test_wrong_record_is_refused():
    with pytest.raises(RecordError, match="layout version 9"):
        decode_record(SCHEMA, b"\x09" + b"\0" * 63)
    with pytest.raises(RecordError, match="expects 3 and 64"):
        decode_record(SCHEMA, b"\x01\0\x02" + b"\0" * 50)


def test_wrong_record_of_the_right_size_is_refused():
    size = SCHEMA.fixed_size
    with pytest.raises(RecordError, match="layout version 2"):
        decode_record(SCHEMA, b"\x02\0\x03" + b"\0" * (size - 3))
    with pytest.raises(RecordError, match="record has 4 features and 64 bytes"):
        decode_record(SCHEMA, b"\x01\0\x04" + b"\0" * (size - 3))
    with pytest.raises(RecordError, match="shorter than its header"):
        decode_record(SCHEMA, b"\x01\0\x03")


def test_nulls_in_every_bitmap_word():
    """130 features take three bitmap words; nulls on both sides of each
    word boundary, and bits past the last feature (padding) ignored."""
    n = 130
    wide = ViewSchema("w", 1, "int64", tuple((f"f{i}", ("int64", "float64")[i % 2])
                                             for i in range(n)))
    nulls = {0, 1, 63, 64, 65, 127, 128, 129}
    values = {name: (np.array([i], dtype=dtype), np.array([i not in nulls]))
              for i, (name, dtype) in enumerate(wide.features)}
    raw = bytearray(encode_records(wide, values, np.array([INT64_MIN]), 3,
                                   np.array([INT64_MAX]))[0])
    raw[HEADER.size + 16] |= 0b100                       # bit 130: padding
    want = {name: None if i in nulls else (i if dtype == "int64" else float(i))
            for i, (name, dtype) in enumerate(wide.features)}
    want.update(_event_time=None, _write_time=3, _valid_until=None, _view_version=1)
    got = decode_record(wide, bytes(raw))
    assert got == want and list(got) == list(want)
    assert all(type(got[name]) is type(want[name]) for name in want)


def test_decode_records_keeps_absent_ones():
    rows = records({"n": (np.array([2, 0]), np.array([True, False])),
                    "total": (np.array([1.5, 0.0]), np.array([True, True])),
                    "avg": (np.array([0.75, 1.0]), np.array([False, True]))})
    raws = [rows[0], None, memoryview(rows[1])]
    assert decode_records(SCHEMA, raws) == [decode_record(SCHEMA, raws[0]), None,
                                            decode_record(SCHEMA, rows[1])]
    assert decode_records(SCHEMA, raws)[2]["n"] is None
    assert decode_records(SCHEMA, []) == []


def test_lmdb_store_round_trip_and_reader_in_another_process(tmp_path):
    values = {"n": (np.array([1, 2]), np.array([True, True])),
              "total": (np.array([3.0, 4.0]), np.array([True, True])),
              "avg": (np.array([3.0, 2.0]), np.array([True, True]))}
    with LmdbStore(tmp_path) as store:
        store.register_view(SCHEMA)
        store.write("v", np.array([10, -10]),
                    Records(values, np.array([1, 2]), 77, np.array([INT64_MAX, INT64_MAX])))
        assert store.get("v", 10)["total"] == 3.0
        assert store.get("v", 11) is None
        with pytest.raises(StoreError, match="unknown view 'w'"):
            store.get("w", 1)
        # LMDB allows one environment handle per process: read from another one
        # while the writer's environment is still open.
        found = tally_cli("get", "v", "-10", "11", "--store", str(tmp_path))
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert lines[0]["key"] == -10 and lines[0]["features"]["n"] == 2
    assert lines[1] == {"key": 11, "features": None}


def test_cli_get_reports_a_missing_store_and_view(tmp_path):
    missing = tally_cli("get", "v", "1", "--store", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2 and "no online store" in missing.stderr
    with LmdbStore(tmp_path) as store:
        store.register_view(SCHEMA)
    unknown = tally_cli("get", "w", "1", "--store", str(tmp_path), check=False)
    assert unknown.returncode == 2 and "unknown view 'w'" in unknown.stderr


def tally_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "tally", *args], capture_output=True,
                          text=True, check=check, timeout=60)


def test_schema_binary_round_trip():
    schema = ViewSchema("ü", 7, "string", (("a", "float64"), ("bé", "int64")))
    raw = schema.to_bytes()
    assert raw[:8] == bytes([1, 1, 2, 0, 7, 0, 0, 0])
    assert raw[8:] == b"\x01\x01a" + b"\x00\x03b\xc3\xa9"
    assert ViewSchema.from_bytes("ü", raw) == schema


def test_a_candidate_version_is_served_only_after_promotion(tmp_path):
    v1 = ViewSchema("v", 1, "int64", (("n", "int64"),))
    v2 = ViewSchema("v", 2, "int64", (("n", "int64"), ("total", "float64")))
    one = {"n": (np.array([5]), np.array([True]))}
    two = {"n": (np.array([7]), np.array([True])), "total": (np.array([1.5]), np.array([True]))}
    with LmdbStore(tmp_path) as store:
        store.register_view(v1)
        store.write("v", [1], Records(one, np.array([1]), 0, np.array([INT64_MAX])))
        store.register_view(v2, current=False)
        store.write("v", [1], Records(two, np.array([1]), 0, np.array([INT64_MAX])), version=2)
        assert store.get("v", 1)["n"] == 5 and store.schema("v").version == 1
        assert store.get("v", 1, version=2)["total"] == 1.5
        assert store.views() == ["v"]
        store.promote("v", 2)
        assert store.get("v", 1) == store.get("v", 1, version=2)
        assert json.loads(tally_cli("get", "v", "1", "--store", str(tmp_path)).stdout)[
            "features"]["total"] == 1.5
        with pytest.raises(StoreError, match="no version 3"):
            store.promote("v", 3)
