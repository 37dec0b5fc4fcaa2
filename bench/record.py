"""The online record's cost before and after a change (issue 15: layout 2).

    python -m tally.bench record --against main [--records 100000] [--repeats 7]

Both versions run in this one process, their repeats interleaved, so that a
noisy shared machine slows both alike: the working tree's ``core/record.py``
and ``service/store/lmdb.py``, and those of the git ref ``--against``, read
with ``git show`` and loaded as modules of their own (the old LmdbStore bound
to the old record module). Each version gets its own LMDB store.

The view is the lookup benchmark's: int64 keys, 8 numeric features (4 int64,
4 float64), ~10% nulls -- a numbers-only view, which layout 2 must leave as
fast as it was. Per repeat and version:

* ``encode``   -- ``Records.encode`` of all records into one bytes object per
                  record, what ``LmdbStore.write`` hands LMDB (before layout 2
                  the matrix was cut into rows by the store; that cut is timed
                  here too, so both sides do the same work);
* ``decode``   -- ``decode_records`` of them all;
* ``write``    -- ``LmdbStore.write`` of them all, one transaction;
* ``get``      -- ``LmdbStore.get`` of single random keys;
* ``get_many`` -- ``LmdbStore.get_many`` of 100 random keys.

Figures: the median time per record (per call for get and get_many) of each
version, the ratio after / before of the medians, and the spread of the
per-repeat ratios (min, max). The working tree also times a layout 2 view
(the numbers plus last_n(10) and top_k(3) of int64) for reference.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

OPS = ("encode", "decode", "write", "get", "get_many")
VIEW = "bench_record"
GETS = 20_000
GET_MANY_CALLS = 500


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench record")
    parser.add_argument("--against", default="main", help="git ref to compare with")
    parser.add_argument("--records", type=int, default=20_000 if quick else 100_000)
    parser.add_argument("--repeats", type=int, default=3 if quick else 7)
    args = parser.parse_args(list(argv))
    versions = {"after": working_tree(), "before": from_git(args.against)}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {name: version.LmdbStore(os.path.join(tmp, name))
                  for name, version in versions.items()}
        try:
            times = measure(versions, stores, args.records, args.repeats)
        finally:
            for store in stores.values():
                store.close()
        variable = measure_variable(args.records, args.repeats, os.path.join(tmp, "variable"))
    figures = {"against": args.against, "records": args.records, "repeats": args.repeats}
    for op in OPS:
        before, after = times["before"][op], times["after"][op]
        ratios = [a / b for a, b in zip(after, before)]
        figures[op] = {"before_us": round(statistics.median(before) * 1e6, 3),
                       "after_us": round(statistics.median(after) * 1e6, 3),
                       "ratio": round(statistics.median(after) / statistics.median(before), 3),
                       "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)}
        print(f"{op:9s} before {figures[op]['before_us']:8.3f} us  after "
              f"{figures[op]['after_us']:8.3f} us  ratio {figures[op]['ratio']:.3f} "
              f"({figures[op]['ratio_min']:.3f}..{figures[op]['ratio_max']:.3f})")
    figures["layout2"] = variable
    print("layout 2 (numbers + last_n(10) + top_k(3)):",
          ", ".join(f"{op} {us:.3f} us" for op, us in variable.items()))
    return figures


# ---- the two versions --------------------------------------------------------------

class Version:
    def __init__(self, record, lmdb):
        self.record, self.LmdbStore = record, lmdb.LmdbStore

    def encode(self, records, schema):
        """One bytes object per record, as the store writes them."""
        encoded = records.encode(schema)
        if isinstance(encoded, list):
            return encoded
        blob, size = encoded.tobytes(), encoded.shape[1]     # before layout 2
        return [blob[i * size:(i + 1) * size] for i in range(len(encoded))]


def working_tree():
    import tally.core.record as record
    import tally.service.store.lmdb as lmdb
    return Version(record, lmdb)


def from_git(ref):
    """The ref's record and LMDB modules, the latter bound to the former."""
    import tally.core.record as current
    repo = os.path.dirname(os.path.dirname(os.path.abspath(current.__file__)))
    record = _module(f"_bench_record_{ref}", _git_show(repo, ref, "core/record.py"))
    saved = sys.modules["tally.core.record"]
    sys.modules["tally.core.record"] = record        # what the old lmdb.py imports
    try:
        lmdb = _module(f"_bench_lmdb_{ref}", _git_show(repo, ref, "service/store/lmdb.py"))
    finally:
        sys.modules["tally.core.record"] = saved
    return Version(record, lmdb)


