"""Core kernel throughput, key resolution and memory, side by side with references.

What is compared, and why:

* ``kernel``: folding pre-decoded events (int64 entity key, event time, float
  value) into five features -- count, sum, mean, max (lifetime) and a sum over
  a 7-day window sliding by 1 day -- for N entities, per event. Four
  candidates see the same columns in the same run:

  - ``tally``: ``Int64KeyIndex.slots`` then one ``FeatureArena.update`` per
    feature, in batches of 64k events, as the pipeline drives them;
  - ``c``: a small C loop compiled here at run time (``C_SOURCE``): the same
    open-addressing table (splitmix64, load factor <= 1/2, prefetching the
    buckets of a batch), then one fused loop doing the five updates, prefetching
    each event's state 16 events ahead (as Tally does), on the same
    state layout as Tally (one array per feature; the window is a ring of 7
    daily tiles plus a head epoch per entity). It is what a hand-written kernel
    costs, so ``ratio_c_over_tally`` is the share of that speed Tally reaches
    (the goal is >= 0.67, i.e. Tally within 1.5x of C);
  - ``c_record``: the same table and fused loop on one 104-byte record per
    entity (2 cache lines per event instead of 7): what a different state
    layout, rather than a better loop, would buy;
  - ``numpy_floor``: ``np.bincount``/``np.maximum.at`` over all events at once,
    slots precomputed (no hashing), mean reusing sum and count, and the window
    binned by (entity, day % 7) without expiring tiles: less work than the
    others, a floor for a vectorised-Python design (except when its fresh
    7N-bin output, page-faulted on every run, dominates, as at 10M entities).

  Every key is inserted before timing (untimed), so the timed part is the
  steady state: lookups of known keys and updates. Each repetition replays the
  stream 30 days later, so state keeps moving forward; the best of the
  repetitions counts. Afterwards Tally's values for a sample of entities must
  equal the C reference's exactly (same events, same order of additions).

* ``key_index``: key -> slot for 1M distinct int64 keys and short strings
  ("user-123456"), inserting into an empty index and looking up existing keys
  in random order, against a Python dict (``setdefault(k, len(d))``, ``d[k]``).
  Lookups get fresh ``str`` objects each repetition, as decoded keys would be,
  so the dict cannot reuse cached hashes.

* ``bytes_per_entity_feature``: an arena's memory per entity for every
  aggregation kind, lifetime and sliding 7d/1d -- the declared
  ``bytes_per_slot``, and tracemalloc's count after filling N entities in
  64k batches (includes the slack left by growing 1.5x at a time) -- plus the
  int64 key index's bytes per key. Kinds whose state is large (sketches) are
  filled with fewer entities, as ARENA_BUDGET allows.

``--arena-module`` takes FeatureArena (and KINDS) from another module, so a
candidate kernel is measured against the same references in the same run.
"""
import argparse
import ctypes
import gc
import importlib
import os
import subprocess
import tempfile
import time
import tracemalloc

import numpy as np

from tally.core.keyindex import Int64KeyIndex, StringKeyIndex

DAY_MS = 86_400_000
WINDOW_DAYS = 7
STREAM_DAYS = 30
T0_MS = 1_767_225_600_000            # 2026-01-01, a day boundary
FIRST_ID = 1_000_000_000             # entity ids are sequential user ids
BATCH = 1 << 16
REPEATS = 3
SAMPLE = 2000                        # entities compared between Tally and C

# (name, aggregation, window_ms, hop_ms): the five features of the kernel.
FEATURES = (
    ("count", "count", 0, 0),
    ("sum", "sum", 0, 0),
    ("mean", "mean", 0, 0),
    ("max", "max", 0, 0),
    ("sum_7d", "sum", WINDOW_DAYS * DAY_MS, DAY_MS),
)

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define DAY_MS 86400000LL
#define RING 7
#define PREFETCH_DISTANCE 16
#define NO_TILE INT64_MIN

typedef struct { int64_t key; int64_t slot; } bucket_t;   /* slot -1: empty */

typedef struct {
    bucket_t *table; uint64_t mask; int64_t *slot_keys; int64_t n_slots; int64_t max_slots;
    int64_t *count; double *sum; double *mean_sum; int64_t *mean_count;
    double *max; double *win; int64_t *head;
} state_t;

