"""Tests for tally.core.decode: msgpack-map payloads -> typed numpy columns.

The oracle is ``msgpack.unpackb``: ``_model`` turns its output into the
decoder's documented verdict for one payload (a row, a reject with an exact
reason, or "some reject" when msgpack itself says the bytes are malformed).
"""
import math
import pickle
import re
import struct
import threading

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tally.core.decode as _decode_module
from tally.core.decode import DecodedBatch, DecodeError, Schema, decode_msgpack_maps

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1

# A schema touching every dtype, optional and required, and key encodings:
# fixstr keys of length 7 / 8 / 9 (the 8-byte fast paths), a str8 key
# (> 31 bytes), a str16 key (> 255 bytes) and a non-ASCII key.
LONG8 = "a_field_name_longer_than_thirty_one_bytes"
LONG16 = "k" * 300
FIELDS = [
    ("user", "int64"),
    ("readtime", "float64"),
    ("title", "string"),
    ("flag", "bool"),
    ("opt_int", "int64", False),
    ("opt_flt", "float64", False),
    ("opt_str", "string", False),
    ("opt_bool", "bool", False),
    ("seven77", "int64", False),
    ("eight888", "float64", False),
    ("nine99999", "string", False),
    (LONG8, "int64", False),
    (LONG16, "bool", False),
    ("größe", "string", False),
]
SCHEMA = Schema(FIELDS)
SPEC = {f[0]: (f[1], f[2] if len(f) == 3 else True) for f in FIELDS}

# Every reason the decoder can give (for "it rejected, any reason will do").
REASON_RE = re.compile(
    r"empty payload|not a msgpack map|truncated payload at byte \d+"
    r"|invalid msgpack byte 0xc1 at byte \d+"
    r"|map key at byte \d+ has type \w+, expected str|trailing bytes after map"
    r"|duplicate field '.*'|missing field '.*'|field '.*' has type \w+, expected \w+"
    r"|field '.*' value \d+ is out of range for int64|field '.*' is not valid utf-8"
    r"|payload is not bytes-like \(got \w+\)|payload buffer is not contiguous",
    re.S,
)


# --------------------------------------------------------------------------
# reference model


class _Map(list):
    """A msgpack map as its list of (key, value) pairs, in wire order."""


def _unpack(payload):
    return msgpack.unpackb(payload, raw=False, unicode_errors="surrogateescape",
                           strict_map_key=False, object_pairs_hook=_Map)


def _type_name(v):
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, bytes):
        return "bin"
    if isinstance(v, _Map):
        return "map"
    if isinstance(v, list):
        return "array"
    return "ext"


