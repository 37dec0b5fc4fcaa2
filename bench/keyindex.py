"""Key index memory and speed (#18), beside the C open-addressing table of
``bench/core.py`` (16-byte buckets at load <= 1/2, presized: no growth).

For N int64 keys (random ids, as bench/core.py draws them):

* ``bytes_per_key``: the index's own byte count (``nbytes``) after inserting N
  keys in 64k batches into an empty index;
* ``peak_bytes_per_key``: VmHWM of a fresh subprocess that only builds that
  index, minus its resident size before building (the peak reset), per key: what growth really costs,
  C mallocs included (tracemalloc does not see them);
* keys/s of batched inserts into an empty index, batched lookups of existing
  keys in random order, and mixed batches (half known, half new keys), each
  the median of REPEATS runs with its spread, with the C table's beside them.
"""
import argparse
import subprocess
import sys
import tempfile
import time

import numpy as np

from tally.bench.core import BATCH, FIRST_ID, CReference, batches, compile_reference
from tally.core.keyindex import Int64KeyIndex, StringKeyIndex

REPEATS = 3

_PEAK_CHILD = """
import numpy as np
from tally.bench.keyindex import random_ids, vm_hwm, insert_all
from tally.core.keyindex import Int64KeyIndex
ids = random_ids({n})
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")            # resets VmHWM to the current RSS: drop the temporaries of random_ids
before = vm_hwm()
index = Int64KeyIndex()
insert_all(index, ids)
print((vm_hwm() - before) / {n})
"""


def vm_hwm():
    """This process's peak resident memory, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def random_ids(n, seed=11):
    return FIRST_ID + np.random.default_rng(seed).permutation(n).astype(np.int64) * 7


def insert_all(index, keys):
    for a, b in batches(len(keys)):
        index.slots(keys[a:b])


def timed(operation):
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


def mixed_batches(index, known, fresh):
    half = BATCH // 2
    for a in range(0, len(known), half):
        index.slots(np.concatenate([known[a:a + half], fresh[a:a + half]]))


def spread(rates):
    return {"median": round(float(np.median(rates))), "min": round(min(rates)),
            "max": round(max(rates))}


def speed(lib, n):
    """keys/s of Tally's int64 index and of the C table, alternating runs."""
    rng = np.random.default_rng(3)
    ids = random_ids(n)
    known = ids[rng.integers(0, n, n)]
    fresh = -1 - rng.permutation(n).astype(np.int64)
    rates = {f"{who}_{op}": [] for who in ("tally", "c") for op in ("insert", "lookup", "mixed")}
    for _ in range(REPEATS):
        for who in ("tally", "c"):
            index = Int64KeyIndex() if who == "tally" else CReference(lib, 2 * n)
            rates[f"{who}_insert"].append(n / timed(lambda: insert_all(index, ids)))
            rates[f"{who}_lookup"].append(n / timed(lambda: [
                index.slots(known[a:b], insert=False) for a, b in batches(n)]))
            rates[f"{who}_mixed"].append(n / timed(lambda: mixed_batches(index, known, fresh)))
            del index
    figures = {name: spread(r) for name, r in rates.items()}
    for op in ("insert", "lookup", "mixed"):
        figures[f"ratio_tally_over_c_{op}"] = round(
            figures[f"tally_{op}"]["median"] / figures[f"c_{op}"]["median"], 3)
    return figures


def memory(n):
    ids = random_ids(n)
    index = Int64KeyIndex()
    insert_all(index, ids)
    strings = StringKeyIndex()
    names = [f"user-{k}" for k in ids.tolist()]
    insert_all(strings, names)
    peak = subprocess.run([sys.executable, "-c", _PEAK_CHILD.format(n=n)], check=True,
                          capture_output=True, text=True).stdout.split()[-1]
    return {"bytes_per_key": round(index.nbytes / n, 2),
            "peak_bytes_per_key": round(float(peak), 2),
            "string_bytes_per_key": round(strings.nbytes / n, 2),
            "string_key_bytes_per_key": round(sum(map(len, names)) / n, 2)}


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench keyindex")
    parser.add_argument("--keys", type=int, nargs="+",
                        default=[100_000, 1_000_000] if quick else [100_000, 1_000_000, 10_000_000])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    figures = {"benchmark": "keyindex", "quick": quick, "repeats": REPEATS, "batch": BATCH,
               "previous_bytes_per_key_at_10M": 67.11, "memory": {}, "speed": {}}
    with tempfile.TemporaryDirectory(prefix="tally-bench-keyindex-") as workdir:
        lib = compile_reference(workdir)
        for n in args.keys:
            figures["memory"][str(n)] = memory(n)
            figures["speed"][str(n)] = speed(lib, n)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures
