"""Property tests of ``tally.core.arena.FeatureArena``.

The oracles are ``tally.core.reference.ReferenceFeature`` (brute force, event by
event) for update/read/late-drop semantics, an arena built from the whole stream
for merges, the original arena for snapshots, and pandas for a large seeded
sliding-window check.

Hypothesis budgets: the profiles of tests/conftest.py, chosen by ``HYPOTHESIS_PROFILE``
("ci" by default, "thorough"); each test's budget is a share of the profile's
``max_examples`` (see ``examples``), so the ci run stays fast.
"""
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.core.arena import FeatureArena
from tally.core.keyindex import Int64KeyIndex
from tally.core.reference import ReferenceFeature


def examples(ci_count):
    """A per-test budget: ``ci_count`` under the "ci" profile (max_examples 60),
    scaled with the loaded profile's max_examples otherwise."""
    return max(1, ci_count * settings.default.max_examples // 60)


# these tests draw long event lists on purpose
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


INT64_MIN = -2**63
INT64_MAX = 2**63 - 1

AGGREGATIONS = ("count", "sum", "mean", "min", "max", "first", "last")
WINDOWS = {
    "lifetime": (0, 0, 0),
    "tumbling": (100, 100, 0),
    "sliding": (100, 10, 0),
    "sliding_late": (60, 20, 30),     # 3 window tiles + ceil(30/20) = 2 lateness tiles
}
FLOAT_AGGREGATIONS = ("sum", "mean")     # results of float additions: compared with isclose

# -- strategies ----------------------------------------------------------------

# Mostly a small range around the window sizes (so windows overlap, expire and
# events arrive out of order / too late), some exact tile boundaries (and so
# duplicate timestamps), and a few far jumps that clear whole rings.
timestamps = st.one_of(
    st.integers(-350, 650),
    st.integers(-350, 650),
    st.sampled_from([-200, -101, -100, -61, -60, -1, 0, 1, 19, 20, 59, 60, 99, 100,
                     101, 119, 120, 200, 300, -2**62, 2**62]),      # (the accepted range)
    st.integers(-10**7, 10**7),
)
values = st.one_of(
    st.just(math.nan),                                   # a null
    st.integers(-3, 3).map(float),                       # ties for min/max
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
)


# One event before it is resolved: its entity (mod the entity count), its timestamp
# or ("pool", i): the i-th timestamp of the list's pool, its value, and whether it
# passes the filter mask. Built once: building strategies per draw is slow.
_raw_event = st.tuples(
    st.integers(0, 3),
    st.integers(0, 5).map(lambda i: ("pool", i)) | timestamps,
    values,
    st.sampled_from([True, True, True, False]),
)


@st.composite
def events(draw, n_entities, max_size):
    """Lists of (entity, timestamp, value, applies) tuples; ``applies`` is the filter
    mask. Timestamps come half the time from a small per-list pool, so that equal
    timestamps (first/last tie-breaks) and shared tiles are common."""
    pool = draw(st.lists(timestamps, min_size=1, max_size=6), "timestamp pool")
    n = draw(st.integers(0, max_size), "n_events")
    raw = draw(st.lists(_raw_event, min_size=n, max_size=n))
    return [(entity % n_entities, pool[ts[1] % len(pool)] if isinstance(ts, tuple) else ts,
             value, applies) for entity, ts, value, applies in raw]


@st.composite
def batches(draw, max_batches=5, max_events=7):
    n_entities = draw(st.integers(1, 4))
    stream = draw(events(n_entities, max_batches * max_events))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=max_batches - 1)))
    bounds = [0] + cuts + [len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


# -- helpers -------------------------------------------------------------------

def as_arrays(batch):
    slots = np.array([e[0] for e in batch], dtype=np.int64)
    ts = np.array([e[1] for e in batch], dtype=np.int64)
    vals = np.array([e[2] for e in batch], dtype=np.float64)
    mask = np.array([e[3] for e in batch], dtype=bool)
    return slots, ts, vals, mask


def update_arena(arena, batch, slots=None, use_mask=True):
    s, ts, vals, mask = as_arrays(batch)
    if slots is not None:
        s = slots
    if not use_mask:
        assert mask.all()
        mask = None
    arena.update(s, ts, vals, mask)


def update_reference(ref, batch):
    for entity, ts, value, applies in batch:
        ref.update(entity, ts, value, applies)


def agrees(aggregation, got, ok, want):
    """Does an arena result (value, valid) match the reference's ``want``?"""
    if want is None:
        return not ok
    if not ok:
        return False
    if aggregation == "count":
        return int(got) == want
    if aggregation in FLOAT_AGGREGATIONS:
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    return got == want


def probe_times(all_events, window_ms, hop_ms, lateness_ms, extra):
    """as_of times before, inside and well after the data, including tile
    boundaries and the first/last instant of a window."""
    times = set(extra)
    tss = sorted({e[1] for e in all_events})
    if tss:
        span = window_ms + lateness_ms + max(hop_ms, 1)
        times |= {tss[0] - 10 * span, tss[0] - 1, tss[-1], tss[-1] + span, tss[-1] + 10**9}
        for t in tss[::max(1, len(tss) // 3)]:
            times.add(t)
            if hop_ms:
                b = (t // hop_ms) * hop_ms
                times |= {b, b - 1, b + hop_ms, b + window_ms - 1, b + window_ms}
    return sorted(times)


def assert_arenas_agree(aggregation, a, a_slots, b, b_slots, times, exact=False):
    """Reads of slots ``a_slots`` of ``a`` and ``b_slots`` of ``b`` agree at every time."""
    for t in times:
        va, oka = a.read(a_slots, t)
        vb, okb = b.read(b_slots, t)
        assert np.array_equal(oka, okb), (t, oka, okb, va, vb)
        va, vb = va[oka], vb[okb]
        if exact or aggregation not in FLOAT_AGGREGATIONS:
            assert np.array_equal(va, vb), (t, va, vb)
        else:
            assert np.allclose(va, vb, rtol=1e-9, atol=1e-9), (t, va, vb)


# -- 1. update/read/late_dropped against the reference ---------------------------

@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@settings(max_examples=examples(25), suppress_health_check=HEALTH)
@given(data=st.data(), stream=batches(), capacity=st.sampled_from([0, 1, 1024]))
def test_matches_reference(aggregation, window, data, stream, capacity):
    window_ms, hop_ms, lateness_ms = WINDOWS[window]
    arena = FeatureArena(aggregation, window_ms, hop_ms, lateness_ms, capacity=capacity)
    ref = ReferenceFeature(aggregation, window_ms, hop_ms, lateness_ms)
    seen = []
    for batch in stream:
        use_mask = not all(e[3] for e in batch) or data.draw(st.booleans(), "pass mask")
        update_arena(arena, batch, use_mask=use_mask)
        update_reference(ref, batch)
        seen.extend(batch)
        assert arena.late_dropped == ref.late_dropped
        extra = data.draw(st.lists(timestamps, max_size=3), "extra as_of")
        times = probe_times(seen, window_ms, hop_ms, lateness_ms, extra)
        keys = sorted(ref.entities)
        slots = np.array(keys + [-1], dtype=np.int64)        # -1: unknown entity
        for t in times:
            got, ok = arena.read(slots, t)
            assert not ok[-1], "slot -1 must read as invalid"
            for j, key in enumerate(keys):
                want = ref.read(key, t)
                assert agrees(aggregation, got[j], ok[j], want), (
                    f"{aggregation} {window}: entity {key} as_of {t}: arena "
                    f"({got[j]!r}, valid={bool(ok[j])}), reference {want!r}")
        # the per-slot as_of form of read agrees with the scalar form
        per_slot_times = np.array([times[j % len(times)] for j in range(len(keys))], np.int64)
        got, ok = arena.read(slots[:-1], per_slot_times)
        for j, key in enumerate(keys):
            assert agrees(aggregation, got[j], ok[j],
                          ref.read(key, int(per_slot_times[j])))


# -- 2. merge of arenas built from consecutive parts ------------------------------

@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@settings(max_examples=examples(15), suppress_health_check=HEALTH)
@given(data=st.data(),
       pool=st.lists(st.sampled_from([INT64_MIN, INT64_MAX, 0, -1])
                     | st.integers(INT64_MIN, INT64_MAX), min_size=1, max_size=4, unique=True),
       k=st.integers(1, 4))
def test_merge_of_parts_equals_whole(aggregation, window, data, pool, k):
    window_ms, hop_ms, lateness_ms = WINDOWS[window]
    stream = data.draw(events(len(pool), 24), "stream")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), min_size=k - 1,
                                     max_size=k - 1), "cuts"))
    bounds = [0] + cuts + [len(stream)]
    parts = [stream[bounds[i]:bounds[i + 1]] for i in range(k)]
    keys_of_event = lambda evs: np.array([pool[e[0]] for e in evs], dtype=np.int64)  # noqa: E731

    def build(evs, capacity):
        index = Int64KeyIndex()
        arena = FeatureArena(aggregation, window_ms, hop_ms, lateness_ms, capacity=capacity)
        update_arena(arena, evs, slots=index.slots(keys_of_event(evs)))
        return index, arena

    whole_index, whole = build(stream, 1024)
    capacities = data.draw(st.lists(st.sampled_from([0, 1, 1024]), min_size=k, max_size=k),
                           "capacities")
    built = [build(part, cap) for part, cap in zip(parts, capacities)]
    first_index, merged = built[0]
    for part_index, part_arena in built[1:]:
        merged.merge(part_arena, first_index.slots(part_index.all_keys()))

    keys = whole_index.all_keys()
    assert sorted(first_index.all_keys().tolist()) == sorted(keys.tolist())
    extra = data.draw(st.lists(timestamps, max_size=3), "extra as_of")
    times = probe_times(stream, window_ms, hop_ms, lateness_ms, extra)
    assert_arenas_agree(aggregation, merged, first_index.lookup(keys),
                        whole, whole_index.lookup(keys), times)


def test_merge_keeps_arrival_order_for_ties():
    """first keeps the earlier part's value, last takes the later part's, at equal times."""
    for aggregation, expected in (("first", 1.0), ("last", 2.0)):
        for window in WINDOWS.values():
            a = FeatureArena(aggregation, *window)
            b = FeatureArena(aggregation, *window)
            a.update([0], [50], [1.0])
            b.update([0], [50], [2.0])
            a.merge(b, [0])
            value, ok = a.read([0], 50)
            assert ok[0] and value[0] == expected, (aggregation, window, value)


def test_merge_into_fresh_slots_and_empty_parts():
    a = FeatureArena("sum", 100, 10, 0, capacity=0)
    b = FeatureArena("sum", 100, 10, 0, capacity=0)
    b.update([0, 1], [5, 15], [1.0, 2.0])
    a.merge(FeatureArena("sum", 100, 10, 0), [])           # nothing to merge
    a.merge(b, [7, 3])                                     # slots a has never seen
    values, ok = a.read([7, 3, 0], 20)
    assert ok.tolist() == [True, True, True]
    assert values.tolist() == [1.0, 2.0, 0.0]


# -- 3. snapshots -----------------------------------------------------------------

def read_all(arena, slots, times):
    return [arena.read(slots, t) for t in times]


