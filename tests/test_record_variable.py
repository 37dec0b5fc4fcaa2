"""Record layout 2 (strings, lists, top_k) against a brute-force encoder and
decoder written from the layout's description, layout 1 byte for byte as it
was, and damaged records refused with a RecordError."""
import os
import random
import struct

import numpy as np
import pytest

from tally.core.errors import DefinitionError
from tally.core.record import (INT64_MAX, INT64_MIN, MAX_RECORD_BYTES, RecordError, Records,
                               ViewSchema, decode_record)
from tally.core.types import VALUE_TYPES

WORDS = ["", "a", "größe ü", "🙂", "x" * 77, "tab\tnew\nline", "\0nul"]


@pytest.fixture
def rng():
    seed = int(os.environ.get("TALLY_TEST_SEED", random.randrange(1 << 32)))
    print(f"TALLY_TEST_SEED={seed}")
    return np.random.default_rng(seed)


# ---- the brute force: one record at a time, from the docstring of tally.core.record ----

def pad8(data):
    return data + b"\0" * (-len(data) % 8)


def brute_value(dtype, value):
    """The bytes of one variable value."""
    if dtype == "string":
        return value.encode()
    if dtype == "list<int64>":
        return struct.pack("<II", len(value), 0) + b"".join(struct.pack("<q", int(x))
                                                              for x in value)
    if dtype == "list<float64>":
        return struct.pack("<II", len(value), 0) + b"".join(struct.pack("<d", x) for x in value)
    if dtype == "list<string>":
        encoded = [s.encode() for s in value]
        offsets = [0]
        for s in encoded:
            offsets.append(offsets[-1] + len(s))
        return struct.pack("<I", len(value)) + b"".join(struct.pack("<I", o) for o in offsets) \
            + b"".join(encoded)
    item = dtype[len("top_k<"):-1]
    counts = b"".join(struct.pack("<q", c) for _, c in value)
    return struct.pack("<II", len(value), 0) + counts + \
        brute_value(f"list<{item}>", [v for v, _ in value])