static inline uint64_t splitmix64(uint64_t x) {
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    x ^= x >> 31; return x;
}

/* Key -> slot for a batch; new keys get the next slot. The caller sized the
 * table for max_slots keys (load <= 1/2). insert == 0: unknown keys give -1.
 * Returns -1 if a new key finds no room, else 0. */
int ref_slots(state_t *s, const int64_t *keys, int64_t n, int insert,
              uint64_t *hashes, int64_t *out) {
    for (int64_t i = 0; i < n; i++) hashes[i] = splitmix64((uint64_t)keys[i]);
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_DISTANCE < n)
            __builtin_prefetch(&s->table[hashes[i + PREFETCH_DISTANCE] & s->mask], 1, 1);
        uint64_t j = hashes[i] & s->mask;
        for (;;) {
            bucket_t *b = &s->table[j];
            if (b->slot == -1) {
                if (!insert) { out[i] = -1; break; }
                if (s->n_slots == s->max_slots) return -1;
                b->key = keys[i]; b->slot = s->n_slots;
                s->slot_keys[s->n_slots] = keys[i];
                out[i] = s->n_slots++;
                break;
            }
            if (b->key == keys[i]) { out[i] = b->slot; break; }
            j = (j + 1) & s->mask;
        }
    }
    return 0;
}

/* The five updates in one loop: count, sum, mean (sum + count), max, and the
 * 7-day sum as a ring of daily tiles with the newest epoch in head. */
void ref_update(state_t *s, const int64_t *slots, const int64_t *ts,
                const double *values, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_DISTANCE < n) {        /* the state the loop will touch next */
            int64_t p = slots[i + PREFETCH_DISTANCE];
            __builtin_prefetch(&s->count[p], 1, 1); __builtin_prefetch(&s->sum[p], 1, 1);
            __builtin_prefetch(&s->mean_sum[p], 1, 1); __builtin_prefetch(&s->mean_count[p], 1, 1);
            __builtin_prefetch(&s->max[p], 1, 1); __builtin_prefetch(&s->head[p], 1, 1);
            __builtin_prefetch(&s->win[p * RING], 1, 1);
        }
        int64_t k = slots[i];
        double x = values[i];
        s->count[k] += 1;
        if (isnan(x)) continue;
        s->sum[k] += x;
        s->mean_sum[k] += x;
        s->mean_count[k] += 1;
        if (isnan(s->max[k]) || x > s->max[k]) s->max[k] = x;
        int64_t epoch = ts[i] / DAY_MS;         /* event times are positive */
        int64_t newest = s->head[k];
        double *ring = s->win + k * RING;
        if (epoch > newest) {
            int64_t n_clear = (newest == NO_TILE || epoch - newest >= RING)
                              ? RING : epoch - newest;
            for (int64_t j = 0; j < n_clear; j++) ring[(epoch - j) % RING] = 0.0;
            s->head[k] = epoch;
        } else if (epoch <= newest - RING) {
            continue;                           /* too late: left the ring */
        }
        ring[epoch % RING] += x;
    }
}

/* The same five updates on one 104-byte record per entity (2 cache lines
 * instead of the 7 the columnar layout touches). */
typedef struct {
    int64_t count; double sum; double mean_sum; int64_t mean_count;
    double max; int64_t head; double ring[RING];
} record_t;