def assert_reads_identical(a, b, slots, times):
    for (va, oka), (vb, okb) in zip(read_all(a, slots, times), read_all(b, slots, times)):
        assert np.array_equal(oka, okb)
        assert np.array_equal(va, vb, equal_nan=True)


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@settings(max_examples=examples(8), suppress_health_check=HEALTH)
@given(data=st.data(), before=batches(max_batches=3), after=batches(max_batches=2),
       spare_slots=st.integers(0, 3))
def test_snapshot_round_trip(aggregation, window, data, before, after, spare_slots):
    window_ms, hop_ms, lateness_ms = WINDOWS[window]
    arena = FeatureArena(aggregation, window_ms, hop_ms, lateness_ms,
                         capacity=data.draw(st.sampled_from([0, 1, 1024]), "capacity"))
    for batch in before:
        update_arena(arena, batch)
    n_slots = max([e[0] + 1 for b in before for e in b], default=0) + spare_slots
    params = arena.describe()
    arrays = arena.export_arrays(n_slots)
    restored = FeatureArena.from_arrays(params, arrays)
    assert restored.describe() == params
    assert restored.late_dropped == arena.late_dropped
    assert (restored.window_tiles, restored.ring_tiles) == (arena.window_tiles, arena.ring_tiles)
    # the export is a copy: mutating it does not touch either arena
    for array in arrays.values():
        array[...] = 0

    seen = [e for b in before for e in b]
    slots = np.arange(max(n_slots, 4), dtype=np.int64)
    if n_slots < arena.capacity:
        # slots beyond the export exist in the original only
        slots = slots[:n_slots]
    times = probe_times(seen, window_ms, hop_ms, lateness_ms, [0])
    assert_reads_identical(arena, restored, slots, times)

    touched = set()
    for batch in after:
        update_arena(arena, batch)
        update_arena(restored, batch)
        seen.extend(batch)
        touched |= {e[0] for e in batch}
        assert restored.late_dropped == arena.late_dropped
        slots = np.array(sorted(set(range(n_slots)) | touched), dtype=np.int64)
        times = probe_times(seen, window_ms, hop_ms, lateness_ms, [0])
        assert_reads_identical(arena, restored, slots, times)
    # and the two states are bit for bit the same
    n = max([n_slots] + [e[0] + 1 for b in after for e in b])
    ea, eb = arena.export_arrays(n), restored.export_arrays(n)
    assert sorted(ea) == sorted(eb)
    for name in ea:
        assert np.array_equal(ea[name], eb[name], equal_nan=True), name


