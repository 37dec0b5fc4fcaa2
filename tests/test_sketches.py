"""last_n, distinct_count and top_k against exact references.

last_n is exact and is compared event by event; distinct_count and top_k are
approximate and are held to their documented bounds on million-element
streams; merged parts must equal (last_n, distinct_count) or keep the bound
of (top_k) sequential processing."""
import collections

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.core.arena import (DistinctCountArena, LastNArena, TiledArena, TopKArena,
                              make_arena)
from tally.core.reference import ReferenceFeature

WINDOWS = [(0, 0), (100, 10), (100, 100)]

events = st.lists(st.tuples(st.integers(0, 3), st.integers(-50, 400),
                            st.integers(0, 6).map(float)), max_size=120)


def zeros(n):
    return np.zeros(n, dtype=np.int64)


@pytest.mark.parametrize("window_ms,hop_ms", WINDOWS)
@given(batches=st.lists(events, min_size=1, max_size=5), n=st.integers(1, 4),
       reads=st.lists(st.integers(-100, 600), min_size=1, max_size=4))
def test_last_n_equals_reference_after_every_batch(window_ms, hop_ms, batches, n, reads):
    arena = make_arena("last_n", window_ms, hop_ms, param=n)
    reference = ReferenceFeature("last_n", window_ms, hop_ms, param=n)
    for batch in batches:
        if batch:
            slots, ts, values = (np.array(c) for c in zip(*batch))
            arena.update(slots, ts, values)
        for slot, t, v in batch:
            reference.update(slot, t, v)
        newest = max((t for b in batches for _, t, _ in b), default=0)
        for as_of in reads + [newest]:
            got, valid = arena.read(np.arange(4), max(as_of, newest))
            for key in reference.entities:
                assert valid[key]
                assert got[key] == reference.read(key, max(as_of, newest))


@given(stream=events, cut=st.integers(0, 120), n=st.integers(1, 4))
def test_last_n_merge_of_parts_equals_whole(stream, cut, n):
    whole, first, second = (make_arena("last_n", param=n) for _ in range(3))
    for arena, part in ((whole, stream), (first, stream[:cut]), (second, stream[cut:])):
        if part:
            arena.update(*(np.array(c) for c in zip(*part)))
    first.merge(second, np.arange(4))
    assert first.read(np.arange(4), 0)[0].tolist() == whole.read(np.arange(4), 0)[0].tolist()


def test_distinct_count_within_three_standard_errors_on_a_million():
    rng = np.random.default_rng(11)
    values = rng.integers(0, 400_000, 1_000_000).astype(float)    # many repeats
    truth = len(np.unique(values))
    arena = DistinctCountArena(12)
    arena.update(zeros(len(values)), zeros(len(values)), values)
    estimate = arena.read([0], 0)[0][0]
    assert abs(estimate / truth - 1) < 3 * arena.standard_error, (estimate, truth)


def test_distinct_count_error_matches_the_documented_standard_error():
    errors = []
    for seed in range(40):
        values = np.random.default_rng(seed).integers(0, 1 << 50, 50_000).astype(float)
        arena = DistinctCountArena(10)
        arena.update(zeros(len(values)), zeros(len(values)), values)
        errors.append(arena.read([0], 0)[0][0] / len(np.unique(values)) - 1)
    assert abs(np.mean(errors)) < 0.02                       # unbiased
    assert np.std(errors) < 1.5 * DistinctCountArena(10).standard_error


def test_distinct_count_is_exact_for_small_sets_and_windows_expire():
    arena = DistinctCountArena(10, window_ms=100, hop_ms=10)
    arena.update(zeros(5), np.array([0, 5, 15, 95, 99]), np.array([1.0, 1.0, 2.0, 3.0, -0.0]))
    arena.update(zeros(1), np.array([99]), np.array([0.0]))        # -0.0 == 0.0
    assert arena.read([0, 0, 0], [99, 109, 1_000])[0].tolist() == [4, 3, 0]


def test_distinct_count_merge_is_the_sequential_sketch():
    values = np.random.default_rng(3).integers(0, 10**6, 200_000).astype(float)
    times = np.sort(np.random.default_rng(4).integers(0, 10_000, 200_000))
    slots = values.astype(np.int64) % 7
    whole, first, second = (DistinctCountArena(8, 1000, 100) for _ in range(3))
    whole.update(slots, times, values)
    first.update(slots[:70_000], times[:70_000], values[:70_000])
    second.update(slots[70_000:], times[70_000:], values[70_000:])
    first.merge(second, np.arange(7))
    np.testing.assert_array_equal(first.export_arrays(7)["reg"], whole.export_arrays(7)["reg"])


def test_top_k_meets_the_misra_gries_bound_on_a_million():
    values = np.random.default_rng(5).zipf(1.3, 1_000_000).astype(float)
    arena = TopKArena(5)
    arena.update(zeros(len(values)), zeros(len(values)), values)
    check_top_k(arena.read([0], 0)[0][0], values, arena)


def test_top_k_merged_parts_keep_the_bound():
    values = np.random.default_rng(6).zipf(1.2, 300_000).astype(float)
    parts = np.array_split(values, 4)
    merged = TopKArena(4)
    merged.update(zeros(len(parts[0])), zeros(len(parts[0])), parts[0])
    for part in parts[1:]:
        later = TopKArena(4)
        later.update(zeros(len(part)), zeros(len(part)), part)
        merged.merge(later, [0])
    check_top_k(merged.read([0], 0)[0][0], values, merged)


def check_top_k(reported, values, arena):
    bound = len(values) / (arena.counters + 1)
    truth = collections.Counter(values.tolist())
    assert len(reported) == arena.k
    for value, count in reported:
        assert truth[value] - bound <= count <= truth[value]
    # every value more frequent than the bound is tracked, so the true top K
    # whose counts clear the bound by a margin are all reported
    reported_values = {v for v, _ in reported}
    for value, count in truth.most_common(arena.k):
        if count > truth.most_common(arena.k + 1)[-1][1] + 2 * bound:
            assert value in reported_values


def test_sketch_snapshots_round_trip_and_reject_mismatches():
    rng = np.random.default_rng(9)
    for arena in (LastNArena(3, 100, 10), DistinctCountArena(6, 100, 10), TopKArena(2)):
        slots, ts = rng.integers(0, 5, 500), np.sort(rng.integers(0, 300, 500))
        arena.update(slots, ts, rng.integers(0, 9, 500).astype(float))
        restored = TiledArena.from_arrays(arena.describe(), arena.export_arrays(5))
        assert type(restored) is type(arena)
        assert restored.read(np.arange(5), 300)[0].tolist() == \
            arena.read(np.arange(5), 300)[0].tolist()
        broken = arena.export_arrays(5)
        broken.pop(next(iter(broken)))
        with pytest.raises(ValueError, match="arena snapshot: expected arrays"):
            TiledArena.from_arrays(arena.describe(), broken)


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="last_n: n=0 must be between 1 and 4096"):
        make_arena("last_n", param=0)
    with pytest.raises(ValueError, match="distinct_count: precision=20"):
        make_arena("distinct_count", param=20)
    with pytest.raises(ValueError, match="sum takes no parameter"):
        make_arena("sum", param=3)
    with pytest.raises(ValueError, match="cannot merge"):
        TopKArena(2).merge(TopKArena(3), [0])