def _git_show(repo, ref, path):
    done = subprocess.run(["git", "-C", repo, "show", f"{ref}:{path}"], capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"git show {ref}:{path} in {repo} failed: {done.stderr.strip()}")
    return done.stdout


def _module(name, source):
    module = types.ModuleType(name)
    sys.modules[name] = module          # dataclasses look their module up
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


# ---- the measurements --------------------------------------------------------------

def numeric_records(record, n, seed=0):
    rng = np.random.default_rng(seed)
    features = tuple((f"i{j}", "int64") for j in range(4)) + \
        tuple((f"f{j}", "float64") for j in range(4))
    schema = record.ViewSchema(VIEW, 1, "int64", features)
    values = {name: (rng.integers(0, 10**9, n) if dtype == "int64" else rng.normal(size=n),
                     rng.random(n) > 0.1) for name, dtype in features}
    return schema, record.Records(values, rng.integers(0, 10**12, n), 1_700_000_000_000,
                                  np.full(n, record.INT64_MAX))


def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(versions, stores, n, repeats):
    keys = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(1)
    singles = [int(k) for k in rng.integers(0, n, GETS)]
    batches = [[int(k) for k in rng.integers(0, n, 100)] for _ in range(GET_MANY_CALLS)]
    data = {name: numeric_records(v.record, n) for name, v in versions.items()}
    for name, store in stores.items():
        store.register_view(data[name][0])
    times = {name: {op: [] for op in OPS} for name in versions}
    for repeat in range(repeats):
        order = list(versions) if repeat % 2 else list(versions)[::-1]
        for name in order:                  # interleaved, each first in every other repeat
            version = versions[name]
            schema, records = data[name]
            store, out = stores[name], times[name]
            encoded = []
            out["encode"].append(timed(lambda: encoded.append(
                version.encode(records, schema))) / n)
            out["decode"].append(timed(lambda: version.record.decode_records(
                schema, encoded[0])) / n)
            out["write"].append(timed(lambda: store.write(VIEW, keys, records)) / n)
            out["get"].append(timed(lambda: [store.get(VIEW, k) for k in singles]) / GETS)
            out["get_many"].append(timed(lambda: [store.get_many(VIEW, b) for b in batches])
                                   / GET_MANY_CALLS)
    return times


def measure_variable(n, repeats, path):
    """The working tree on a layout 2 view: the numbers plus two lists."""
    from tally.core.record import Records, ViewSchema, decode_records
    from tally.service.store.lmdb import LmdbStore
    schema, records = numeric_records(sys.modules["tally.core.record"], n)
    rng = np.random.default_rng(2)
    recent, top = np.empty(n, dtype=object), np.empty(n, dtype=object)
    recent[:] = [rng.integers(0, 10**6, 10).tolist() for _ in range(n)]
    top[:] = [list(zip(rng.integers(0, 10**6, 3).tolist(), [9, 5, 1])) for _ in range(n)]
    values = dict(records.values, recent=(recent, np.ones(n, bool)), top=(top, np.ones(n, bool)))
    schema = ViewSchema("bench_variable", 1, "int64", schema.features +
                        (("recent", "list<int64>"), ("top", "top_k<int64>")))
    records = Records(values, records.event_time, records.write_time, records.valid_until)
    keys = [int(k) for k in np.random.default_rng(3).integers(0, n, GETS)]
    found = {op: [] for op in OPS}
    with LmdbStore(path) as store:
        store.register_view(schema)
        for _ in range(repeats):
            encoded = []
            found["encode"].append(timed(lambda: encoded.append(records.encode(schema))) / n)
            found["decode"].append(timed(lambda: decode_records(schema, encoded[0])) / n)
            found["write"].append(timed(lambda: store.write(schema.view, np.arange(n),
                                                            records)) / n)
            found["get"].append(timed(lambda: [store.get(schema.view, k) for k in keys]) / GETS)
            found["get_many"].append(timed(lambda: [store.get_many(schema.view, keys[i:i + 100])
                                                    for i in range(0, GETS, 100)])
                                     / (GETS // 100))
    return {op: round(statistics.median(t) * 1e6, 3) for op, t in found.items()}