def test_snapshot_of_no_slots_and_clipped_export():
    arena = FeatureArena("mean", 60, 20, 30, capacity=2)
    arena.update([0, 1], [10, 20], [1.0, 3.0])
    empty = FeatureArena.from_arrays(arena.describe(), arena.export_arrays(0))
    assert empty.capacity == 0
    assert empty.read([0], 20)[1].tolist() == [False]
    clipped = arena.export_arrays(10**6)                  # more than it has: clipped
    assert len(clipped["head"]) == arena.capacity
    restored = FeatureArena.from_arrays(arena.describe(), clipped)
    assert_reads_identical(arena, restored, np.arange(2), [0, 19, 20, 39, 60, 80])


def snapshot(aggregation="mean", window=(60, 20, 30)):
    arena = FeatureArena(aggregation, *window, capacity=3)
    arena.update([0, 1, 2], [10, 20, 30], [1.0, 2.0, 3.0])
    return arena.describe(), arena.export_arrays(3)


@pytest.mark.parametrize("corrupt, message", [
    (lambda a: a.pop("head"), r"expected arrays \['f64', 'head', 'i64', 'late_dropped'\]"),
    (lambda a: a.pop("late_dropped"), r"expected arrays .*late_dropped"),
    (lambda a: a.update(f32=a.pop("f64")), r"expected arrays .*found .*f32"),
    (lambda a: a.update(extra=np.zeros(3)), r"expected arrays .*found .*extra"),
    # a partial slot (5 tiles per slot), or arrays disagreeing on the slot count: the
    # message names the array (the one checked first, or the one that disagrees)
    (lambda a: a.update(f64=a["f64"][:-1]), r"f64 has 14 entries|14 cells"),
    (lambda a: a.update(i64=a["i64"][:-5]), r"array i64 has 10 entries, expected 15"),
    (lambda a: a.update(head=a["head"][:-1]), r"array (head|f64|i64) has \d+ entries"),
    (lambda a: a.update(head=np.zeros(4, np.int64)), r"array (head|f64|i64) has \d+ entries"),
], ids=["missing-head", "missing-late_dropped", "renamed", "extra", "partial-slot",
        "short-i64", "short-head", "long-head"])
def test_corrupt_arena_snapshot_is_rejected(corrupt, message):
    params, arrays = snapshot()
    corrupt(arrays)
    with pytest.raises(ValueError, match=message):
        FeatureArena.from_arrays(params, arrays)


