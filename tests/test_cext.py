"""The C API (cext/, libtally) against the Python reader of the same store.

A Python writer (LmdbStore) makes the store; the C test program
(cext/test_tally.c) and the ctypes twin (tally.service.store.embedded) read it,
and every answer must equal LmdbStore.get's. LMDB allows one open of an
environment per process, so the C program runs in its own process and the
EmbeddedReader is only opened here once the LmdbStore is closed (or from a
writer in a subprocess).
"""
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import tally.core.record as record
from tally.service.store.lmdb import LmdbStore, StoreError, _db_name
from tally.core.record import (INT64_MAX, INT64_MIN, RecordError, Records, ViewSchema,
                               encode_keys, encode_records)
from tally.core.types import VALUE_TYPES

CEXT = Path(__file__).resolve().parent.parent / "cext"
BUILD = CEXT / "build"


# ---- helpers -------------------------------------------------------------------

@pytest.fixture
def rng():
    """A seeded random generator; the seed is printed so a failure can be
    replayed with TALLY_TEST_SEED=<seed>."""
    seed = int(os.environ.get("TALLY_TEST_SEED", random.randrange(1 << 32)))
    print(f"TALLY_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def require_c_compiler():
    missing = [tool for tool in ("cc", "c++", "make") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no C toolchain: {', '.join(missing)} not on PATH "
                    "(Debian: apt-get install build-essential liblmdb-dev)")


@pytest.fixture(scope="module")
def c_build():
    """cext/ built with `make`: header checks, libtally, test programs."""
    require_c_compiler()
    done = subprocess.run(["make", "-C", str(CEXT)], capture_output=True, text=True)
    assert done.returncode == 0, f"make -C cext failed:\n{done.stdout}\n{done.stderr}"
    return BUILD


@pytest.fixture(scope="module")
def embedded(c_build):
    """tally.service.store.embedded, on the library setup.py built, else on the
    one `make -C cext` built."""
    from tally.service.store import embedded
    try:
        embedded.library_path()
    except ImportError:
        os.environ["TALLY_LIBTALLY"] = str(c_build / "libtally.so")
    return embedded


def schema_of(view, key_type, n_features, version=1):
    names = [f"f{i}_{'int' if i % 3 == 0 else 'flt'}" for i in range(n_features)]
    if n_features > 1:
        names[1] = "größe ü"               # non-ASCII, with a space
    features = tuple((name, "int64" if i % 3 == 0 else "float64")
                     for i, name in enumerate(names))
    return ViewSchema(view, version, key_type, features)


def c_type_name(value_type):
    """tally.h's macro suffix of a value type: "list<int64>" -> "LIST_INT64"."""
    return value_type.upper().replace("<", "_").replace(">", "")


def variable_schema_of(view, key_type, version=1):
    """A view with every value type, twice (the variable ones in between
    numbers, so slots and variable values interleave)."""
    features = tuple((f"{t.replace('<', '_').rstrip('>')}_{i}", t)
                     for i in range(2) for t in VALUE_TYPES)
    return ViewSchema(view, version, key_type, features)


STRINGS = ["", "a", "größe ü", "🙂 ключ", "with,comma:colon[brackets]", 'quote" back\\',
           "tab\tnew\nline", "x" * 300]
INT_EDGES = [INT64_MIN, INT64_MAX, 0, -1]
FLOAT_EDGES = [math.inf, -math.inf, -0.0, 5e-324, math.nan, 1e308]


def random_items(item, count, rng):
    if item == "int64":
        return [int(x) if rng.random() > 0.1 else int(rng.choice(INT_EDGES))
                for x in rng.integers(-10**15, 10**15, size=count)]
    if item == "float64":
        return [float(x) if rng.random() > 0.1 else float(rng.choice(FLOAT_EDGES))
                for x in rng.normal(scale=1e3, size=count)]
    return [STRINGS[i] for i in rng.integers(0, len(STRINGS), size=count)]


def random_variable_value(dtype, rng):
    """A random value of a string, list or top_k type: empty lists too, and
    now and then a long one."""
    if dtype == "string":
        return STRINGS[int(rng.integers(len(STRINGS)))]
    count = int(rng.choice([0, 1, 3, 7, 300])) if rng.random() < 0.9 else 4096
    item = dtype[dtype.index("<") + 1:-1]
    if item == "string":                # 4096 strings of 300 bytes would pass 1 MiB
        count = min(count, 300)
    items = random_items(item, count, rng)
    if dtype.startswith("list<"):
        return items
    counts = sorted(rng.integers(1, 10**9, size=count).tolist(), reverse=True)
    return list(zip(items, counts))


def object_column(values):
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def random_records(schema, n, rng):
    """n records with random values, ~20% nulls, and the edge values of both
    numeric types (INT64_MIN/MAX, +-inf, -0.0, subnormals, NaN as a value);
    strings, lists and top_k of random lengths (empty ones included)."""
    values = {}
    for name, dtype in schema.features:
        if dtype not in ("int64", "float64"):
            column = object_column([random_variable_value(dtype, rng) for _ in range(n)])
            values[name] = (column, rng.random(n) >= 0.2)
            continue
        if dtype == "int64":
            column = rng.integers(INT64_MIN, INT64_MAX, size=n, dtype=np.int64, endpoint=True)
            edges = [INT64_MIN, INT64_MAX, 0, -1]
        else:
            column = rng.normal(scale=1e6, size=n)
            edges = [math.inf, -math.inf, -0.0, 5e-324, math.nan, 1e308]
        pick = rng.random(n) < 0.1
        column[pick] = rng.choice(np.array(edges, dtype=column.dtype), size=int(pick.sum()))
        values[name] = (column, rng.random(n) >= 0.2)
    event_time = rng.integers(0, 1 << 45, size=n)
    event_time[rng.random(n) < 0.2] = INT64_MIN
    valid_until = rng.integers(0, 1 << 45, size=n)
    valid_until[rng.random(n) < 0.3] = INT64_MAX
    write_time = int(rng.integers(0, 1 << 45))
    return Records(values, event_time, write_time, valid_until)


def int_keys(rng, n):
    keys = {INT64_MIN, INT64_MAX, -1, 0, 1}
    while len(keys) < n:
        keys.add(int(rng.integers(-1000, 1000)) if rng.random() < 0.5
                 else int(rng.integers(INT64_MIN, INT64_MAX)))
    return np.array(sorted(keys), dtype=np.int64)


def string_keys(rng, n):
    base = ["a", "a b", "ключ", "🙂", "x" * 400, "0", "-1", "key\\with\\slashes"]
    return base + [f"user-{int(rng.integers(1 << 40))}" for _ in range(n - len(base))]


def write_store(path, views, rng, n=300):
    """Write each (schema, keys) of views with the Python writer; returns
    {view: keys written}."""
    with LmdbStore(path) as store:
        for schema, keys in views:
            store.register_view(schema)
            store.write(schema.view, keys, random_records(schema, len(keys), rng))
    return {schema.view: keys for schema, keys in views}


def expected_lines(store, view, keys):
    """What test_tally must print, from the Python reader."""
    schema = store.schema(view)
    lines = [f"view\t{view}\t{schema.version}\t{schema.key_type}\t{len(schema.features)}"
             f"\t{schema.fixed_size}"]
    lines += [f"feature\t{i}\t{name}\t{dtype}" for i, (name, dtype) in enumerate(schema.features)]
    for key, record in zip(keys, store.get_many(view, keys)):
        if record is None:
            lines.append(f"record\t{key}\tnotfound")
            continue
        for field in ("_event_time", "_write_time", "_valid_until", "_view_version"):
            lines.append(f"record\t{key}\t{field}\t{show(record[field])}")
        lines += [f"record\t{key}\t{name}\t{show(record[name])}" for name, _ in schema.features]
    return lines


def show(value):
    """A value as test_tally prints it (see its usage)."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "%.17g" % value
    if isinstance(value, str):
        return '"' + "".join(chr(b) if 0x20 <= b <= 0x7e and chr(b) not in '\\",:[]'
                             else f"\\x{b:02x}" for b in value.encode()) + '"'
    if isinstance(value, tuple):                # a top_k pair
        return f"{show(value[0])}:{value[1]}"
    if isinstance(value, list):
        return "[" + ",".join(map(show, value)) + "]"
    return str(value)


def c_test_program(c_build, sanitized):
    """cext's test_tally, or its ASan + UBSan build (skipped without ASan)."""
    if not sanitized:
        return c_build / "test_tally"
    done = subprocess.run(["make", "-C", str(CEXT), "sanitize"], capture_output=True, text=True)
    if done.returncode != 0 and "asan" in done.stderr.lower():
        pytest.skip(f"no ASan runtime: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    return c_build / "sanitize" / "test_tally"


def plant_schema(path, key, raw):
    """Put a schema entry the Python writer would never write."""
    import lmdb
    env = lmdb.open(str(path), max_dbs=10)
    with env.begin(write=True) as txn:
        txn.put(key, raw, db=env.open_db(b"__schemas__", txn=txn))
    env.close()


def run_c(program, store_path, view, keys, *extra, timeout=120):
    stdin = "".join(f"{k}\n" for k in keys)
    return subprocess.run([str(program), str(store_path), view, *extra], input=stdin.encode(),
                          capture_output=True, timeout=timeout)


# ---- the header ----------------------------------------------------------------

def test_header_compiles_as_c_and_cpp_with_every_warning():
    require_c_compiler()
    flags = ["-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only"]
    for std in ("c90", "c99", "c11"):
        subprocess.run(["cc", f"-std={std}", *flags, "-x", "c", str(CEXT / "tally.h")],
                       check=True)
    for std in ("c++11", "c++17"):
        subprocess.run(["c++", f"-std={std}", *flags, "-x", "c++",
                        str(CEXT / "header_check.cpp")], check=True)


def header_macros():
    """{name: value} of every ``#define TALLY_...`` in tally.h that is an integer."""
    text = (CEXT / "tally.h").read_text()
    pattern = re.compile(r"^#define\s+(TALLY_\w+)\s+\(?(-?\d+)\)?(?:\s|$)", re.MULTILINE)
    return {name: int(value) for name, value in pattern.findall(text)}


def struct_fields(layout):
    """[(offset, size)] of each field of a struct.Struct (one code per field)."""
    byte_order, fields, at = layout.format[0], [], 0
    for code in layout.format[1:]:
        fields.append((at, struct.calcsize(byte_order + code)))
        at += fields[-1][1]
    return fields


# tally.h's field names -> record.py's (HEADER_DTYPE's), in layout order
RECORD_FIELDS = {"LAYOUT": "layout", "FLAGS": "flags", "FEATURE_COUNT": "n_features",
                 "VIEW_VERSION": "view_version", "EVENT_TIME": "event_time",
                 "WRITE_TIME": "write_time", "VALID_UNTIL": "valid_until"}
SCHEMA_FIELDS = ("LAYOUT", "KEY_TYPE", "FEATURE_COUNT", "VIEW_VERSION")    # SCHEMA_HEADER's


def test_record_header_of_record_py_follows_tally_h():
    macros, dtype = header_macros(), record.HEADER_DTYPE
    assert list(dtype.names) == list(RECORD_FIELDS.values())
    for (c_name, name), (offset, size) in zip(RECORD_FIELDS.items(),
                                              struct_fields(record.HEADER), strict=True):
        assert macros[f"TALLY_RECORD_{c_name}_OFFSET"] == dtype.fields[name][1] == offset
        assert macros[f"TALLY_RECORD_{c_name}_SIZE"] == dtype.fields[name][0].itemsize == size
    assert macros["TALLY_RECORD_HEADER_SIZE"] == record.HEADER.size == dtype.itemsize == 32
    assert macros["TALLY_RECORD_LAYOUT_VERSION"] == record.LAYOUT_VERSION == 1
    assert macros["TALLY_RECORD_VARIABLE_LAYOUT_VERSION"] == record.VARIABLE_LAYOUT_VERSION == 2
    assert macros["TALLY_RECORD_VARIABLE_ALIGN"] == record.ALIGN
    # and the encoder puts each header field where tally.h says
    schema = ViewSchema("v", 7, "int64", (("a", "int64"), ("b", "float64")))
    values = {"a": (np.array([1]), np.array([True])), "b": (np.array([2.0]), np.array([False]))}
    raw = encode_records(schema, values, np.array([-5]), 77, np.array([INT64_MAX]))[0]

    def field(c_name):
        at, size = macros[f"TALLY_RECORD_{c_name}_OFFSET"], macros[f"TALLY_RECORD_{c_name}_SIZE"]
        return int.from_bytes(raw[at:at + size], "little", signed=True)
    assert [field(c_name) for c_name in RECORD_FIELDS] == [1, 0, 2, 7, -5, 77, INT64_MAX]


def test_record_size_of_record_py_follows_tally_h():
    macros = header_macros()
    word, value = macros["TALLY_RECORD_BITMAP_WORD_SIZE"], macros["TALLY_RECORD_VALUE_SIZE"]
    for n in (0, 1, 63, 64, 65, 128, 129, 65535):
        schema = ViewSchema("v", 1, "int64", (("f", "int64"),) * n)
        bitmap = -(-n // (8 * word)) * word                 # whole words of 8 * word bits
        assert schema.bitmap_bytes == bitmap, n
        assert schema.fixed_size == macros["TALLY_RECORD_HEADER_SIZE"] + bitmap + value * n


def test_schema_layout_of_record_py_follows_tally_h():
    macros = header_macros()
    for c_name, (offset, size) in zip(SCHEMA_FIELDS, struct_fields(record.SCHEMA_HEADER),
                                      strict=True):
        assert macros[f"TALLY_SCHEMA_{c_name}_OFFSET"] == offset, c_name
        assert macros[f"TALLY_SCHEMA_{c_name}_SIZE"] == size, c_name
    assert macros["TALLY_SCHEMA_HEADER_SIZE"] == record.SCHEMA_HEADER.size == 8
    assert macros["TALLY_SCHEMA_LAYOUT_VERSION"] == record.SCHEMA_LAYOUT_VERSION == 1
    assert macros["TALLY_SCHEMA_VARIABLE_LAYOUT_VERSION"] == \
        record.VARIABLE_SCHEMA_LAYOUT_VERSION == 2
    assert {t: macros[f"TALLY_KEY_{t.upper()}"] for t in record.KEY_TYPES} == \
        {t: i for i, t in enumerate(record.KEY_TYPES)}
    assert {t: macros[f"TALLY_{c_type_name(t)}"] for t in VALUE_TYPES} == \
        {t: i for i, t in enumerate(VALUE_TYPES)}
    assert macros["TALLY_VALUE_TYPES"] == len(VALUE_TYPES)
    raw = ViewSchema("v", 9, "string", (("abc", "float64"),)).to_bytes()
    at = macros["TALLY_SCHEMA_HEADER_SIZE"]
    assert raw[macros["TALLY_SCHEMA_KEY_TYPE_OFFSET"]] == macros["TALLY_KEY_STRING"]
    assert raw[at] == macros["TALLY_FLOAT64"]
    assert raw[at + macros["TALLY_SCHEMA_ENTRY_HEADER_SIZE"]:] == b"abc"


def test_python_constants_match_the_header(embedded):
    macros = header_macros()
    for name in ("TALLY_NOTFOUND", "TALLY_ENOVIEW", "TALLY_EINVAL", "TALLY_ECORRUPT",
                 "TALLY_ESCHEMA", "TALLY_ELAYOUT", "TALLY_EVIEWS", "TALLY_ETRUNCATED",
                 "TALLY_KEY_INT64", "TALLY_KEY_STRING"):
        assert macros[name] == getattr(embedded, name), name
    assert embedded.library_version() == "libtally 0.3.0"
    assert "TALLY_NOTFOUND" in embedded.strerror(embedded.TALLY_NOTFOUND)
    assert embedded.strerror(2) == os.strerror(2)


# ---- the C test program against the Python reader ---------------------------------

@pytest.mark.parametrize("sanitized", [False, True], ids=["O2", "asan-ubsan"])
def test_c_reader_prints_what_the_python_reader_reads(tmp_path, rng, c_build, sanitized):
    written = write_store(tmp_path, [
        (schema_of("ints", "int64", 7, version=3), int_keys(rng, 300)),
        (schema_of("wide", "int64", 300), int_keys(rng, 40)),      # 2.4 KB: overflow pages
        (schema_of("many", "int64", 130), int_keys(rng, 60)),      # 3 bitmap words
        (schema_of("names", "string", 5), string_keys(rng, 100)),
        (schema_of("bare", "int64", 0), int_keys(rng, 10)),
        (variable_schema_of("lists", "int64", version=2), int_keys(rng, 120)),
        (variable_schema_of("named lists", "string"), string_keys(rng, 60)),
    ], rng)
    program = c_test_program(c_build, sanitized)
    with LmdbStore(tmp_path, readonly=True) as store:
        for view, keys in written.items():
            if view in ("names", "named lists"):
                queried = list(keys) + ["missing", "ключ2", "y" * 511, "z" * 600]
            else:
                extra = int_keys(rng, 50)      # mostly keys that were not written
                queried = [int(k) for k in np.concatenate([keys, extra])]
            queried = [queried[i] for i in rng.permutation(len(queried))]
            done = run_c(program, tmp_path, view, queried)
            assert done.returncode == 0, done.stderr.decode()
            got = done.stdout.decode().splitlines()
            want = expected_lines(store, view, queried)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g == w
            assert sum("notfound" in line for line in got) >= 1


@pytest.mark.parametrize("sanitized", [False, True], ids=["O2", "asan-ubsan"])
def test_c_reader_lists_the_views(tmp_path, rng, c_build, sanitized):
    """tally_store_views lists what LmdbStore.views does: served views, not
    their "@v<n>" versions; each opens (inside the listing) at its served
    version, or fails as tally_view_open does."""
    wide = ViewSchema("wide", 1, "int64", tuple((f"feature_{i:05d}_{'x' * 40}", "float64")
                                                for i in range(2000)))      # 100 KB schema
    write_store(tmp_path, [(schema_of("ints", "int64", 3), int_keys(rng, 10)),
                           (schema_of("ключ 🙂", "string", 2), string_keys(rng, 10)),
                           (wide, int_keys(rng, 5))], rng)
    with LmdbStore(tmp_path) as store:
        store.register_view(schema_of("ints", "int64", 4, version=2), current=False)
        store.register_view(schema_of("promoted", "int64", 1))
        store.register_view(schema_of("promoted", "int64", 2, version=5), current=False)
        store.promote("promoted", 5)
    plant_schema(tmp_path, b"orphan", schema_of("orphan", "int64", 2).to_bytes())  # no records
    plant_schema(tmp_path, b"future", b"\x03" + schema_of("f", "int64", 1).to_bytes()[1:])
    with LmdbStore(tmp_path, readonly=True) as store:
        views = store.views()
        versions = {view: store.schema(view).version for view in views
                    if view not in ("orphan", "future")}
    assert len(views) == 6 and not any("@v" in view for view in views)
    macros = header_macros()
    errors = {"orphan": f"error {macros['TALLY_ENOVIEW']}",
              "future": f"error {macros['TALLY_ELAYOUT']}"}
    want = [f"listed\t{view}\t{errors.get(view) or versions[view]}" for view in views]
    done = run_c(c_test_program(c_build, sanitized), tmp_path, "--views", [])
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == want
    assert versions["promoted"] == 5 and versions["ints"] == 1


def test_c_reader_lists_no_views_before_the_writer_made_any(tmp_path, c_build):
    import lmdb
    lmdb.open(str(tmp_path)).close()                    # an LMDB file, no __schemas__ yet
    done = run_c(c_build / "test_tally", tmp_path, "--views", [])
    assert done.returncode == 0 and done.stdout == b"", done.stderr.decode()


def test_c_reader_reports_a_missing_view_and_store(tmp_path, c_build):
    with LmdbStore(tmp_path) as store:
        store.register_view(schema_of("v", "int64", 2))
    done = run_c(c_build / "test_tally", tmp_path, "w", [])
    assert done.returncode == 1 and b"TALLY_ENOVIEW" in done.stderr
    done = run_c(c_build / "test_tally", tmp_path / "nope", "v", [])
    assert done.returncode == 1 and b"No such file or directory" in done.stderr


# ---- feature services ------------------------------------------------------------

def service_store(path, rng, n_events=600):
    """A store the pipeline would write: 3 views of 2 entities (user int64,
    article string) with numbers, strings, lists and a top_k, and a service
    reading them in an order that interleaves the views. Returns the service
    name and request rows of known and unknown keys of both entities."""
    from tally.core.definitions import Entity, Feature, FeatureService, FeatureView, Source
    from test_feature_service import write_store as write_service_store
    user, article = Entity("user", "int64"), Entity("article", "string")
    reads = Source("reads", "reads", schema={
        "user": "int64", "article": "string", "category": "string", "position": "int64",
        "readtime": "float64", "ts": "int64"},
        earliest_event_time=-2**62, max_event_time_ahead=2**62)
    views = [
        FeatureView("user_reading", user, reads, [Feature("total_readtime", "sum", "readtime"),
                                                  Feature("reads", "count")]),
        FeatureView("user_recent", user, reads, [
            Feature("recent_articles", "last_n", "article", n=4),
            Feature("recent_positions", "last_n", "position", n=3),
            Feature("top_categories", "top_k", "category", k=2),
            Feature("last_category", "last", "category")]),
        FeatureView("article_stats", article, reads, [
            Feature("avg_readtime", "mean", "readtime"), Feature("reads", "count"),
            Feature("last_reader", "last", "user")])]
    service = FeatureService("recommend", [
        "user_recent:recent_articles", "user_reading:total_readtime",
        "article_stats:avg_readtime", "user_recent:last_category",
        "article_stats:reads as article_reads", "user_recent:top_categories",
        "user_reading:reads as user_reads", "user_recent:recent_positions",
        "article_stats:last_reader"])
    categories = ["news", "sport", "ключ 🙂", 'with,comma:"quote"']
    columns = {"user": rng.integers(0, 60, n_events),
               "article": object_column([f"a{i}" for i in rng.integers(0, 40, n_events)]),
               "category": object_column([categories[i] for i in
                                          rng.integers(0, len(categories), n_events)]),
               "position": rng.integers(INT64_MIN, INT64_MAX, n_events, dtype=np.int64),
               "readtime": rng.gamma(2.0, 30.0, n_events),
               "ts": np.sort(rng.integers(1_000, 1_000_000, n_events))}
    write_service_store(path, columns, views, [service], version=4)
    users = [int(u) for u in rng.integers(-10, 70, 80)]         # some never read
    articles = [f"a{i}" for i in rng.integers(0, 50, 80)] + ["ключ", "x" * 600]
    rows = [{"user": u, "article": a} for u, a in zip(users, articles)]
    rows += [{"user": INT64_MIN, "article": "ключ"}, {"user": INT64_MAX, "article": "x" * 600}]
    return service.name, rows


def expected_service_lines(store, name, rows):
    """What test_tally --service must print, from ServedService.read (the
    Python reader) over the LmdbStore."""
    from tally.core.serving import ServedService
    served = ServedService.from_bytes(name, store.service(name))
    views = list(served.views)
    schemas = {view: store.schema(view) for view in views}
    entity_types = {}
    for view, (entity, _) in served.views.items():
        entity_types.setdefault(entity, schemas[view].key_type)
    lines = [f"service\t{name}\t{served.version}"]
    lines += [f"entity\t{e}\t{entity}\t{entity_types[entity]}"
              for e, entity in enumerate(served.entities)]
    lines += [f"sview\t{v}\t{view}\t{served.entities.index(served.views[view][0])}"
              for v, view in enumerate(views)]
    for i, c in enumerate(served.columns):
        feature = [f for f, _ in schemas[c.view].features].index(c.feature)
        lines.append(f"column\t{i}\t{c.column}\t{views.index(c.view)}\t{feature}\t{c.feature}")
    for r, vector in enumerate(served.read(store, rows)):
        lines += [f"vector\t{r}\t{column}\t{show(value)}" for column, value in vector.items()]
    return lines, served


def run_service(program, store_path, name, rows, entities):
    return run_c(program, store_path, "--service", ["\t".join(str(row[e]) for e in entities)
                                                    for row in rows], name)


@pytest.mark.parametrize("sanitized", [False, True], ids=["O2", "asan-ubsan"])
def test_c_reads_a_feature_service_as_the_python_reader(tmp_path, rng, c_build, sanitized):
    name, rows = service_store(tmp_path, rng)
    with LmdbStore(tmp_path, readonly=True) as store:
        want, served = expected_service_lines(store, name, rows)
    done = run_service(c_test_program(c_build, sanitized), tmp_path, name, rows,
                       served.entities)
    assert done.returncode == 0, done.stderr.decode()
    got = done.stdout.decode().splitlines()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == w
    # the rows met every case: both entities known, one, none
    shown = [line.split("\t") for line in got if line.startswith("vector")]
    by_row = {}
    for _, r, column, value in shown:
        by_row.setdefault(r, {})[column] = value
    known = {(v["total_readtime"] != "null", v["avg_readtime"] != "null")
             for v in by_row.values()}
    assert known == {(True, True), (True, False), (False, True), (False, False)}


HEAD = "tally-service 1 {name} 2\n"
GOOD = "a user_reading reads user\n"
# (text, what tally_service_open returns, whether ServedService.from_bytes refuses it too)
DEFINITIONS = [
    (HEAD + GOOD.rstrip("\n"), "0", False),                 # no final newline
    ("tally-service\t 1 {name} 2\r\na\tuser_reading  reads user\r\n", "0", False),
    (HEAD + GOOD + "b user_recent last_category user\n", "0", False),
    ("", "TALLY_ECORRUPT", True),
    ("tally-service 1 {name}\n" + GOOD, "TALLY_ECORRUPT", True),
    ("tally-service 2 {name} 2\n" + GOOD, "TALLY_ECORRUPT", True),
    ("tally-services 1 {name} 2\n" + GOOD, "TALLY_ECORRUPT", True),
    ("tally-service 1 other 2\n" + GOOD, "TALLY_ECORRUPT", True),
    ("tally-service 1 {name} two\n" + GOOD, "TALLY_ECORRUPT", True),
    (HEAD + "a user_reading reads\n", "TALLY_ECORRUPT", True),
    (HEAD + "a user_reading reads user more\n", "TALLY_ECORRUPT", True),
    (HEAD + "\n" + GOOD, "TALLY_ECORRUPT", True),           # an empty line
    # refused by libtally only: no writer makes these (FeatureService refuses them)
    ("tally-service 1 {name} -1\n" + GOOD, "TALLY_ECORRUPT", False),
    ("tally-service 1 {name} 4294967296\n" + GOOD, "TALLY_ECORRUPT", False),
    (HEAD + "a user_reading re\0ads user\n", "TALLY_ECORRUPT", False),
    (HEAD, "TALLY_ECORRUPT", False),                        # no column
    (HEAD + GOOD + "a user_recent last_category user\n", "TALLY_ECORRUPT", False),
    (HEAD + GOOD + "b user_reading total_readtime article\n", "TALLY_ECORRUPT", False),
    # well-formed, but the store's views disagree
    (HEAD + GOOD + "b user_reading no_such_feature user\n", "TALLY_ESCHEMA", False),
    (HEAD + GOOD + "b article_stats reads user\n", "TALLY_ESCHEMA", False),  # int64 + string
    (HEAD + GOOD + "b no_such_view reads user\n", "TALLY_ENOVIEW", False),
]


@pytest.mark.parametrize("sanitized", [False, True], ids=["O2", "asan-ubsan"])
def test_c_service_open_refuses_a_bad_definition_with_its_code(tmp_path, rng, c_build,
                                                               sanitized):
    """Each failure closes what it opened (LeakSanitizer checks the ASan run)."""
    from tally.core.serving import ServedService
    service_store(tmp_path, rng, n_events=50)
    for i, (text, _, _) in enumerate(DEFINITIONS):
        plant_schema(tmp_path, f"_service:s{i}".encode(), text.format(name=f"s{i}").encode())
    macros, program = header_macros(), c_test_program(c_build, sanitized)
    for i, (text, code, python_refuses) in enumerate(DEFINITIONS + [("", "TALLY_ENOSERVICE",
                                                                      None)]):
        done = run_c(program, tmp_path, "--service", [], f"s{i}")
        assert done.returncode == 0, (text, done.stderr.decode())
        first = done.stdout.decode().splitlines()[0]
        if code == "0":
            assert first == f"service\ts{i}\t2", text
        else:
            assert first == f"service\terror\t{macros[code]}", (text, code)
        if python_refuses is not None:
            raw = text.format(name=f"s{i}").encode()
            if python_refuses:
                with pytest.raises(RecordError, match="corrupt"):
                    ServedService.from_bytes(f"s{i}", raw)
            else:
                ServedService.from_bytes(f"s{i}", raw)


# ---- the Python twin (ctypes over libtally) --------------------------------------

def test_embedded_reader_equals_lmdb_store(tmp_path, rng, embedded):
    written = write_store(tmp_path, [
        (schema_of("ints", "int64", 9, version=2), int_keys(rng, 500)),
        (schema_of("names", "string", 4), string_keys(rng, 200)),
        (schema_of("many", "int64", 70), int_keys(rng, 50)),
        (variable_schema_of("lists", "string"), string_keys(rng, 80)),
    ], rng)
    queries = {}
    for view, keys in written.items():
        if view in ("names", "lists"):
            extra = ["nope", "ключ ", "a\tb"]
        else:
            extra = [int(k) for k in int_keys(rng, 100)]
        pool = list(keys) + extra
        queries[view] = [pool[i] for i in rng.integers(0, len(pool), size=400)]
    with LmdbStore(tmp_path, readonly=True) as store:
        want = {view: store.get_many(view, keys) for view, keys in queries.items()}
        want_single = {view: [store.get(view, k) for k in keys[:50]]
                       for view, keys in queries.items()}
    with embedded.EmbeddedReader(tmp_path) as reader:
        for view, keys in queries.items():
            got = reader.get_many(view, keys)
            assert same(got, want[view])
            assert same([reader.get(view, k) for k in keys], want[view])
            assert same([reader.get(view, k) for k in keys[:50]], want_single[view])
            assert any(r is None for r in got) and any(r is not None for r in got)
        # threads share the reader, each with its own read transaction
        from concurrent.futures import ThreadPoolExecutor
        keys = queries["ints"]
        with ThreadPoolExecutor(4) as pool:
            parts = list(pool.map(lambda i: [reader.get("ints", k) for k in keys[i::4]],
                                  range(4)))
        for i, part in enumerate(parts):
            assert same(part, want["ints"][i::4])
        assert reader.get_many("ints", []) == []
        assert same([reader.get("ints", np.int64(INT64_MIN))], [reader.get("ints", INT64_MIN)])
        # a string view takes str(key), as LmdbStore does
        assert same([reader.get("names", 0)], [reader.get("names", "0")])
        with pytest.raises(OverflowError):
            reader.get("ints", INT64_MAX + 1)
        with pytest.raises(StoreError, match="unknown view 'nope'"):
            reader.get("nope", 1)
    with pytest.raises(StoreError, match="no online store"):
        embedded.EmbeddedReader(tmp_path / "absent")


def test_embedded_service_vectors_equal_the_python_reader(tmp_path, rng, embedded):
    from tally.core.serving import ServedService
    name, rows = service_store(tmp_path, rng)
    with LmdbStore(tmp_path, readonly=True) as store:
        want = ServedService.from_bytes(name, store.service(name)).read(store, rows)
    with embedded.EmbeddedReader(tmp_path) as reader:
        got = reader.service_vectors(name, rows)
        assert same(got, want) and [list(v) for v in got] == [list(v) for v in want]
        assert same(reader.service_vectors(name, rows[3:4]), want[3:4])     # cached handle
        assert reader.service_vectors(name, []) == []
        with pytest.raises(KeyError, match="row 0 has no 'article' key"):
            reader.service_vectors(name, [{"user": 1}])
        with pytest.raises(OverflowError, match="user key"):
            reader.service_vectors(name, [{"user": INT64_MAX + 1, "article": "a1"}])
        with pytest.raises(StoreError, match="unknown feature service 'nope'"):
            reader.service_vectors("nope", rows)


# A writer in another process: LMDB allows one open per process, and the reader has it.
CHANGE_VIEWS = textwrap.dedent("""
    import sys
    from tally.service.store.lmdb import LmdbStore
    from tally.core.record import ViewSchema
    path, action, view, version = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with LmdbStore(path) as store:
        if action == "promote":
            store.promote(view, version)
        else:
            schema = ViewSchema(view, version, "int64", (("n", "int64"),))
            store.register_view(schema, current=action == "serve")
""")


def change_views(path, action, view, version):
    subprocess.run([sys.executable, "-c", CHANGE_VIEWS, str(path), action, view, str(version)],
                   check=True, timeout=60)


def test_embedded_reader_lists_views_and_follows_promotions(tmp_path, rng, embedded):
    write_store(tmp_path, [(schema_of("a", "int64", 2), int_keys(rng, 5)),
                           (schema_of("ключ", "string", 1), string_keys(rng, 10))], rng)
    with LmdbStore(tmp_path) as store:
        listed = store.views()
    with embedded.EmbeddedReader(tmp_path) as reader:
        assert reader.views() == listed == ["a", "ключ"]
        assert reader.schema("a") == schema_of("a", "int64", 2)
        change_views(tmp_path, "register", "a", 2)          # a candidate: not served yet
        assert reader.views() == listed and reader.served_version("a") == 1
        change_views(tmp_path, "promote", "a", 2)
        assert reader.served_version("a") == 2
        assert reader.schema("a").version == 1              # bound when it was opened
        change_views(tmp_path, "serve", "b", 1)
        assert reader.views() == ["a", "b", "ключ"]
        with pytest.raises(StoreError, match="unknown view 'nope'"):
            reader.served_version("nope")
    with pytest.raises(ValueError, match="closed"):
        reader.views()
    with embedded.EmbeddedReader(tmp_path) as reopened:
        assert reopened.schema("a").version == 2


def test_embedded_reader_refuses_names_with_a_nul(tmp_path, rng, embedded):
    """libtally takes view names as C strings: "a\\0x" must not open "a"
    (and be kept open under a name of its own, one handle per such name)."""
    write_store(tmp_path, [(schema_of("a", "int64", 2), int_keys(rng, 5))], rng)
    with embedded.EmbeddedReader(tmp_path) as reader:
        reader.get("a", 0)                                      # opens "a"
        for i in range(50):
            for call in (reader.schema, reader.served_version,
                         lambda view: reader.get(view, 0), lambda view: reader.get_many(view, [0])):
                with pytest.raises(StoreError, match="unknown view"):
                    call(f"a\0{i}")
        assert list(reader._views) == ["a"]


def test_embedded_reader_lists_no_views_of_an_empty_store(tmp_path, embedded):
    import lmdb
    lmdb.open(str(tmp_path)).close()
    with embedded.EmbeddedReader(tmp_path) as reader:
        assert reader.views() == []


def same(got, want):
    """Equality of record lists where NaN equals NaN (also inside lists)."""
    def norm(record):
        if record is None:
            return None
        return {k: (type(v).__name__, show(v)) for k, v in record.items()}
    return [norm(r) for r in got] == [norm(r) for r in want]


def test_embedded_reader_refuses_bad_records_and_schemas(tmp_path, rng, embedded):
    import lmdb
    old = schema_of("v", "int64", 3)
    with LmdbStore(tmp_path) as store:
        store.register_view(old)
        old_records = random_records(old, 2, rng).encode(old)
        # the view is redefined; records of the old shape in the new version's
        # database (they must never be there) are refused, not misread
        store.register_view(schema_of("v", "int64", 4, version=2))
        store.register_view(schema_of("bad", "int64", 2))
    env = lmdb.open(str(tmp_path), max_dbs=10)
    with env.begin(write=True) as txn:
        redefined = env.open_db(_db_name("v", 2), txn=txn)
        for key, row in zip((1, 2), old_records):
            txn.put(encode_keys("int64", [key])[0], row, db=redefined)
        views = env.open_db(_db_name("bad", 1), txn=txn)
        bad = schema_of("bad", "int64", 2)
        record = bytearray(random_records(bad, 1, rng).encode(bad)[0])
        record[0] = 3                                           # a future layout
        txn.put(b"\x80" + b"\0" * 6 + b"\x01", bytes(record), db=views)
        txn.put(b"\x80" + b"\0" * 6 + b"\x02", bytes(record[:40]), db=views)
        schemas = env.open_db(b"__schemas__", txn=txn)
        txn.put(b"truncated", schema_of("t", "int64", 2).to_bytes()[:-1], db=schemas)
        txn.put(b"future", b"\x03" + schema_of("t", "int64", 2).to_bytes()[1:], db=schemas)
        txn.put(b"orphan", schema_of("orphan", "int64", 2).to_bytes(), db=schemas)
    env.close()
    with embedded.EmbeddedReader(tmp_path) as reader:
        with pytest.raises(RecordError, match="TALLY_ESCHEMA"):
            reader.get("v", 1)
        assert reader.get("v", 3) is None
        with pytest.raises(RecordError, match="TALLY_ELAYOUT"):
            reader.get("bad", 1)
        with pytest.raises(RecordError, match="TALLY_ELAYOUT"):    # layout checked first
            reader.get("bad", 2)
        with pytest.raises(RecordError, match="TALLY_ESCHEMA"):
            reader.get_many("v", [3, 2])
        with pytest.raises(RecordError, match="TALLY_ECORRUPT"):
            reader.get("truncated", 1)
        with pytest.raises(RecordError, match="TALLY_ELAYOUT"):
            reader.get("future", 1)
        with pytest.raises(StoreError, match="unknown view 'orphan'"):  # no records db
            reader.get("orphan", 1)


# ---- reading while a writer writes ------------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from tally.service.store.lmdb import LmdbStore
    from tally.core.record import INT64_MAX, Records
    path, view, n_keys, stop, map_size, pad = sys.argv[1:7]
    n_keys, map_size, pad = int(n_keys), int(map_size), int(pad)
    keys = np.arange(n_keys) - n_keys // 2
    deadline = time.monotonic() + 60
    with LmdbStore(path, map_size=map_size) as store:
        schema = store.schema(view)
        if pad:     # grow the file well past the reader's map first
            from tally.core.record import ViewSchema
            filler = ViewSchema("filler", 1, "int64", ())
            store.register_view(filler)
            for start in range(0, pad, 20000):
                ks = np.arange(start, min(start + 20000, pad))
                t = np.zeros(len(ks), dtype=np.int64)
                store.write("filler", ks, Records({}, t, 0, t))
        c = 0
        while not os.path.exists(stop) and time.monotonic() < deadline:
            c += 1
            n = np.full(n_keys, c, dtype=np.int64)
            values = {"c": (n, np.ones(n_keys, bool)), "minus_c": (-n, np.ones(n_keys, bool)),
                      "half_c": (n / 2.0, np.ones(n_keys, bool))}
            store.write(view, keys, Records(values, n, c, np.full(n_keys, INT64_MAX)))
            if c == 1:
                print("writing", flush=True)
    print(c, flush=True)
""")

COUNTER = ViewSchema("counter", 1, "int64",
                     (("c", "int64"), ("minus_c", "int64"), ("half_c", "float64")))


def start_writer(tmp_path, n_keys, map_size=1 << 30, pad=0):
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "store"), "counter", str(n_keys),
         str(stop), str(map_size), str(pad)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    return writer, stop


def stop_writer(writer, stop):
    stop.touch()
    out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    return int(out.split()[-1])


def check_snapshot(records, last):
    """Every record whole, one counter per snapshot, no counter going back."""
    counters = set()
    for i, r in enumerate(records):
        assert r is not None
        c = r["c"]
        assert r["minus_c"] == -c and r["half_c"] == c / 2.0 and r["_event_time"] == c, r
        assert c >= last[i]
        last[i] = c
        counters.add(c)
    assert len(counters) == 1, f"one snapshot mixes writes {sorted(counters)}"
    return counters.pop()


def test_readers_never_see_a_torn_record_while_a_writer_rewrites(tmp_path, c_build, embedded):
    n_keys = 200
    keys = [int(k) for k in np.arange(n_keys) - n_keys // 2]
    with LmdbStore(tmp_path / "store", map_size=1 << 30) as store:
        store.register_view(COUNTER)
    writer, stop = start_writer(tmp_path, n_keys)
    try:
        # the C program, in its own process, reading at the same time as this one
        key_file = tmp_path / "keys"
        key_file.write_text("".join(f"{k}\n" for k in keys))
        with open(key_file) as stdin:
            watcher = subprocess.Popen([str(c_build / "test_tally"), str(tmp_path / "store"),
                                        "counter", "--watch", "3000"], stdin=stdin,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # the ctypes twin, in this process (the writer is another one)
        seen, last = set(), [0] * n_keys
        with embedded.EmbeddedReader(tmp_path / "store") as reader:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                seen.add(check_snapshot(reader.get_many("counter", keys), last))
                record = reader.get("counter", keys[7])
                check_snapshot([record], last[7:8])
        out, err = watcher.communicate(timeout=120)
        assert watcher.returncode == 0, err.decode()
    finally:
        written = stop_writer(writer, stop)
    words = out.decode().split()
    assert words[:2] == ["watch", "ok"] and int(words[3]) > 0
    c_min, c_max = int(words[4]), int(words[5])
    assert c_max > c_min, "the C reader saw a single write: no concurrency was tested"
    assert len(seen) > 1 and max(seen) <= written


def test_reader_follows_a_writer_that_grows_the_map(tmp_path, embedded):
    """A writer that reopens with a bigger map and writes past the reader's
    mapping: libtally adopts the new size (MDB_MAP_RESIZED) by itself."""
    store_path = tmp_path / "store"
    with LmdbStore(store_path, map_size=1 << 20) as store:
        store.register_view(COUNTER)
    with embedded.EmbeddedReader(store_path) as reader:
        assert reader.get("counter", 0) is None
        # 200k 32-byte records plus keys: far beyond the 1 MiB the reader mapped
        writer, stop = start_writer(tmp_path, 100, map_size=256 << 20, pad=200_000)
        try:
            record = reader.get("counter", 0)
            assert record is not None and record["minus_c"] == -record["c"]
        finally:
            stop_writer(writer, stop)
        assert (store_path / "data.mdb").stat().st_size > 4 << 20
        last = [0] * 100
        check_snapshot(reader.get_many("counter", list(range(-50, 50))), last)


# ---- a truncated data file --------------------------------------------------------

READ_ALL = textwrap.dedent("""
    import sys
    from tally.service.store import StoreError
    from tally.service.store.embedded import EmbeddedReader
    try:
        reader = EmbeddedReader(sys.argv[1])
        for start in range(0, int(sys.argv[2]), 1000):
            reader.get_many("big", list(range(start, start + 1000)))
    except StoreError as error:
        print("refused:", error)
    else:
        print("read every record")
""")


@pytest.fixture
def truncated_store(tmp_path, rng):
    """A store of 200,000 records whose data.mdb lost its second half (a
    full disk, a bad copy): LMDB maps the file, and touching a page past its
    end kills the process with SIGBUS."""
    n = 200_000
    write_store(tmp_path, [(schema_of("big", "int64", 4), np.arange(n))], rng)
    data = tmp_path / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    return tmp_path, n


def test_c_reader_refuses_a_truncated_store(truncated_store, c_build):
    path, n = truncated_store
    macros = header_macros()
    done = run_c(c_build / "test_tally", path, "--open", [])
    assert done.returncode == 0, done.stderr.decode()
    code, message = done.stdout.decode().rstrip("\n").split("\t")[1:]
    assert int(code) == macros["TALLY_ETRUNCATED"] and "TALLY_ETRUNCATED" in message
    done = run_c(c_build / "test_tally", path, "big", range(0, n, 997))   # never a SIGBUS
    assert done.returncode == 1 and b"TALLY_ETRUNCATED" in done.stderr, done


def test_c_reader_opens_an_intact_store(tmp_path, rng, c_build):
    write_store(tmp_path, [(schema_of("v", "int64", 2), int_keys(rng, 10))], rng)
    done = run_c(c_build / "test_tally", tmp_path, "--open", [])
    assert done.returncode == 0 and done.stdout.startswith(b"open\t0\t"), done


def test_embedded_reader_refuses_a_truncated_store(truncated_store, embedded):
    path, n = truncated_store
    done = subprocess.run([sys.executable, "-c", READ_ALL, str(path), str(n)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the reader died (signal {-done.returncode}): {done.stderr}"
    assert done.stdout.startswith("refused:") and "truncated" in done.stdout, done.stdout
    with pytest.raises(StoreError, match="truncated"):
        embedded.EmbeddedReader(path)
    with pytest.raises(StoreError, match="truncated"):
        LmdbStore(path, readonly=True)             # the Python writer's check, the same


def test_c_reader_refuses_corrupt_variable_values(tmp_path, rng, embedded):
    """A layout 2 record whose variable value lies outside the record, or
    disagrees with its encoding, is TALLY_ECORRUPT (the accessors never read
    outside the record); the Python decoder refuses the same bytes."""
    import lmdb
    schema = ViewSchema("lists", 1, "int64", (("n", "int64"), ("items", "list<int64>"),
                                              ("names", "list<string>"), ("s", "string")))
    values = {"n": (np.array([1]), np.array([True])),
              "items": (object_column([[1, 2, 3]]), np.array([True])),
              "names": (object_column([["a", "bc"]]), np.array([True])),
              "s": (object_column(["hey"]), np.array([True]))}
    raw = Records(values, np.array([1]), 2, np.array([INT64_MAX])).encode(schema)[0]
    fixed = schema.fixed_size
    items_slot, names_slot, s_slot = fixed - 24, fixed - 16, fixed - 8
    items_at = int.from_bytes(raw[items_slot:items_slot + 4], "little")
    names_at = int.from_bytes(raw[names_slot:names_slot + 4], "little")

    def patched(at, data):
        out = bytearray(raw)
        out[at:at + len(data)] = data
        return bytes(out)
    corrupt = {
        2: patched(s_slot + 4, (10**6).to_bytes(4, "little")),        # past the end
        3: patched(items_slot, (8).to_bytes(4, "little")),            # inside the fixed part
        4: patched(items_at, (4).to_bytes(4, "little")),              # count != length
        5: patched(names_at + 4, (1).to_bytes(4, "little")),          # first offset not 0
        6: patched(names_at + 8, (9).to_bytes(4, "little")),          # offsets out of order
        7: raw[:-8],                                                  # truncated
    }
    with LmdbStore(tmp_path) as store:
        store.register_view(schema)
        store.write("lists", np.array([1]), Records(values, np.array([1]), 2,
                                                     np.array([INT64_MAX])))
    env = lmdb.open(str(tmp_path), max_dbs=10)
    with env.begin(write=True) as txn:
        db = env.open_db(_db_name("lists", 1), txn=txn)
        for key, bad in corrupt.items():
            txn.put(encode_keys("int64", [key])[0], bad, db=db)
    env.close()
    with embedded.EmbeddedReader(tmp_path) as reader:
        assert reader.get("lists", 1) == {"n": 1, "items": [1, 2, 3], "names": ["a", "bc"],
                                          "s": "hey", "_event_time": 1, "_write_time": 2,
                                          "_valid_until": None, "_view_version": 1}
        for key, bad in corrupt.items():
            with pytest.raises(RecordError, match="TALLY_ECORRUPT"):
                reader.get("lists", key)
            with pytest.raises(RecordError, match="corrupt"):
                record.decode_record(schema, bad)