def brute_encode(schema, row, event_time, write_time, valid_until):
    """One record: ``row`` maps names to a value or None (null)."""
    n = len(schema.features)
    variable = any(t not in ("int64", "float64") for _, t in schema.features)
    header = struct.pack("<BBHIqqq", 2 if variable else 1, 0, n, schema.version, event_time,
                         write_time, valid_until)
    bits = sum(1 << i for i, (name, _) in enumerate(schema.features) if row[name] is None)
    bitmap = bits.to_bytes((n + 63) // 64 * 8, "little")
    fixed = len(header) + len(bitmap) + 8 * n
    slots, area = b"", b""
    for name, dtype in schema.features:
        value = row[name]
        if dtype == "int64":
            slots += struct.pack("<q", 0 if value is None else int(value))
        elif dtype == "float64":
            slots += struct.pack("<d", 0.0 if value is None else value)
        elif value is None:
            slots += struct.pack("<II", 0, 0)
        else:
            data = brute_value(dtype, value)
            slots += struct.pack("<II", fixed + len(area), len(data))
            area += pad8(data)
    return header + bitmap + slots + area


def brute_decode(schema, raw):
    """The inverse, as independently: from offsets read one by one."""
    n = len(schema.features)
    layout, _, count, version, event_time, write_time, valid_until = \
        struct.unpack_from("<BBHIqqq", raw)
    assert count == n
    bitmap = int.from_bytes(raw[32:32 + (n + 63) // 64 * 8], "little")
    slots_at = 32 + (n + 63) // 64 * 8
    result = {}
    for i, (name, dtype) in enumerate(schema.features):
        at = slots_at + 8 * i
        if bitmap >> i & 1:
            result[name] = None
        elif dtype == "int64":
            result[name] = struct.unpack_from("<q", raw, at)[0]
        elif dtype == "float64":
            result[name] = struct.unpack_from("<d", raw, at)[0]
        else:
            offset, length = struct.unpack_from("<II", raw, at)
            result[name] = brute_decode_value(dtype, raw[offset:offset + length])
    result.update(_event_time=None if event_time == INT64_MIN else event_time,
                  _write_time=write_time,
                  _valid_until=None if valid_until == INT64_MAX else valid_until,
                  _view_version=version)
    return result


def brute_decode_value(dtype, data):
    if dtype == "string":
        return data.decode()
    count = struct.unpack_from("<I", data)[0]
    if dtype in ("list<int64>", "list<float64>"):
        code = "q" if dtype == "list<int64>" else "d"
        return [struct.unpack_from("<" + code, data, 8 + 8 * j)[0] for j in range(count)]
    if dtype == "list<string>":
        offsets = [struct.unpack_from("<I", data, 4 + 4 * j)[0] for j in range(count + 1)]
        base = 4 + 4 * (count + 1)
        return [data[base + a:base + b].decode() for a, b in zip(offsets, offsets[1:])]
    counts = [struct.unpack_from("<q", data, 8 + 8 * j)[0] for j in range(count)]
    values = brute_decode_value(f"list<{dtype[len('top_k<'):-1]}>", data[8 + 8 * count:])
    return list(zip(values, counts))


# ---- random views and records ---------------------------------------------------

def random_value(dtype, rng):
    if dtype == "int64":
        return int(rng.integers(INT64_MIN, INT64_MAX, endpoint=True))
    if dtype == "float64":
        return float(rng.choice([rng.normal(), np.inf, -0.0, 5e-324]))
    if dtype == "string":
        return WORDS[int(rng.integers(len(WORDS)))]
    count = int(rng.choice([0, 1, 2, 9, 100]))
    item = dtype[dtype.index("<") + 1:-1]
    items = [random_value(item, rng) for _ in range(count)]
    if dtype.startswith("list<"):
        return items
    return list(zip(items, rng.integers(1, 10**12, size=count).tolist()))


def random_view(rng, variable=True):
    types = VALUE_TYPES if variable else VALUE_TYPES[:2]
    n = int(rng.choice([1, 3, 9, 70]))
    features = tuple((f"f{i}", types[int(rng.integers(len(types)))]) for i in range(n))
    if variable and all(t in ("int64", "float64") for _, t in features):
        features += (("last", "list<string>"),)
    return ViewSchema("v", int(rng.integers(1, 2**32)), "int64", features)


def random_rows(schema, n, rng):
    return [{name: None if rng.random() < 0.2 else random_value(dtype, rng)
             for name, dtype in schema.features} for _ in range(n)]


def as_records(schema, rows, event_time, write_time, valid_until):
    values = {}
    for name, dtype in schema.features:
        valid = np.array([row[name] is not None for row in rows])
        if dtype in ("int64", "float64"):
            column = np.array([0 if row[name] is None else row[name] for row in rows],
                              dtype=dtype)
        else:
            column = np.empty(len(rows), dtype=object)
            column[:] = [row[name] for row in rows]
        values[name] = (column, valid)
    return Records(values, event_time, write_time, valid_until)


def times(n, rng):
    event_time = rng.integers(0, 1 << 45, size=n)
    event_time[rng.random(n) < 0.3] = INT64_MIN
    valid_until = rng.integers(0, 1 << 45, size=n)
    valid_until[rng.random(n) < 0.3] = INT64_MAX
    return event_time, int(rng.integers(0, 1 << 45)), valid_until


@pytest.mark.parametrize("variable", [True, False], ids=["layout2", "layout1"])
def test_encoding_equals_the_brute_force_byte_for_byte(rng, variable):
    for _ in range(20):
        schema = random_view(rng, variable)
        rows = random_rows(schema, 30, rng)
        event_time, write_time, valid_until = times(len(rows), rng)
        encoded = as_records(schema, rows, event_time, write_time, valid_until).encode(schema)
        for r, row in enumerate(rows):
            want = brute_encode(schema, row, event_time[r], write_time, valid_until[r])
            assert encoded[r] == want
            decoded = decode_record(schema, encoded[r])
            assert decoded == brute_decode(schema, want)
            assert {k: decoded[k] for k in row} == row


def test_numbers_only_schemas_keep_layout_1():
    numbers = ViewSchema("v", 3, "string", (("a", "int64"), ("b", "float64")))
    assert numbers.to_bytes() == b"\x01\x01\x02\x00\x03\x00\x00\x00" + \
        b"\x00\x01a" + b"\x01\x01b"
    assert not numbers.variable and numbers.layout == 1
    mixed = ViewSchema("v", 3, "int64", (("a", "int64"), ("t", "top_k<string>")))
    raw = mixed.to_bytes()
    assert raw[0] == 2 and raw[8] == 0 and raw[11] == VALUE_TYPES.index("top_k<string>") == 8
    assert ViewSchema.from_bytes("v", raw) == mixed
    with pytest.raises(RecordError, match="unknown type code"):     # layout 1: numbers only
        ViewSchema.from_bytes("v", b"\x01" + raw[1:])


def test_int64_values_given_as_floats_are_coerced_or_refused():
    schema = ViewSchema("v", 1, "int64", (("last", "int64"), ("ids", "list<int64>")))
    ids = np.empty(2, dtype=object)
    ids[:] = [[1.0, 2.0], [3.0]]
    values = {"last": (np.array([4.0, np.nan]), np.array([True, False])),
              "ids": (ids, np.array([True, True]))}
    raws = Records(values, np.array([1, 2]), 3, INT64_MAX).encode(schema)
    assert [decode_record(schema, raw)["ids"] for raw in raws] == [[1, 2], [3]]
    assert decode_record(schema, raws[0])["last"] == 4
    ids[:] = [[1.5], []]
    with pytest.raises(RecordError, match="'ids'.*not an integer"):
        Records(values, np.array([1, 2]), 3, INT64_MAX).encode(schema)
    values["last"] = (np.array([4.5, 0.0]), np.array([True, True]))
    with pytest.raises(RecordError, match="'last'.*non-integral"):
        Records(values, np.array([1, 2]), 3, INT64_MAX).encode(schema)


def test_a_record_above_the_limit_is_refused():
    schema = ViewSchema("v", 1, "int64", (("names", "list<string>"),))
    column = np.empty(1, dtype=object)
    column[:] = [["x" * 1000] * (MAX_RECORD_BYTES // 1000)]
    with pytest.raises(RecordError, match="exceeds the online limit"):
        Records({"names": (column, np.array([True]))}, np.array([1]), 1, 1).encode(schema)


def test_truncated_and_corrupt_records_are_refused_with_a_record_error(rng):
    """Every truncation and random byte damage either decodes (damage inside a
    value or in padding) or raises RecordError: never another exception."""
    schema = ViewSchema("v", 1, "int64", tuple((f"f{i}", t) for i, t in enumerate(VALUE_TYPES)))
    rows = [{name: random_value(dtype, rng) for name, dtype in schema.features}
            for _ in range(5)]
    raws = as_records(schema, rows, np.zeros(5, np.int64), 1, np.zeros(5, np.int64)) \
        .encode(schema)
    refused = 0
    for raw in raws:
        for cut in range(len(raw)):
            try:
                decode_record(schema, raw[:cut])
            except RecordError:
                refused += 1
        for _ in range(300):
            damaged = bytearray(raw)
            for at in rng.integers(0, len(raw), size=int(rng.integers(1, 4))):
                damaged[at] = int(rng.integers(256))
            try:
                decode_record(schema, bytes(damaged))
            except RecordError:
                refused += 1
    assert refused > 0
    with pytest.raises(RecordError, match="at least"):
        decode_record(schema, raws[0][:schema.fixed_size - 1])


def test_a_layout_2_record_for_a_layout_1_view_is_refused():
    numbers = ViewSchema("v", 1, "int64", (("a", "int64"),))
    raw = bytearray(Records({"a": (np.array([1]), np.array([True]))}, np.array([1]), 1, 1)
                    .encode(numbers)[0])
    raw[0] = 2
    with pytest.raises(RecordError, match="layout version 2; view 'v' v1 has records of "
                                          "layout 1"):
        decode_record(numbers, bytes(raw))


# ---- which views can be served ----------------------------------------------------

def test_online_schema_types_every_feature_and_apply_refuses_what_cannot_be_served():
    from tally.core.definitions import Entity, Feature, FeatureView, Source
    from tally.core.materialize import check_servable, online_schema
    user = Entity("user", "int64")
    source = Source("reads", "reads-topic", schema=[("user", "int64"), ("ts", "int64"),
                                                    ("article", "int64"),
                                                    ("length", "float64")],
                    timestamp_field="ts")

    def view(*features):
        return FeatureView("reading", user, source, features=list(features))
    served = view(Feature("recent", "last_n", "article", n=5),
                  Feature("top", "top_k", "article", k=3),
                  Feature("lengths", "last_n", "length", n=4),
                  Feature("last_article", "last", "article"), Feature("reads", "count"))
    assert online_schema(served).features == (
        ("recent", "list<int64>"), ("top", "top_k<int64>"), ("lengths", "list<float64>"),
        ("last_article", "int64"), ("reads", "int64"))
    check_servable(served)
    huge = view(*[Feature(f"recent_{i}", "last_n", "article", n=4096) for i in range(40)])
    with pytest.raises(DefinitionError, match="cannot be served online.*1,048,576"):
        check_servable(huge)


def test_plan_and_apply_refuse_a_view_that_cannot_be_served(tmp_path, capsys):
    """With the reason, at plan and apply time: never a traceback at serve."""
    from tally.service.cli import main
    definitions = tmp_path / "huge.py"
    definitions.write_text(
        "from tally.core.definitions import Entity, Feature, FeatureView, Source\n"
        "reads = Source('reads', 'reads', schema={'user': 'int64', 'article': 'int64', "
        "'ts': 'int64'}, timestamp_field='ts')\n"
        "huge = FeatureView('huge', Entity('user', 'int64'), reads, features=[\n"
        "    Feature(f'recent_{i}', 'last_n', 'article', n=4096) for i in range(40)])\n")
    for command in ("plan", "apply"):
        with pytest.raises(SystemExit) as exit_:
            main([command, str(definitions), "--registry", str(tmp_path / "registry.db")])
        _, err = capsys.readouterr()
        assert exit_.value.code != 0
        assert "view 'huge' cannot be served online" in err and "lower their n or k" in err
        assert "Traceback" not in err