def test_corrupt_lifetime_count_snapshot_is_rejected():
    params, arrays = snapshot("count", (0, 0, 0))
    assert sorted(arrays) == ["i64", "late_dropped"]
    with pytest.raises(ValueError, match=r"expected arrays \['i64', 'late_dropped'\]"):
        FeatureArena.from_arrays(params, dict(arrays, head=np.zeros(3, np.int64)))


# -- 5. API errors ----------------------------------------------------------------

def test_unknown_aggregation():
    with pytest.raises(ValueError, match=r"unknown aggregation 'median'.*count, sum, mean"):
        FeatureArena("median")


@pytest.mark.parametrize("window_ms, hop_ms", [(100, 30), (100, 0), (100, -10), (-100, 10),
                                               (10, 100)])
def test_window_must_be_a_multiple_of_hop(window_ms, hop_ms):
    with pytest.raises(ValueError, match=rf"window {window_ms} ms must be a positive "
                                         rf"multiple of its hop {hop_ms} ms"):
        FeatureArena("sum", window_ms, hop_ms)


@pytest.mark.parametrize("lateness_ms", [-1, -19, -109])
def test_negative_lateness_is_rejected(lateness_ms):
    # (before this was validated, -19 silently shrank the ring below the window and
    # -109 made ring_tiles 0, so update() died with SIGFPE)
    with pytest.raises(ValueError, match=rf"lateness {lateness_ms} ms must not be negative"):
        FeatureArena("sum", 100, 10, lateness_ms)


@pytest.mark.parametrize("args, message", [
    (([0, 1], [1], [1.0, 2.0]), "slots and timestamps differ in length"),
    (([0, 1], [1, 2], [1.0]), "values and slots differ in length"),
    (([0, 1], [1, 2], [1.0, 2.0], [True]), "mask and slots differ in length"),
    (([0, -1], [1, 2], [1.0, 2.0]), "negative slot"),
    (([0, 1], [1, 2]), "sum needs values"),
])
def test_update_errors_leave_the_arena_untouched(args, message):
    arena = FeatureArena("sum", 100, 10, 0, capacity=1)
    arena.update([0], [5], [1.0])
    before = arena.export_arrays(arena.capacity)
    with pytest.raises(ValueError, match=message):
        arena.update(*args)
    after = arena.export_arrays(arena.capacity)
    assert sorted(before) == sorted(after)
    for name in before:
        assert np.array_equal(before[name], after[name], equal_nan=True), name


def test_count_needs_no_values():
    arena = FeatureArena("count", 100, 10, 0)
    arena.update([0, 0], [5, 6])
    assert arena.read([0], 6)[0].tolist() == [2]


@pytest.mark.parametrize("other", [
    ("mean", 100, 10, 0),           # different aggregation
    ("sum", 200, 10, 0),            # different window
    ("sum", 100, 20, 0),            # different hop
    ("sum", 100, 10, 30),           # different lateness
    ("sum", 0, 0, 0),               # lifetime
])
def test_merge_of_different_definitions(other):
    arena = FeatureArena("sum", 100, 10, 0)
    with pytest.raises(ValueError, match="cannot merge .* different definitions"):
        arena.merge(FeatureArena(*other), [0])


def test_merge_with_too_many_slot_mappings():
    arena = FeatureArena("sum", 100, 10, 0)
    with pytest.raises(ValueError, match="more slot mappings than the other arena has slots"):
        arena.merge(FeatureArena("sum", 100, 10, 0, capacity=2), [0, 1, 2])


# -- edge cases found while writing these tests -------------------------------------

MAX_EVENT_TIME = 2**62        # update() accepts event times in [-2**62, 2**62]