void ref_update_records(record_t *records, const int64_t *slots, const int64_t *ts,
                        const double *values, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_DISTANCE < n) {
            const char *p = (const char *)&records[slots[i + PREFETCH_DISTANCE]];
            __builtin_prefetch(p, 1, 1); __builtin_prefetch(p + 64, 1, 1);
        }
        record_t *r = &records[slots[i]];
        double x = values[i];
        r->count += 1;
        if (isnan(x)) continue;
        r->sum += x;
        r->mean_sum += x;
        r->mean_count += 1;
        if (isnan(r->max) || x > r->max) r->max = x;
        int64_t epoch = ts[i] / DAY_MS;
        if (epoch > r->head) {
            int64_t n_clear = (r->head == NO_TILE || epoch - r->head >= RING)
                              ? RING : epoch - r->head;
            for (int64_t j = 0; j < n_clear; j++) r->ring[(epoch - j) % RING] = 0.0;
            r->head = epoch;
        } else if (epoch <= r->head - RING) {
            continue;
        }
        r->ring[epoch % RING] += x;
    }
}
"""

# The C reference's record_t, for the entity-major variant.
RECORD = np.dtype([("count", "i8"), ("sum", "f8"), ("mean_sum", "f8"), ("mean_count", "i8"),
                   ("max", "f8"), ("head", "i8"), ("ring", "f8", (WINDOW_DAYS,))])


# -- the C reference ------------------------------------------------------------

class _State(ctypes.Structure):
    _fields_ = [("table", ctypes.c_void_p), ("mask", ctypes.c_uint64),
                ("slot_keys", ctypes.c_void_p), ("n_slots", ctypes.c_int64),
                ("max_slots", ctypes.c_int64),
                ("count", ctypes.c_void_p), ("sum", ctypes.c_void_p),
                ("mean_sum", ctypes.c_void_p), ("mean_count", ctypes.c_void_p),
                ("max", ctypes.c_void_p), ("win", ctypes.c_void_p),
                ("head", ctypes.c_void_p)]


def compile_reference(workdir):
    """Compile ``C_SOURCE`` into a shared library in ``workdir`` and load it."""
    source = os.path.join(workdir, "reference.c")
    library = os.path.join(workdir, "reference.so")
    with open(source, "w") as f:
        f.write(C_SOURCE)
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", "-shared",
                    "-fPIC", "-o", library, source], check=True)
    lib = ctypes.CDLL(library)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ref_slots.argtypes = [ctypes.POINTER(_State), ptr, i64, ctypes.c_int, ptr, ptr]
    lib.ref_slots.restype = ctypes.c_int
    lib.ref_update.argtypes = [ctypes.POINTER(_State), ptr, ptr, ptr, i64]
    lib.ref_update.restype = None
    lib.ref_update_records.argtypes = [ptr, ptr, ptr, ptr, i64]
    lib.ref_update_records.restype = None
    return lib


def _capacity_for(n_keys):
    """The size rule of Tally's key index before #18 (16-byte buckets): a power
    of two >= 2 * keys."""
    capacity = 1024
    while capacity < 2 * n_keys:
        capacity <<= 1
    return capacity


class CReference:
    """The C reference's state for ``n_entities``, in numpy arrays it writes to."""

    def __init__(self, lib, n_entities, batch=BATCH):
        self.lib = lib
        self.capacity = _capacity_for(n_entities)
        self.arrays = {
            "table": np.full(2 * self.capacity, -1, np.int64),
            "slot_keys": np.zeros(n_entities, np.int64),
            "count": np.zeros(n_entities, np.int64),
            "sum": np.zeros(n_entities), "mean_sum": np.zeros(n_entities),
            "mean_count": np.zeros(n_entities, np.int64),
            "max": np.full(n_entities, np.nan),
            "win": np.zeros(n_entities * WINDOW_DAYS),
            "head": np.full(n_entities, np.iinfo(np.int64).min, np.int64),
        }
        self.records = np.zeros(n_entities, RECORD)
        self.records["max"] = np.nan
        self.records["head"] = np.iinfo(np.int64).min
        self.n_entities = n_entities
        self.state = _State(mask=self.capacity - 1, n_slots=0, max_slots=n_entities,
                            **{name: a.ctypes.data for name, a in self.arrays.items()})
        self.hashes = np.empty(batch, np.uint64)
        self.slot_buffer = np.empty(batch, np.int64)

    def slots(self, keys, insert=True):
        """Slots of ``keys`` (one batch at most ``batch`` long): a view of a buffer."""
        n = len(keys)
        if self.lib.ref_slots(ctypes.byref(self.state), keys.ctypes.data, n, int(insert),
                              self.hashes.ctypes.data, self.slot_buffer.ctypes.data):
            raise ValueError("C reference: more keys than it was sized for")
        return self.slot_buffer[:n]

    def update(self, slots, timestamps, values):
        self.lib.ref_update(ctypes.byref(self.state), slots.ctypes.data,
                            timestamps.ctypes.data, values.ctypes.data, len(slots))

    def update_records(self, slots, timestamps, values):
        self.lib.ref_update_records(self.records.ctypes.data, slots.ctypes.data,
                                    timestamps.ctypes.data, values.ctypes.data, len(slots))

    def lookup(self, keys):
        return np.concatenate([self.slots(keys[a:a + BATCH], insert=False).copy()
                               for a in range(0, len(keys), BATCH)])

    def window_sum(self, slot, as_of):
        """The 7-day sum as of ``as_of``, adding tiles in the order Tally does."""
        newest = int(self.arrays["head"][slot])
        if newest == np.iinfo(np.int64).min:
            return 0.0
        current = as_of // DAY_MS
        total = 0.0
        lo = max(current - WINDOW_DAYS + 1, newest - WINDOW_DAYS + 1)
        for epoch in range(lo, min(current, newest) + 1):
            total += self.arrays["win"][slot * WINDOW_DAYS + epoch % WINDOW_DAYS]
        return total