def _model(payload, spec=SPEC):
    """Expected outcome for one payload: ("row", {name: value or NULL}),
    ("reject", exact reason or compiled regex), ("reject", None) = any
    reason, or ("either", None) when msgpack's own rules differ from ours."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        return "reject", f"payload is not bytes-like (got {type(payload).__name__})"
    payload = bytes(payload)
    if not payload:
        return "reject", "empty payload"
    if not (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF)):
        return "reject", "not a msgpack map"
    trailing = False
    try:
        pairs = _unpack(payload)
    except msgpack.ExtraData as e:
        pairs, trailing = e.unpacked, True
    except ValueError as e:
        # msgpack refuses ext type -1 (timestamp) with a bad length; we skip
        # any ext without looking inside it.
        return ("either", None) if "timestamp" in str(e) else ("reject", None)
    except Exception:
        return "reject", None
    row = {}
    for key, value in pairs:
        if not isinstance(key, str):
            return "reject", re.compile(
                rf"map key at byte \d+ has type {_type_name(key)}, expected str")
        try:
            name = key.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeDecodeError:
            continue                                   # not a schema field
        if name not in spec:
            continue
        if name in row:
            return "reject", f"duplicate field '{name}'"
        dtype, required = spec[name]
        if value is None:
            if required:
                return "reject", f"field '{name}' has type nil, expected {dtype}"
            row[name] = NULL
            continue
        ok = {
            "int64": isinstance(value, int) and not isinstance(value, bool),
            "float64": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "string": isinstance(value, str),
        }[dtype]
        if not ok:
            return "reject", f"field '{name}' has type {_type_name(value)}, expected {dtype}"
        if dtype == "int64" and value > INT64_MAX:
            return "reject", f"field '{name}' value {value} is out of range for int64"
        if dtype == "float64":
            value = float(value)
        if dtype == "string":
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "reject", f"field '{name}' is not valid utf-8"
        row[name] = value
    if trailing:
        return "reject", "trailing bytes after map"
    for name, (dtype, required) in spec.items():
        if name not in row:
            if required:
                return "reject", f"missing field '{name}'"
            row[name] = NULL
    return "row", row


NULL = object()


def _same_float(a, b):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _check_row(batch, r, expected, spec=SPEC):
    for name, (dtype, required) in spec.items():
        got = batch.columns[name][r]
        want = expected[name]
        if required:
            assert name not in batch.valid
        else:
            assert bool(batch.valid[name][r]) == (want is not NULL), name
        if want is NULL:
            if dtype == "float64":
                assert math.isnan(got), name
            elif dtype == "string":
                assert got is None, name
            continue
        if dtype == "float64":
            assert _same_float(float(got), want), (name, got, want)
        elif dtype == "int64":
            assert int(got) == want, (name, got, want)
        elif dtype == "bool":
            assert bool(got) is want, (name, got, want)
        else:
            assert type(got) is str and got == want, (name, got, want)


def _check_batch(payloads, batch, spec=SPEC):
    """The batch agrees with the model on every payload; returns verdicts."""
    verdicts = [_model(p, spec) for p in payloads]
    rejected = dict(batch.rejects)
    assert len(rejected) == len(batch.rejects)
    assert [i for i, _ in batch.rejects] == sorted(rejected)
    assert batch.n_rows + len(rejected) == len(payloads)
    assert len(batch.source_index) == batch.n_rows
    good_rows = {int(i): r for r, i in enumerate(batch.source_index)}
    assert list(good_rows) == sorted(good_rows)
    for i, (kind, want) in enumerate(verdicts):
        if kind == "row":
            assert i in good_rows, (i, payloads[i], rejected.get(i))
            _check_row(batch, good_rows[i], want, spec)
        elif kind == "reject":
            assert i in rejected, (i, payloads[i])
            reason = rejected[i]
            if want is None:
                assert REASON_RE.fullmatch(reason), reason
            elif isinstance(want, re.Pattern):
                assert want.fullmatch(reason), (reason, want)
            else:
                assert reason == want, (payloads[i], reason, want)
        else:
            assert (i in good_rows) != (i in rejected)
    return verdicts


def _decode_both(payloads, schema=SCHEMA):
    """Decode holding the GIL, and releasing it (with default and with tiny
    chunks); all must agree exactly."""
    a = decode_msgpack_maps(payloads, schema, release_gil=False)
    _same_batch(a, decode_msgpack_maps(payloads, schema, release_gil=True))
    saved = _decode_module._NOGIL_CHUNK_PAYLOADS
    _decode_module._NOGIL_CHUNK_PAYLOADS = 2
    try:
        _same_batch(a, decode_msgpack_maps(payloads, schema, release_gil=True))
    finally:
        _decode_module._NOGIL_CHUNK_PAYLOADS = saved
    return a


def _same_batch(a, b):
    assert a.n_rows == b.n_rows
    assert a.rejects == b.rejects
    assert np.array_equal(a.source_index, b.source_index)
    assert list(a.columns) == list(b.columns) and list(a.valid) == list(b.valid)
    for name in a.columns:
        x, y = a.columns[name], b.columns[name]
        assert x.dtype == y.dtype
        if x.dtype == object:
            assert list(x) == list(y)
        else:
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
        if name in a.valid:
            assert np.array_equal(a.valid[name], b.valid[name])


# --------------------------------------------------------------------------
# strategies

INT_BOUNDARIES = [
    0, 1, 31, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, INT64_MAX, 2**63, UINT64_MAX,
    -1, -31, -32, -33, -127, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, INT64_MIN,
]
any_int = st.one_of(st.integers(INT64_MIN, UINT64_MAX), st.sampled_from(INT_BOUNDARIES))
int64s = st.one_of(st.integers(INT64_MIN, INT64_MAX),
                   st.sampled_from([v for v in INT_BOUNDARIES if v <= INT64_MAX]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]))
# strings across fixstr / str8 / str16 lengths (32-bit lengths: explicit tests)
long_text = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "€", "😀"]),
                      st.sampled_from([31, 32, 255, 256]))
texts = st.one_of(st.text(max_size=40), st.text(max_size=40), long_text)
big_bin = st.builds(bytes, st.sampled_from([255, 256]))
binaries = st.one_of(st.binary(max_size=40), big_bin)
exts = st.one_of(
    st.builds(msgpack.ExtType, st.integers(0, 127),
              st.one_of(st.binary(max_size=20), st.just(b"\0" * 256))),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
)
scalars = st.one_of(st.none(), st.booleans(), any_int, floats, texts, binaries, exts)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.builds(lambda c: [c] * 16, st.none()),                                  # array16
        st.dictionaries(st.one_of(st.text(max_size=6), any_int, st.none(), st.booleans()),
                        children, max_size=5),
    ),
    max_leaves=6,
)

GOOD = {
    "int64": int64s,
    "float64": st.one_of(floats, int64s, st.integers(2**63, UINT64_MAX)),
    "string": texts,
    "bool": st.booleans(),
}


@st.composite
def records(draw, allow_bad=True):
    """A dict shaped like SCHEMA: mostly well-typed, sometimes not."""
    items = []
    for name, (dtype, required) in SPEC.items():
        if not required:
            mode = draw(st.sampled_from(["value", "value", "absent", "nil"]))
            if mode == "absent":
                continue
            if mode == "nil":
                items.append((name, None))
                continue
        if allow_bad and draw(st.integers(0, 19)) == 0:
            value = draw(junk)                     # likely a type error
        else:
            value = draw(GOOD[dtype])
        items.append((name, value))
    for k in range(draw(st.sampled_from([0, 0, 1, 2]))):
        items.append((f"x{k}_" + draw(st.text(max_size=4)), draw(junk)))
    if draw(st.integers(0, 7)) == 0:                    # >15 keys: top-level map16
        items.extend((f"pad{k}", k) for k in range(16))
    items = draw(st.permutations(items))
    return dict(items)


def _pack(record, single_float=False):
    if single_float:
        try:
            return msgpack.packb(record, use_single_float=True)
        except OverflowError:                # a double beyond float32 range
            pass
    return msgpack.packb(record)


payloads_st = st.builds(_pack, records(), st.booleans())


# --------------------------------------------------------------------------
# (1) round trip against msgpack.unpackb


@SETTINGS
@given(st.lists(payloads_st, min_size=1, max_size=4))
def test_round_trip_matches_unpackb(payloads):
    batch = _decode_both(payloads)
    verdicts = _check_batch(payloads, batch)
    assert all(kind in ("row", "reject") for kind, _ in verdicts)


@SETTINGS
@given(st.lists(st.builds(_pack, records(allow_bad=False)), min_size=1, max_size=3))
def test_well_typed_records_all_decode(payloads):
    batch = _decode_both(payloads)
    _check_batch(payloads, batch)
    assert batch.n_rows == len(payloads), batch.rejects
    assert batch.columns["user"].dtype == np.int64
    assert batch.columns["readtime"].dtype == np.float64
    assert batch.columns["flag"].dtype == np.bool_
    assert batch.columns["title"].dtype == object
    assert set(batch.valid) == {n for n, (_, req) in SPEC.items() if not req}
    assert all(v.dtype == np.bool_ for v in batch.valid.values())
    assert batch.source_index.dtype == np.int64


@SETTINGS
@given(any_int)
def test_every_int_width(value):
    schema = Schema([("i", "int64"), ("f", "float64")])
    packed_forms = [msgpack.packb({"i": value, "f": value})]
    if value <= INT64_MAX:
        # also the signed encodings, which msgpack never picks for positives
        packed_forms.append(b"\x82\xa1i" + _signed(value) + b"\xa1f" + _signed(value))
    for packed in packed_forms:
        batch = decode_msgpack_maps([packed], schema)
        if value > INT64_MAX:
            assert batch.rejects == [(0, f"field 'i' value {value} is out of range for int64")]
        else:
            assert batch.rejects == []
            assert batch.columns["i"][0] == value
            assert batch.columns["f"][0] == float(value)


def _signed(value):
    for code, fmt in ((0xD0, ">b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q")):
        try:
            return bytes([code]) + struct.pack(fmt, value)
        except struct.error:
            continue
    raise AssertionError(value)


@SETTINGS
@given(floats)
def test_float32_and_float64(value):
    schema = Schema([("f", "float64")])
    for single in (False, True):
        packed = _pack({"f": value}, single)
        batch = decode_msgpack_maps([packed], schema)
        assert _same_float(float(batch.columns["f"][0]), msgpack.unpackb(packed)["f"])


def test_top_level_map16_and_map32():
    schema = Schema([("user", "int64"), ("name", "string")])
    small = {"user": 1, "name": "a", **{f"k{i}": i for i in range(20)}}            # map16
    big = {f"k{i}": [i, {"n": None}] for i in range(70000)}                         # map32
    big.update(user=2, name="b" * 70000)                                            # str32
    payloads = [msgpack.packb(small), msgpack.packb(big)]
    assert payloads[0][0] == 0xDE and payloads[1][0] == 0xDF
    batch = _decode_both(payloads, schema)
    assert batch.rejects == []
    assert batch.columns["user"].tolist() == [1, 2]
    assert batch.columns["name"].tolist() == ["a", "b" * 70000]


def test_example_payload():
    schema = Schema([("user", "int64"), ("article", "int64"), ("readtime", "float64"), ("ts", "int64")])
    p = msgpack.packb({"user": 42, "article": 7, "readtime": 35.2, "ts": 1732780800123})
    batch = decode_msgpack_maps([p, memoryview(p), bytearray(p)], schema)
    assert isinstance(batch, DecodedBatch) and len(batch) == batch.n_rows == 3
    assert batch.columns["user"].tolist() == [42] * 3
    assert batch.columns["article"].tolist() == [7] * 3
    assert batch.columns["readtime"].tolist() == [35.2] * 3
    assert batch.columns["ts"].tolist() == [1732780800123] * 3
    assert batch.valid == {} and batch.rejects == []
    assert batch.source_index.tolist() == [0, 1, 2]


def test_optional_nulls():
    schema = Schema([("id", "int64"), ("i", "int64", False), ("f", "float64", False),
                     ("s", "string", False), ("b", "bool", False)])
    payloads = [
        msgpack.packb({"id": 0}),                                            # absent
        msgpack.packb({"id": 1, "i": None, "f": None, "s": None, "b": None}),  # nil
        msgpack.packb({"id": 2, "i": -5, "f": math.nan, "s": "", "b": False}),
    ]
    batch = _decode_both(payloads, schema)
    assert batch.rejects == []
    assert batch.valid["i"].tolist() == [False, False, True]
    assert batch.valid["f"].tolist() == [False, False, True]    # real NaN is valid
    assert batch.valid["s"].tolist() == [False, False, True]
    assert batch.valid["b"].tolist() == [False, False, True]
    assert batch.columns["i"].tolist() == [0, 0, -5]
    assert np.isnan(batch.columns["f"]).all()
    assert batch.columns["s"].tolist() == [None, None, ""]
    assert batch.columns["b"].tolist() == [False, False, False]


def test_skips_every_extra_value_type():
    schema = Schema([("a", "int64"), ("z", "int64")])
    extras = [None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, "s" * 300, "s" * 70000,
              b"b" * 300, b"b" * 70000, [None] * 20,
              {f"k{i}": i for i in range(20)}, {f"k{i}": i for i in range(70000)},
              [], [1, [2, [3, {"k": [b"x"]}]]], [None] * 70000, {}, {1: 2, (3,): {4: 5}},
              msgpack.ExtType(5, b""), msgpack.ExtType(5, b"x" * 16), msgpack.ExtType(5, b"x" * 300),
              msgpack.ExtType(5, b"x" * 70000), msgpack.Timestamp(1, 2)]
    payloads = [msgpack.packb({"a": i, "extra": e, "z": -i}) for i, e in enumerate(extras)]
    batch = _decode_both(payloads, schema)
    assert batch.rejects == []
    assert batch.columns["a"].tolist() == list(range(len(extras)))
    assert batch.columns["z"].tolist() == [-i for i in range(len(extras))]


# --------------------------------------------------------------------------
# (2) reject reasons, exact messages

S2 = Schema([("user", "int64"), ("readtime", "float64"), ("name", "string", False),
             ("flag", "bool", False)])


def _reason(payload, schema=S2):
    batch = _decode_both([payload], schema)
    assert batch.n_rows == 0 and len(batch.rejects) == 1
    assert batch.rejects[0][0] == 0
    return batch.rejects[0][1]


def test_reject_not_a_map():
    for p in (msgpack.packb([1, 2]), msgpack.packb(5), msgpack.packb("user"), b"\xc1", b"\xc0"):
        assert _reason(p) == "not a msgpack map"


def test_reject_empty():
    assert _reason(b"") == "empty payload"


def test_reject_truncated():
    p = msgpack.packb({"user": 42, "readtime": 35.2})
    # 82 | a4 'user' | 2a | a8 'readtime' | cb <8 bytes>: key at 7, float at 16
    assert p[7] == 0xA8 and p[16] == 0xCB and len(p) == 25
    assert _reason(p[:20]) == "truncated payload at byte 16"
    assert _reason(p[:16]) == "truncated payload at byte 16"
    assert _reason(p[:10]) == "truncated payload at byte 7"
    assert _reason(p[:1]) == "truncated payload at byte 1"
    assert _reason(b"\xde\x00") == "truncated payload at byte 0"
    assert _reason(b"\xdf\x00\x00\x00") == "truncated payload at byte 0"
    # inside a skipped value: the innermost incomplete object
    q = msgpack.packb({"user": 1, "readtime": 2.0, "junk": [1, "abcdef"]})
    assert _reason(q[:-2]) == f"truncated payload at byte {len(q) - 7}"
    assert _reason(q[:-7]) == f"truncated payload at byte {len(q) - 7}"


def test_reject_missing_field():
    assert _reason(msgpack.packb({"user": 1})) == "missing field 'readtime'"
    assert _reason(msgpack.packb({"readtime": 1.0})) == "missing field 'user'"
    assert _reason(msgpack.packb({})) == "missing field 'user'"


def test_reject_wrong_type():
    base = {"user": 1, "readtime": 1.0}
    cases = [
        ("readtime", "x", "str", "float64"),
        ("readtime", None, "nil", "float64"),
        ("readtime", True, "bool", "float64"),
        ("user", 1.5, "float", "int64"),
        ("user", None, "nil", "int64"),
        ("user", b"1", "bin", "int64"),
        ("user", [1], "array", "int64"),
        ("user", {"a": 1}, "map", "int64"),
        ("user", msgpack.ExtType(1, b"x"), "ext", "int64"),
        ("user", msgpack.Timestamp(1, 0), "ext", "int64"),
        ("name", 5, "int", "string"),
        ("name", b"raw", "bin", "string"),
        ("flag", 1, "int", "bool"),
        ("flag", "true", "str", "bool"),
    ]
    for field, value, got, expected in cases:
        p = msgpack.packb({**base, field: value})
        assert _reason(p) == f"field '{field}' has type {got}, expected {expected}"


def test_reject_out_of_range():
    for v in (2**63, UINT64_MAX):
        assert _reason(msgpack.packb({"user": v, "readtime": 0.0})) == \
            f"field 'user' value {v} is out of range for int64"
    # the same values are fine as float64
    assert not decode_msgpack_maps([msgpack.packb({"user": 1, "readtime": UINT64_MAX})], S2).rejects


def test_reject_trailing_bytes():
    p = msgpack.packb({"user": 1, "readtime": 1.0})
    assert _reason(p + b"\x00") == "trailing bytes after map"
    assert _reason(p + p) == "trailing bytes after map"


def test_reject_duplicate_field():
    p = b"\x83\xa4user\x01\xa8readtime\xcb" + struct.pack(">d", 1.0) + b"\xa4user\x02"
    assert _reason(p) == "duplicate field 'user'"
    # via the slow key path too (str8-encoded key)
    p = b"\x83\xa4user\x01\xd9\x04user\x02\xa8readtime\x00"
    assert _reason(p) == "duplicate field 'user'"
    # duplicate *extra* keys are ignored
    p = b"\x84\xa1x\x01\xa1x\x02\xa4user\x01\xa8readtime\x00"
    assert _decode_both([p], S2).n_rows == 1


def test_reject_invalid_utf8():
    for bad in (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\x80"):
        p = b"\x83\xa4user\x01\xa8readtime\x00\xa4name" + bytes([0xA0 | len(bad)]) + bad
        assert _reason(p) == "field 'name' is not valid utf-8"


def test_reject_non_string_key():
    assert _reason(b"\x81\x01\x02") == "map key at byte 1 has type int, expected str"
    assert _reason(b"\x82\xa4user\x01\xc4\x01k\x02") == "map key at byte 7 has type bin, expected str"
    assert _reason(b"\x81\xc0\x02") == "map key at byte 1 has type nil, expected str"


def test_reject_invalid_byte():
    assert _reason(b"\x82\xa4user\x01\xa1x\xc1") == "invalid msgpack byte 0xc1 at byte 9"
    assert _reason(b"\x82\xa4user\x01\xa1x\x91\xc1") == "invalid msgpack byte 0xc1 at byte 10"
    assert _reason(b"\x81\xc1\x01") == "invalid msgpack byte 0xc1 at byte 1"
    assert _reason(b"\x81\xa4user\xc1") == "invalid msgpack byte 0xc1 at byte 6"


def test_reject_non_bytes_payloads():
    assert _reason(5) == "payload is not bytes-like (got int)"
    assert _reason(None) == "payload is not bytes-like (got NoneType)"
    assert _reason("text") == "payload is not bytes-like (got str)"
    assert _reason(memoryview(b"\x81\xa1a\x01" * 2)[::2]) == "payload buffer is not contiguous"


def test_reject_order_within_a_payload():
    # first problem met while reading wins; trailing bytes before missing fields
    p = msgpack.packb({"user": "x", "readtime": None})
    assert _reason(p) == "field 'user' has type str, expected int64"
    assert _reason(msgpack.packb({"user": 1}) + b"\x00") == "trailing bytes after map"


# --------------------------------------------------------------------------
# (3) fuzz


map_prefixes = st.sampled_from([b"\x81", b"\x82", b"\x83", b"\x8f", b"\xde\x00\x03",
                                b"\xdf\x00\x00\x00\x02", b"\x82\xa4user", b"\x81\xa8readtime"])
fuzz_bytes = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda h, b: h + b, map_prefixes, st.binary(max_size=64)),
)


@SETTINGS
@given(st.lists(fuzz_bytes, min_size=1, max_size=20))
def test_fuzz_random_bytes(payloads):
    _check_batch(payloads, _decode_both(payloads), SPEC)


@st.composite
def mutated(draw):
    p = bytearray(draw(payloads_st))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(p) - 1))
        p[i] = draw(st.integers(0, 255))
    return bytes(p)


@SETTINGS
@given(st.lists(mutated(), min_size=1, max_size=3))
def test_fuzz_mutated_payloads(payloads):
    _check_batch(payloads, _decode_both(payloads), SPEC)


@SETTINGS
@given(st.builds(_pack, records(), st.booleans()), st.data())
def test_fuzz_truncations(payload, data):
    if len(payload) > 300:
        cuts = data.draw(st.lists(st.integers(0, len(payload) - 1), min_size=1, max_size=50))
    else:
        cuts = range(len(payload))
    prefixes = [payload[:c] for c in cuts]
    batch = _decode_both(prefixes + [payload])
    verdicts = _check_batch(prefixes + [payload], batch)
    # msgpack objects are self-delimiting: no proper prefix is a whole map
    assert batch.n_rows == (1 if verdicts[-1][0] == "row" else 0)
    if verdicts[-1][0] == "row":
        for (i, reason), c in zip(batch.rejects, cuts):
            if c == 0:
                assert reason == "empty payload"
                continue
            m = re.fullmatch(r"truncated payload at byte (\d+)", reason)
            assert m and int(m.group(1)) <= c, (reason, c)


def test_utf8_validation_matches_python():
    schema = Schema([("s", "string")])
    samples = [bytes([a, b, c, d]) for a in (0x7F, 0x80, 0xC1, 0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5)
               for b in (0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0)
               for c in (0x80, 0x41) for d in (0x80, 0xBF, 0x41)]
    samples += [s[:k] for s in samples[::7] for k in range(4)]
    payloads = [b"\x81\xa1s" + bytes([0xA0 | len(s)]) + s for s in samples]
    batch = _decode_both(payloads, schema)
    good = iter(batch.columns["s"])
    for s, (kind, _) in zip(samples, [_model(p, {"s": ("string", True)}) for p in payloads]):
        try:
            text = s.decode("utf-8")
        except UnicodeDecodeError:
            assert kind == "reject"
        else:
            assert kind == "row" and next(good) == text


# --------------------------------------------------------------------------
# (4) mixed batches


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.integers(INT64_MIN, INT64_MAX)), max_size=40),
       st.sampled_from(["list", "tuple", "generator", "memoryview", "bytearray"]))
def test_mixed_batch_order_and_source_index(spec, container):
    schema = Schema([("user", "int64"), ("note", "string", False)])
    bad_forms = [b"", b"\x90", msgpack.packb({"note": "no user"}), msgpack.packb({"user": "x"}),
                 msgpack.packb({"user": 1})[:-1], 17]
    payloads, expect_rows, expect_rejects = [], [], []
    for i, (good, v) in enumerate(spec):
        if good:
            payloads.append(msgpack.packb({"user": v, "note": str(v), "pad": [v]}))
            expect_rows.append((i, v))
        else:
            payloads.append(bad_forms[abs(v) % len(bad_forms)])
            expect_rejects.append(i)
    if container == "memoryview":
        payloads = [memoryview(p) if isinstance(p, bytes) else p for p in payloads]
    elif container == "bytearray":
        payloads = [bytearray(p) if isinstance(p, bytes) else p for p in payloads]
    arg = {"list": payloads, "tuple": tuple(payloads), "generator": (p for p in payloads),
           "memoryview": payloads, "bytearray": payloads}[container]
    batch = decode_msgpack_maps(arg, schema)
    assert batch.n_rows == len(expect_rows)
    assert batch.source_index.tolist() == [i for i, _ in expect_rows]
    assert batch.columns["user"].tolist() == [v for _, v in expect_rows]
    assert batch.columns["note"].tolist() == [str(v) for _, v in expect_rows]
    assert batch.valid["note"].all()
    assert [i for i, _ in batch.rejects] == expect_rejects
    assert all(REASON_RE.fullmatch(r) for _, r in batch.rejects)


def test_large_batch_default_path_with_rejects():
    n = _decode_module._NOGIL_MIN_PAYLOADS + 1000     # auto mode releases the GIL
    schema = Schema([("user", "int64"), ("name", "string", False)])
    payloads = []
    for i in range(n):
        if i % 97 == 0:
            payloads.append(b"\x81\xa4user")                    # truncated
        else:
            payloads.append(msgpack.packb({"user": i, "name": f"n{i}" if i % 3 else None}))
    batch = decode_msgpack_maps(payloads, schema)
    ref = decode_msgpack_maps(payloads, schema, release_gil=False)
    good = [i for i in range(n) if i % 97]
    assert batch.source_index.tolist() == good == ref.source_index.tolist()
    assert batch.columns["user"].tolist() == good
    assert batch.columns["name"].tolist() == [f"n{i}" if i % 3 else None for i in good]
    assert batch.columns["name"].tolist() == ref.columns["name"].tolist()
    assert batch.rejects == ref.rejects == [(i, "truncated payload at byte 6") for i in range(0, n, 97)]


def test_empty_batch():
    batch = decode_msgpack_maps([], SCHEMA)
    assert batch.n_rows == 0 and batch.rejects == []
    assert batch.source_index.dtype == np.int64 and len(batch.source_index) == 0
    assert batch.columns["user"].dtype == np.int64 and len(batch.columns["user"]) == 0
    assert batch.columns["title"].dtype == object
    assert batch.valid["opt_int"].dtype == np.bool_


def test_all_rejected_batch():
    batch = decode_msgpack_maps([b"", b"\x00"] * 300, SCHEMA)
    assert batch.n_rows == 0 and len(batch.rejects) == 600
    assert all(len(c) == 0 for c in batch.columns.values())


def test_concurrent_decodes_share_a_schema():
    schema = Schema([("user", "int64"), ("name", "string")])
    payloads = [msgpack.packb({"user": i, "name": str(i)}) for i in range(20000)]
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                b = decode_msgpack_maps(payloads, schema)
                results.append(b.columns["user"].sum() == sum(range(20000))
                               and b.columns["name"][-1] == "19999")
        except BaseException as e:            # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12 and all(results)


# --------------------------------------------------------------------------
# misuse


def test_schema_validation():
    assert issubclass(DecodeError, ValueError)
    bad = [
        [],
        "user",
        [("user",)],
        [("user", "int32")],
        [("user", "int64", "yes")],
        [("", "int64")],
        [(5, "int64")],
        [("user", "int64"), ("user", "float64")],
        [("a", "int64", True, 1)],
        ["user"],
        5,
    ]
    for fields in bad:
        with pytest.raises(DecodeError):
            Schema(fields)


def test_schema_introspection_and_pickle():
    s = Schema([("user", "int64"), ("x", "string", False)])
    assert s.fields == (("user", "int64", True), ("x", "string", False))
    assert s.names == ("user", "x") and len(s) == 2
    assert pickle.loads(pickle.dumps(s)) == s
    with pytest.raises(DecodeError):
        s.__init__([("other", "int64")])          # immutable
    with pytest.raises(DecodeError):
        decode_msgpack_maps([], Schema.__new__(Schema))   # never initialized
    assert "user" in repr(s)


def test_payloads_must_be_a_sequence():
    for arg in (b"\x80", bytearray(b"\x80"), "x", memoryview(b"\x80")):
        with pytest.raises(TypeError):
            decode_msgpack_maps(arg, S2)
    with pytest.raises(TypeError):
        decode_msgpack_maps(5, S2)
    with pytest.raises(TypeError):
        decode_msgpack_maps([b"\x80"], None)