@pytest.mark.parametrize("ts", [INT64_MAX, INT64_MIN, MAX_EVENT_TIME + 1, -MAX_EVENT_TIME - 1])
def test_event_times_out_of_range_are_rejected(ts):
    """first/last keep INT64_MAX / INT64_MIN as the time of an empty tile, so an event
    at exactly those times could not be recorded (it read as invalid before update()
    started rejecting out-of-range times); now the batch is refused, untouched."""
    arena = FeatureArena("last", 100, 10, 0, capacity=1)
    arena.update([0], [5], [1.0])
    before = arena.export_arrays(1)
    with pytest.raises(ValueError, match=r"event times must lie within"):
        arena.update([0, 0], [6, ts], [2.0, 3.0])
    after = arena.export_arrays(1)
    for name in before:
        assert np.array_equal(before[name], after[name], equal_nan=True), name


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_limit_event_times_match_reference(aggregation, window):
    """Events at the limits of the accepted range, read at extreme as_of times."""
    arena = FeatureArena(aggregation, *WINDOWS[window])
    ref = ReferenceFeature(aggregation, *WINDOWS[window])
    batch = [(0, MAX_EVENT_TIME, 1.0, True), (0, MAX_EVENT_TIME, 2.0, True),
             (1, -MAX_EVENT_TIME, 3.0, True), (1, -MAX_EVENT_TIME, 4.0, True),
             (2, -MAX_EVENT_TIME, 5.0, True), (2, MAX_EVENT_TIME, 6.0, True),
             (2, -MAX_EVENT_TIME, 7.0, True)]
    update_arena(arena, batch)
    update_reference(ref, batch)
    assert arena.late_dropped == ref.late_dropped
    for t in (INT64_MIN, -MAX_EVENT_TIME, -MAX_EVENT_TIME + 9, 0, MAX_EVENT_TIME - 1,
              MAX_EVENT_TIME, INT64_MAX):
        got, ok = arena.read([0, 1, 2], t)
        for slot in range(3):
            want = ref.read(slot, t)
            assert agrees(aggregation, got[slot], ok[slot], want), (slot, t, got, ok, want)


def test_reference_reads_entity_with_only_nulls():
    """The oracle itself: a windowed entity with only null / filtered-out events has
    an empty window (ReferenceFeature.read used to raise TypeError here)."""
    for aggregation, expected in (("count", 1), ("sum", 0.0), ("mean", None), ("last", None)):
        ref = ReferenceFeature(aggregation, 100, 10, 0)
        ref.update(1, 5, math.nan)
        ref.update(1, 6, 2.0, applies=False)
        assert ref.read(1, 5) == expected, aggregation


def test_window_expires_by_time_and_late_events_are_dropped():
    arena = FeatureArena("sum", 60, 20, 30)        # 3 window tiles, ring of 5
    arena.update([0, 0], [0, 45], [1.0, 2.0])
    assert arena.read([0], 45)[0].tolist() == [3.0]
    assert arena.read([0], 59)[0].tolist() == [3.0]    # epochs (-1, 2]
    assert arena.read([0], 60)[0].tolist() == [2.0]    # tile 0 left the window
    assert arena.read([0], 100)[0].tolist() == [0.0]   # nothing left, no new event needed
    arena.update([0], [10], [4.0])                     # late but inside the ring
    assert arena.read([0], 45)[0].tolist() == [7.0]
    arena.update([0], [200], [8.0])                    # epoch 10: ring is (5, 10]
    arena.update([0], [119], [16.0])                   # epoch 5: too late, dropped
    arena.update([0], [120], [32.0])                   # epoch 6: kept
    assert arena.late_dropped == 1
    assert arena.read([0], 200)[0].tolist() == [8.0]   # epochs (7, 10]
    assert arena.read([0], 139)[0].tolist() == [32.0]  # epochs (3, 6] ∩ ring (5, 10]


# -- 6. large seeded check against pandas ------------------------------------------

def test_sliding_week_against_pandas():
    """200k events, 5k entities, 7-day window with 1-day hop (and 1 day of lateness),
    sum and count, streamed a day at a time and read point-in-time, against pandas
    daily totals + ``rolling("7D")``."""
    day = 86_400_000
    start = 1_704_067_200_000                          # 2024-01-01, a day boundary
    n_events, n_entities, n_days = 200_000, 5_000, 60
    rng = np.random.default_rng(20240101)
    entity_ids = np.unique(rng.integers(INT64_MIN, INT64_MAX, n_entities, dtype=np.int64,
                                        endpoint=True))
    assert len(entity_ids) == n_entities
    entity = entity_ids[rng.integers(0, n_entities, n_events)]
    ts = start + rng.integers(0, n_days * day, n_events)
    value = rng.integers(-8000, 8000, n_events) / 8.0  # dyadic: every sum is exact
    value[rng.random(n_events) < 0.05] = np.nan         # nulls: not summed, but counted
    # arrival order: up to a day out of order; a day of lateness keeps every event
    arrival = ts + rng.integers(0, day, n_events)
    order = np.argsort(arrival, kind="stable")
    entity, ts, value, arrival = entity[order], ts[order], value[order], arrival[order]

    # pandas: daily totals per entity on a full calendar, then a 7-day rolling window
    df = pd.DataFrame({"entity": entity, "value": value,
                       "day": pd.to_datetime(ts, unit="ms").floor("D")})
    calendar = pd.date_range(pd.to_datetime(start, unit="ms") - pd.Timedelta(days=10),
                             periods=n_days + 30, freq="D")
    daily_sum = df.pivot_table(index="day", columns="entity", values="value", aggfunc="sum",
                               fill_value=0.0, dropna=False)
    daily_count = df.groupby(["day", "entity"]).size().unstack(fill_value=0)
    daily_sum = daily_sum.reindex(index=calendar, fill_value=0.0).fillna(0.0)
    daily_count = daily_count.reindex(index=calendar, fill_value=0)
    week_sum = daily_sum.rolling("7D").sum()
    week_count = daily_count.rolling("7D").sum()

    index = Int64KeyIndex()
    sums = FeatureArena("sum", 7 * day, day, day)
    counts = FeatureArena("count", 7 * day, day, day)
    n_checked = 0

    def check(d, keys, slots):
        """Reads as of (the start, middle and end of) day ``d`` against pandas."""
        nonlocal n_checked
        label = pd.to_datetime(start + d * day, unit="ms")
        want_sum = week_sum.loc[label].reindex(keys, fill_value=0.0).to_numpy()
        want_count = week_count.loc[label].reindex(keys, fill_value=0).to_numpy()
        for as_of in (start + d * day, start + d * day + day // 2, start + (d + 1) * day - 1):
            got_sum, ok_sum = sums.read(slots, as_of)
            got_count, ok_count = counts.read(slots, as_of)
            assert ok_sum.all() and ok_count.all()
            bad = np.flatnonzero(got_sum != want_sum)
            assert bad.size == 0, ("sum", d, as_of, keys[bad[:5]], got_sum[bad[:5]],
                                   want_sum[bad[:5]])
            bad = np.flatnonzero(got_count != want_count)
            assert bad.size == 0, ("count", d, as_of, keys[bad[:5]], got_count[bad[:5]],
                                   want_count[bad[:5]])
            n_checked += len(keys)

    # stream a day of arrivals at a time; once every arrival before day d + 1 is in,
    # every event of days <= d - 1 is in and none of days >= d + 1, so the windows
    # ending on day d - 1 are complete
    lo = 0
    for d in range(1, n_days + 2):
        hi = int(np.searchsorted(arrival, start + (d + 1) * day))
        slots = index.slots(entity[lo:hi])
        sums.update(slots, ts[lo:hi], value[lo:hi])
        counts.update(slots, ts[lo:hi], value[lo:hi])
        lo = hi
        if d % 3 == 0 or d < 10:
            keys = index.all_keys()
            check(d - 1, keys, index.lookup(keys))
    assert lo == n_events
    assert len(index) == n_entities
    assert sums.late_dropped == 0 and counts.late_dropped == 0
    # after the end of the data: windows drain day by day, and empty a week later
    keys = index.all_keys()
    slots = index.lookup(keys)
    for d in range(n_days - 1, n_days + 10):
        check(d, keys, slots)
    assert n_checked > 400_000
    # the check is not vacuous: windows hold data mid-stream and are empty well after
    assert week_count.loc[pd.to_datetime(start + 30 * day, unit="ms")].sum() > 20_000
    assert counts.read(slots, start + (n_days + 7) * day)[0].sum() == 0