# -- events ---------------------------------------------------------------------

def make_events(n_entities, n_events, distribution, seed=7):
    """Entity ids and an event stream over them: keys, increasing times, values."""
    rng = np.random.default_rng(seed)
    ids = FIRST_ID + np.arange(n_entities, dtype=np.int64)
    if distribution == "uniform":
        which = rng.integers(0, n_entities, n_events)
    else:   # Zipf-ish: rank r has weight ~ 1 / r^1.1; hot ranks scattered over ids
        rank = (rng.zipf(1.1, n_events) - 1) % n_entities
        which = rng.permutation(n_entities)[rank]
    keys = ids[which]
    timestamps = T0_MS + np.arange(n_events, dtype=np.int64) * (STREAM_DAYS * DAY_MS // n_events)
    values = np.round(rng.random(n_events) * 100, 2)
    return ids, keys, timestamps, values


def batches(n, batch=BATCH):
    return [(a, min(a + batch, n)) for a in range(0, n, batch)]


# -- the candidates -------------------------------------------------------------

def tally_state(arenas_module, ids):
    """An index holding every id (inserted untimed) and the five arenas."""
    index = Int64KeyIndex(len(ids))
    for a, b in batches(len(ids)):
        index.slots(ids[a:b])
    index.slots(ids[:BATCH])    # a full batch of known keys: any table growth happens now
    arenas = [arenas_module.FeatureArena(agg, window, hop, 0, capacity=len(ids))
              for _, agg, window, hop in FEATURES]
    return index, arenas


def run_tally(index, arenas, keys, timestamps, values):
    """Seconds spent resolving keys and in each arena's update, over the stream."""
    t_keys, t_arenas = 0.0, [0.0] * len(arenas)
    clock = time.perf_counter
    for a, b in batches(len(keys)):
        start = clock()
        slots = index.slots(keys[a:b])
        t_keys += clock() - start
        t, v = timestamps[a:b], values[a:b]
        for j, arena in enumerate(arenas):
            start = clock()
            arena.update(slots, t, v)
            t_arenas[j] += clock() - start
    return t_keys, t_arenas


def c_state(lib, ids):
    """A C reference holding every id (inserted untimed), in the same slot order."""
    ref = CReference(lib, len(ids))
    for a, b in batches(len(ids)):
        ref.slots(ids[a:b])
    return ref


def run_c(ref, update, keys, timestamps, values):
    """Seconds spent resolving keys and in the fused ``update``, over the stream."""
    t_keys = t_update = 0.0
    clock = time.perf_counter
    for a, b in batches(len(keys)):
        start = clock()
        slots = ref.slots(keys[a:b])
        middle = clock()
        update(slots, timestamps[a:b], values[a:b])
        t_keys += middle - start
        t_update += clock() - middle
    return t_keys, t_update


def run_numpy_floor(slots, timestamps, values, n_entities):
    """Seconds for the five aggregates of the whole stream by bincount; and the counts."""
    start = time.perf_counter()
    count = np.bincount(slots, minlength=n_entities)
    total = np.bincount(slots, weights=values, minlength=n_entities)
    mean = total / np.maximum(count, 1)
    maximum = np.full(n_entities, -np.inf)
    np.maximum.at(maximum, slots, values)
    tiles = slots * WINDOW_DAYS + (timestamps // DAY_MS) % WINDOW_DAYS
    np.bincount(tiles, weights=values, minlength=n_entities * WINDOW_DAYS)
    elapsed = time.perf_counter() - start
    del mean, maximum, tiles
    return elapsed, count


# -- correctness ------------------------------------------------------------------

def c_expected(ref, c_slots, as_of):
    """The five features of the C reference for ``c_slots``, from both layouts."""
    r, rec = ref.arrays, ref.records[c_slots]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = r["mean_sum"][c_slots] / r["mean_count"][c_slots]
    columnar = {"count": r["count"][c_slots], "sum": r["sum"][c_slots], "mean": mean,
                "max": r["max"][c_slots],
                "sum_7d": np.array([ref.window_sum(s, as_of) for s in c_slots])}
    for name in ("count", "sum", "mean_sum", "mean_count", "max", "head"):
        if not np.array_equal(rec[name], r[name][c_slots], equal_nan=True):
            raise AssertionError(f"core bench: the C record layout's {name} differs "
                                 "from the columnar layout's")
    if not np.array_equal(rec["ring"], r["win"].reshape(-1, WINDOW_DAYS)[c_slots]):
        raise AssertionError("core bench: the C record layout's window differs")
    return columnar


def check_same_state(index, arenas, ref, sample_keys, as_of):
    """Fail loudly unless Tally's features equal the C reference's for the sample."""
    t_slots, c_slots = index.lookup(sample_keys), ref.lookup(sample_keys)
    if (t_slots < 0).any() or (c_slots < 0).any():
        raise AssertionError("core bench: a sampled key is missing from an index")
    expected = c_expected(ref, c_slots, as_of)
    for (name, *_), arena in zip(FEATURES, arenas):
        got, _ = arena.read(t_slots, as_of)
        want = expected[name]
        same = (got == want) | (np.isnan(got) & np.isnan(want))
        if not same.all():
            bad = np.flatnonzero(~same)[0]
            raise AssertionError(
                f"core bench: Tally's {name} differs from the C reference for "
                f"{(~same).sum()} of {len(sample_keys)} sampled entities, e.g. key "
                f"{sample_keys[bad]}: {got[bad]!r} != {want[bad]!r}")
    return t_slots


# -- kernel -----------------------------------------------------------------------

def kernel(lib, arenas_module, n_entities, n_events, distribution, repeats=REPEATS):
    """Best-of-``repeats`` ns/event of every candidate for one entity count."""
    ids, keys, timestamps, values = make_events(n_entities, n_events, distribution)
    index, arenas = tally_state(arenas_module, ids)
    ref = c_state(lib, ids)
    floor_slots = keys - FIRST_ID              # slot i is id i in both indexes
    runs = {"tally": [], "c": [], "c_record": [], "numpy_floor": []}
    for rep in range(repeats):                 # interleaved: noise hits all alike
        t = timestamps + rep * STREAM_DAYS * DAY_MS
        runs["tally"].append(run_tally(index, arenas, keys, t, values))
        runs["c"].append(run_c(ref, ref.update, keys, t, values))
        runs["c_record"].append(run_c(ref, ref.update_records, keys, t, values))
        seconds, floor_count = run_numpy_floor(floor_slots, t, values, n_entities)
        runs["numpy_floor"].append(seconds)
    sample = np.unique(np.concatenate([keys[:SAMPLE // 2],
                                       np.random.default_rng(1).choice(ids, SAMPLE // 2)]))
    t_slots = check_same_state(index, arenas, ref, sample, int(t[-1]))
    if not np.array_equal(arenas[0].read(t_slots, int(t[-1]))[0],
                          repeats * floor_count[sample - FIRST_ID]):
        raise AssertionError("core bench: numpy floor counts differ from Tally's")
    figures = kernel_figures(runs, n_events)
    figures["tally_index_capacity"] = index.capacity
    figures["c_index_capacity"] = ref.capacity
    return figures


def kernel_figures(runs, n_events):
    """ns/event of the best repetition of each candidate, and the ratios."""
    ns = 1e9 / n_events
    t_keys, t_arenas = min(runs["tally"], key=lambda run: run[0] + sum(run[1]))
    tally = (t_keys + sum(t_arenas)) * ns
    figures = {
        "tally_ns_per_event": round(tally, 1),
        "tally_events_per_s": round(1e9 / tally),
        "tally_key_share": round(t_keys * ns / tally, 3),
        "tally_arena_share": round(sum(t_arenas) * ns / tally, 3),
        "tally_key_ns_per_event": round(t_keys * ns, 1),
        "tally_arena_ns_per_event": {name: round(sec * ns, 1)
                                     for (name, *_), sec in zip(FEATURES, t_arenas)},
        "numpy_floor_ns_per_event": round(min(runs["numpy_floor"]) * ns, 1),
    }
    for name in ("c", "c_record"):
        c_keys, c_update = min(runs[name], key=sum)
        c = (c_keys + c_update) * ns
        figures.update({
            f"{name}_ns_per_event": round(c, 1),
            f"{name}_events_per_s": round(1e9 / c),
            f"{name}_key_ns_per_event": round(c_keys * ns, 1),
            f"{name}_update_ns_per_event": round(c_update * ns, 1),
            f"ratio_{name}_over_tally": round(c / tally, 3),
        })
    figures["ratio_tally_over_c"] = round(tally / (figures["c_ns_per_event"]), 3)
    return figures


# -- key index --------------------------------------------------------------------

def best_rate(n, make_input, operation, repeats=REPEATS):
    """Best keys/s of ``operation(input)`` over fresh inputs from ``make_input()``."""
    best = float("inf")
    for _ in range(repeats):
        data = make_input()
        gc.collect()
        start = time.perf_counter()
        operation(data)
        best = min(best, time.perf_counter() - start)
    return round(n / best)


def insert_batches(index, keys):
    for a, b in batches(len(keys)):
        index.slots(keys[a:b])


def lookup_batches(index, keys):
    for a, b in batches(len(keys)):
        index.slots(keys[a:b], insert=False)


def dict_insert(keys):
    d = {}
    setdefault = d.setdefault
    for k in keys:
        setdefault(k, len(d))
    return d


def key_index(lib, n_keys):
    """keys/s of Tally's indexes, the C table and a dict, inserting and looking up."""
    rng = np.random.default_rng(11)
    ids = FIRST_ID + rng.permutation(n_keys).astype(np.int64) * 7
    probe = ids[rng.integers(0, n_keys, n_keys)]
    int_index = Int64KeyIndex()
    insert_batches(int_index, ids)
    ref = c_state(lib, ids)
    int_dict = dict_insert(ids.tolist())
    probe_list = probe.tolist()

    strings = lambda a: [f"user-{k}" for k in a.tolist()]   # noqa: E731, fresh objects
    str_index = StringKeyIndex()
    insert_batches(str_index, strings(ids))
    str_dict = dict_insert(strings(ids))
    figures = {
        "keys": n_keys,
        "int64_tally_insert_keys_per_s": best_rate(
            n_keys, lambda: (Int64KeyIndex(), ids), lambda x: insert_batches(*x)),
        "int64_tally_lookup_keys_per_s": best_rate(
            n_keys, lambda: probe, lambda p: lookup_batches(int_index, p)),
        "int64_c_lookup_keys_per_s": best_rate(
            n_keys, lambda: probe, lambda p: lookup_batches(ref, p)),
        "int64_dict_insert_keys_per_s": best_rate(n_keys, ids.tolist, dict_insert),
        "int64_dict_lookup_keys_per_s": best_rate(
            n_keys, lambda: probe_list, lambda p: [int_dict[k] for k in p]),
        "str_tally_insert_keys_per_s": best_rate(
            n_keys, lambda: (StringKeyIndex(), strings(ids)), lambda x: insert_batches(*x)),
        "str_tally_lookup_keys_per_s": best_rate(
            n_keys, lambda: strings(probe), lambda p: lookup_batches(str_index, p)),
        "str_dict_insert_keys_per_s": best_rate(n_keys, lambda: strings(ids), dict_insert),
        "str_dict_lookup_keys_per_s": best_rate(
            n_keys, lambda: strings(probe), lambda p: [str_dict[k] for k in p]),
    }
    for kind in ("int64", "str"):
        for op in ("insert", "lookup"):
            figures[f"{kind}_{op}_ratio_tally_over_dict"] = round(
                figures[f"{kind}_tally_{op}_keys_per_s"] / figures[f"{kind}_dict_{op}_keys_per_s"], 2)
    return figures


# -- memory -----------------------------------------------------------------------

WINDOWS = {"lifetime": (0, 0), "sliding_7d_1d": (WINDOW_DAYS * DAY_MS, DAY_MS)}
ARENA_BUDGET = 4 << 30      # bytes one measured arena may take (sketches are big)


def new_arena(arenas_module, aggregation, window_ms, hop_ms):
    """An empty arena of any kind in KINDS (parametrised kinds take their default)."""
    make = getattr(arenas_module, "make_arena", arenas_module.FeatureArena)
    return make(aggregation, window_ms, hop_ms, 0, capacity=0)


def arena_bytes(arenas_module, aggregation, window_ms, hop_ms, n_entities):
    """Declared and measured bytes per entity of one arena filled with entities
    in 64k batches: up to N of them, fewer if that would pass ARENA_BUDGET."""
    declared = new_arena(arenas_module, aggregation, window_ms, hop_ms).bytes_per_slot
    n = min(n_entities, max(BATCH, ARENA_BUDGET // (2 * declared) // BATCH * BATCH))
    gc.collect()
    tracemalloc.start()
    arena = new_arena(arenas_module, aggregation, window_ms, hop_ms)
    for a, b in batches(n):
        arena.update(np.arange(a, b, dtype=np.int64), np.full(b - a, T0_MS, np.int64),
                     np.ones(b - a))
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del arena
    return {"declared": declared, "measured": round(current / n, 2),
            "peak_while_growing": round(peak / n, 2), "entities": n}


def memory(arenas_module, n_entities):
    figures = {"entities": n_entities}
    for window, (window_ms, hop_ms) in WINDOWS.items():
        for kind in arenas_module.KINDS:
            figures[f"{kind}_{window}"] = arena_bytes(arenas_module, kind, window_ms,
                                                      hop_ms, n_entities)
    ids = FIRST_ID + np.arange(n_entities, dtype=np.int64)
    index = Int64KeyIndex()
    insert_batches(index, ids)
    figures["int64_key_index_bytes_per_key"] = round(index.nbytes / len(index), 2)
    figures["int64_key_index_capacity"] = index.capacity
    presized = Int64KeyIndex(n_entities)
    presized.slots(ids)
    figures["int64_key_index_presized_one_batch_bytes_per_key"] = round(
        presized.nbytes / len(presized), 2)
    return figures


# -- entry point ------------------------------------------------------------------

def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench core")
    parser.add_argument("--entities", type=int, nargs="+",
                        default=[100_000, 1_000_000] if quick else [100_000, 1_000_000, 10_000_000])
    parser.add_argument("--events", type=int, default=2_000_000 if quick else 10_000_000)
    parser.add_argument("--keys", choices=["uniform", "zipf"], default="uniform",
                        help="how events pick their entity")
    parser.add_argument("--index-keys", type=int, default=1_000_000)
    parser.add_argument("--memory-entities", type=int,
                        default=1_000_000 if quick else 10_000_000)
    parser.add_argument("--arena-module", default="tally.core.arena",
                        help="where FeatureArena comes from: a candidate kernel can be "
                             "measured against the same references")
    args = parser.parse_args(argv)
    arenas_module = importlib.import_module(args.arena_module)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tally-bench-core-") as workdir:
        lib = compile_reference(workdir)
        figures = {"benchmark": "core", "quick": quick, "events": args.events,
                   "key_distribution": args.keys, "batch": BATCH, "repeats": REPEATS,
                   "arena_module": args.arena_module,
                   "kernel": {}}
        for n in args.entities:
            figures["kernel"][str(n)] = kernel(lib, arenas_module, n, args.events, args.keys)
            gc.collect()
        figures["key_index"] = key_index(lib, args.index_keys)
    gc.collect()
    figures["bytes_per_entity_feature"] = memory(arenas_module, args.memory_entities)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures
