"""Point-in-time training sets (``tally.core.training``).

Oracles: ``tally.core.reference.ReferenceFeature`` fed the events with time
<= t in time order (every aggregation x window, hypothesis), the arenas' own
update/read API (``replay_generic``) for the kernels, pandas for a larger
seeded check, and, against a real broker, the online store itself: values
looked up online at known points of a stream equal the training set built
from the same topic.
"""
import dataclasses
import math
import os
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tally
from tally.core import arena as arena_module
from tally.core.definitions import Entity, Feature, FeatureView, Source, Window
from tally.core.reference import ReferenceFeature
from tally.core.training import TrainingSetError, replay_generic
from tally.service.training import iter_training_batches, training_set

HOUR = 3_600_000

user = Entity("user", "int64")
# Training sets are tested with small synthetic times: accept every time the
# core can represent (the plausibility rules are tested in test_events.py).
ANY_TIME = {"earliest_event_time": -2**62, "max_event_time_ahead": 2**62}
events_source = Source("clicks", "clicks",
                       schema={"user": "int64", "item": "int64", "x": "float64", "ts": "int64"},
                       **ANY_TIME)


def view_of(*features, name="v", entity=user, source=events_source):
    return FeatureView(name, entity, source, features=features)


def examples(ci_count):
    return max(1, ci_count * settings.default.max_examples // 60)


def column(table, name):
    return table.column(name).to_pylist()


# --------------------------------------------------------------------------
# Leakage and nulls


def test_an_event_one_ms_later_is_never_visible_and_one_at_t_is():
    view = view_of(Feature("n", "count"), Feature("total", "sum", "x"),
                   Feature("latest", "last", "x"))
    events = {"user": np.array([1, 1, 1]), "item": np.array([0, 0, 0]),
              "x": np.array([1.0, 10.0, 100.0]), "ts": np.array([1000, 2000, 2001])}
    spine = pd.DataFrame({"user": [1, 1, 1, 1], "ts": [999, 1000, 2000, 2001]})
    out = training_set(spine, ["v:n", "v:total", "v:latest"], {"clicks": events}, views=[view])
    assert column(out, "n") == [None, 1, 2, 3]
    assert column(out, "total") == [None, 1.0, 11.0, 111.0]
    assert column(out, "latest") == [None, 1.0, 10.0, 100.0]


def test_rows_without_earlier_events_are_kept_with_nulls():
    view = view_of(Feature("n", "count"), Feature("total", "sum", "x"),
                   Feature("n_1h", "count", window=Window.sliding("1h", "10m")),
                   Feature("mean", "mean", "x"), Feature("recent", "last_n", "x", n=2))
    events = {"user": np.array([1, 2]), "item": np.array([0, 0]), "x": np.array([5.0, 7.0]),
              "ts": np.array([10 * HOUR, 20 * HOUR])}
    spine = pd.DataFrame({"user": [1, 2, 3, 2, 1], "ts": [11 * HOUR, 19 * HOUR, 30 * HOUR,
                                                           20 * HOUR, 15 * HOUR],
                          "label": [1, 0, 1, 0, 1]})
    out = training_set(spine, [view], {"clicks": events}, views=[view])
    assert out.num_rows == 5
    assert column(out, "label") == [1, 0, 1, 0, 1]
    # user 2 only has a later event at 19h; user 3 none at all: nulls, rows kept
    assert column(out, "n") == [1, None, None, 1, 1]
    assert column(out, "total") == [5.0, None, None, 7.0, 5.0]
    # an entity with earlier events but an empty window: 0, as a lookup says
    assert column(out, "n_1h") == [0, None, None, 1, 0]
    assert column(out, "mean") == [5.0, None, None, 7.0, 5.0]
    assert column(out, "recent") == [[5.0], None, None, [7.0], [5.0]]


def test_unsorted_and_duplicated_spine_rows_keep_spine_order():
    view = view_of(Feature("total", "sum", "x"))
    rng = np.random.default_rng(3)
    events = {"user": rng.integers(0, 20, 2000), "item": np.zeros(2000, dtype=np.int64),
              "x": rng.random(2000), "ts": rng.integers(0, 10_000, 2000)}
    base = pd.DataFrame({"user": rng.integers(0, 25, 300), "ts": rng.integers(0, 11_000, 300)})
    spine = pd.concat([base, base.iloc[::-1], base.sample(frac=1, random_state=1)],
                      ignore_index=True)
    spine["row"] = np.arange(len(spine))
    out = training_set(spine, ["v:total"], {"clicks": events}, views=[view]).to_pandas()
    assert list(out["row"]) == list(range(len(spine)))
    assert list(out["user"]) == list(spine["user"]) and list(out["ts"]) == list(spine["ts"])
    df = pd.DataFrame(events)
    for _, row in out.sample(60, random_state=2).iterrows():
        seen = df[(df.user == row.user) & (df.ts <= row.ts)]
        if len(seen):
            assert math.isclose(row.total, seen.x.sum(), rel_tol=1e-9)
        else:
            assert pd.isna(row.total)
    first = out.iloc[:300].reset_index(drop=True)
    mirrored = out.iloc[300:600].iloc[::-1].reset_index(drop=True)
    pd.testing.assert_series_equal(first["total"], mirrored["total"])


def test_string_keys_and_timestamp_types():
    account = Entity("account", "string")
    source = Source("payments", "payments",
                    schema={"account": "string", "amount": "float64", "ts": "int64"}, **ANY_TIME)
    view = FeatureView("spend", account, source, features=[
        Feature("spent", "sum", "amount"), Feature("payments", "count")])
    events = pd.DataFrame({"account": ["a", "b", "a", "é", "a"],
                           "amount": [1.0, 2.0, 3.0, 4.0, 5.0],
                           "ts": [1_000, 2_000, 3_000, 3_000, 9_000]})
    spine = pd.DataFrame({"account": ["a", "zz", "é", "b", None, "a"],
                          "ts": pd.to_datetime([3_000, 3_000, 3_000, 1_999, 5_000, 10_000],
                                               unit="ms")})
    out = training_set(spine, ["spend:spent", "spend:payments"], {"payments": events},
                       views=[view])
    assert column(out, "spent") == [4.0, None, 4.0, None, None, 9.0]
    assert column(out, "payments") == [2, None, 1, None, None, 3]


def test_int_keys_from_arrow_and_parquet_spine(tmp_path):
    view = view_of(Feature("n", "count"))
    events = pa.table({"user": pa.array([7, 7, -3], pa.int32()), "item": [0, 0, 0],
                       "x": [1.0, 2.0, 3.0], "ts": [5, 6, 7]})
    path = tmp_path / "spine.parquet"
    pq.write_table(pa.table({"user": pa.array([7, -3, 7], pa.int64()), "ts": [6, 7, 5],
                             "y": [0.5, 0.25, 1.0]}), path)
    out = training_set(str(path), ["v:n"], {"clicks": events}, views=[view])
    assert column(out, "n") == [2, 1, 1] and column(out, "y") == [0.5, 0.25, 1.0]
    # pandas turns integer keys with a missing one into floats
    spine = pd.DataFrame({"user": [7, None, -3], "ts": [6, 6, 7]})
    assert column(training_set(spine, ["v:n"], {"clicks": events}, views=[view]),
                  "n") == [2, None, 1]


def test_several_views_entities_and_sources_in_one_call():
    item = Entity("item", "int64")
    impressions = Source("impressions", "impressions",
                         schema={"item": "int64", "user": "int64", "ts": "int64"}, **ANY_TIME)
    by_user = view_of(Feature("n", "count"), Feature("total", "sum", "x"), name="by_user")
    by_item = FeatureView("by_item", item, impressions, features=[
        Feature("n", "count"), Feature("viewers", "distinct_count", "user")])
    clicks = {"user": np.array([1, 1, 2]), "item": np.array([10, 11, 10]),
              "x": np.array([1.0, 2.0, 3.0]), "ts": np.array([100, 200, 300])}
    shown = {"item": np.array([10, 10, 11, 10]), "user": np.array([1, 2, 1, 1]),
             "ts": np.array([50, 150, 160, 400])}
    spine = pd.DataFrame({"user": [1, 2, 1], "item": [10, 10, 11], "ts": [150, 300, 500]})
    out = training_set(spine, ["by_user:n", "by_user:total", "by_item:n", "by_item:viewers"],
                       {"clicks": clicks, "impressions": shown}, views=[by_user, by_item])
    assert out.schema.names == ["user", "item", "ts", "by_user__n", "total", "by_item__n",
                                "viewers"]
    assert column(out, "by_user__n") == [1, 1, 2]
    assert column(out, "total") == [1.0, 3.0, 3.0]
    assert column(out, "by_item__n") == [2, 2, 1]
    assert column(out, "viewers") == [2, 2, 1]


def test_features_resolve_against_a_registry(tmp_path):
    from tally.service.registry import Registry
    view = view_of(Feature("n", "count"), name="user_clicks")
    with Registry(str(tmp_path / "registry.db")) as registry:
        registry.apply([view])
    events = {"user": np.array([1]), "item": np.array([0]), "x": np.array([1.0]),
              "ts": np.array([10])}
    spine = pd.DataFrame({"user": [1, 1], "ts": [9, 10]})
    for ref in ("user_clicks:n", "user_clicks.n", "user_clicks@v1:n", "user_clicks"):
        out = training_set(spine, [ref], {"clicks": events},
                           registry=str(tmp_path / "registry.db"))
        assert column(out, "n") == [None, 1], ref
    with pytest.raises(TrainingSetError, match="no view 'nope'"):
        training_set(spine, ["nope:n"], {"clicks": events}, views=[view])
    with pytest.raises(TrainingSetError, match="has no feature"):
        training_set(spine, ["user_clicks:zz"], {"clicks": events}, views=[view])


def test_filters_are_applied_as_masks():
    view = view_of(Feature("big", "count", filter="x >= 5 AND item IN (1, 2)"),
                   Feature("all", "count"))
    events = {"user": np.array([1, 1, 1, 1]), "item": np.array([1, 2, 3, 1]),
              "x": np.array([5.0, 9.0, 9.0, 1.0]), "ts": np.array([1, 2, 3, 4])}
    spine = pd.DataFrame({"user": [1, 1, 1], "ts": [1, 3, 4]})
    out = training_set(spine, ["v:big", "v:all"], {"clicks": events}, views=[view])
    assert column(out, "big") == [1, 2, 2] and column(out, "all") == [1, 3, 4]


def test_top_level_reexport_and_helpful_errors():
    assert tally.training_set is training_set
    view = view_of(Feature("n", "count"))
    spine = pd.DataFrame({"user": [1], "when": [1]})
    with pytest.raises(TrainingSetError, match="timestamp column"):
        training_set(spine, ["v:n"], {"clicks": {"user": [1], "ts": [1]}}, views=[view])
    with pytest.raises(TrainingSetError, match="no events"):
        training_set(spine, ["v:n"], views=[view], timestamp_column="when")
    with pytest.raises(TrainingSetError, match="no key column"):
        training_set(pd.DataFrame({"who": [1], "ts": [1]}), ["v:n"],
                     {"clicks": {"user": [1], "ts": [1]}}, views=[view])


# --------------------------------------------------------------------------
# Every aggregation x window against the brute-force reference

WINDOWS = {
    "lifetime": Window.lifetime(),
    "tumbling": Window.tumbling(20),
    "sliding": Window.sliding(30, 10),
}
AGGREGATIONS = ("count", "sum", "mean", "min", "max", "first", "last", "last_n",
                "distinct_count", "top_k")

raw_events = st.lists(st.tuples(st.integers(0, 3),                 # user
                                st.integers(-20, 120),             # ts
                                st.one_of(st.integers(0, 4).map(float), st.just(math.nan)),
                                st.integers(0, 2)),                # item (for a filter)
                      max_size=60)
raw_spine = st.lists(st.tuples(st.integers(0, 4), st.integers(-30, 150)), min_size=1,
                     max_size=30)


def feature_for(aggregation, window, lateness, with_filter):
    param = {"last_n": {"n": 3}, "top_k": {"k": 2}}.get(aggregation, {})
    return Feature("f", aggregation, None if aggregation == "count" else "x", window,
                   lateness_ms=lateness if window.size_ms else 0,
                   filter="item <> 1" if with_filter else None, **param)


def expected_values(feature, events, spine):
    """The reference, fed the events with time <= t in time order."""
    ordered = sorted(range(len(events)), key=lambda i: events[i][1])     # stable
    reference = ReferenceFeature(feature.aggregation, feature.window.size_ms,
                                 feature.window.hop_ms, feature.lateness_ms, feature.param)
    out = [None] * len(spine)
    applied = 0
    for row in sorted(range(len(spine)), key=lambda r: spine[r][1]):
        key, t = spine[row]
        while applied < len(ordered) and events[ordered[applied]][1] <= t:
            u, ts, x, item = events[ordered[applied]]
            reference.update(u, ts, x, applies=not feature.filter or item != 1)
            applied += 1
        value = reference.read(key, t)
        if feature.aggregation == "top_k" and value is not None:
            value = sorted(value.items(), key=lambda kv: (-kv[1], kv[0]))[:feature.param]
            value = [{"value": v, "count": c} for v, c in value]
        out[row] = value
    return out


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@settings(max_examples=examples(12), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=raw_events, spine=raw_spine, lateness=st.sampled_from([0, 15]),
       with_filter=st.booleans())
def test_every_aggregation_and_window_equals_the_reference(aggregation, window, events, spine,
                                                           lateness, with_filter):
    feature = feature_for(aggregation, WINDOWS[window], lateness, with_filter)
    view = view_of(feature)
    table = {"user": np.array([e[0] for e in events], dtype=np.int64),
             "ts": np.array([e[1] for e in events], dtype=np.int64),
             "x": np.array([e[2] for e in events], dtype=np.float64),
             "item": np.array([e[3] for e in events], dtype=np.int64)}
    spine_df = pd.DataFrame({"user": [s[0] for s in spine], "ts": [s[1] for s in spine]})
    got = column(training_set(spine_df, ["v:f"], {"clicks": table}, views=[view],
                              chunk_rows=7), "f")
    want = expected_values(feature, events, spine)
    for row, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, float):
            assert g is not None and math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9), \
                (row, spine[row], g, w)
        else:
            assert g == w, (row, spine[row], g, w)


# --------------------------------------------------------------------------
# The kernels against the arenas' own update/read


ARENAS = [("sum", None, "float64"), ("count", None, "float64"), ("first", None, "float64"),
          ("last", None, "float64"), ("min", None, "float64"), ("mean", None, "float64"),
          ("last_n", 4, "float64"), ("distinct_count", 6, "float64"), ("top_k", 3, "float64")]
# the arenas that keep int64 values exactly (int64 columns, string codes)
ARENAS += [(a, p, "int64") for a, p, _ in ARENAS
           if a in ("first", "last", "last_n", "distinct_count", "top_k")]


@pytest.mark.parametrize("window", [(0, 0, 0), (500, 100, 0), (300, 100, 250)])
@pytest.mark.parametrize("aggregation,param,value_type", ARENAS)
def test_replay_kernels_equal_update_then_read(aggregation, param, value_type, window):
    rng = np.random.default_rng(zlib.crc32(f"{aggregation}{window}{value_type}".encode()))
    n, nq = 5000, 1500
    slots = rng.integers(0, 40, n)
    ts = np.sort(rng.integers(-1000, 3000, n))
    mask = rng.random(n) < 0.8
    if value_type == "int64":       # neighbours of +-2**63; nulls are masked out
        values = np.iinfo(np.int64).max - rng.integers(0, 12, n) * (2 * rng.integers(0, 2, n) - 1)
        values = values.astype(np.int64)
    else:
        values = rng.integers(0, 12, n).astype(float)
        values[rng.random(n) < 0.05] = np.nan
    q_slots = rng.integers(-1, 45, nq)
    q_ts = np.sort(rng.integers(-1100, 3200, nq))
    kernel_arena = arena_module.make_arena(aggregation, *window, param=param, capacity=1,
                                           value_type=value_type)
    generic_arena = arena_module.make_arena(aggregation, *window, param=param, capacity=1,
                                            value_type=value_type)
    for a in (kernel_arena, generic_arena):      # slots 0..44 exist (44 never has events)
        a.reserve(45)
    kernel = {"last_n": arena_module.replay_last_n,
              "distinct_count": arena_module.replay_distinct_count,
              "top_k": arena_module.replay_top_k}.get(aggregation, arena_module.replay_scalar)
    # two segments, as the replay calls it: the state carries over
    half, q_half = n // 2, int(np.searchsorted(q_ts, ts[n // 2], "left"))
    results = [kernel(kernel_arena, slots[a:b], ts[a:b], values[a:b], mask[a:b],
                      q_slots[c:d], q_ts[c:d])
               for (a, b, c, d) in ((0, half, 0, q_half), (half, n, q_half, nq))]
    expected_values, expected_valid = replay_generic(generic_arena, slots, ts, values, mask,
                                                     q_slots, q_ts)
    if aggregation in ("last_n", "top_k"):
        got = []
        for result in results:
            offsets, *columns, valid = result
            for j in range(len(valid)):
                lo, hi = offsets[j], offsets[j + 1]
                row = list(zip(*(c[lo:hi].tolist() for c in columns)))
                value = [r[0] for r in row] if aggregation == "last_n" else row
                got.append(value if valid[j] else None)
        want = [list(v) if ok else None for v, ok in zip(expected_values, expected_valid)]
        assert got == want
    else:
        got_values = np.concatenate([r[0] for r in results])
        got_valid = np.concatenate([r[1] for r in results])
        np.testing.assert_array_equal(got_valid, expected_valid)
        np.testing.assert_array_equal(got_values[got_valid], expected_values[expected_valid])
    assert kernel_arena.late_dropped == generic_arena.late_dropped


def test_kernel_refuses_unsorted_input():
    arena = arena_module.make_arena("sum")
    with pytest.raises(ValueError, match="sorted"):
        arena_module.replay_scalar(arena, [0, 0], [5, 4], [1.0, 1.0], None, [], [])
    with pytest.raises(ValueError, match="sorted"):
        arena_module.replay_scalar(arena, [], [], None, None, [0, 0], [5, 4])


# --------------------------------------------------------------------------
# Larger data against pandas; sources; batches


def seeded(n_events=60_000, n_users=2_000, n_spine=20_000, seed=5):
    rng = np.random.default_rng(seed)
    events = {"user": rng.integers(0, n_users, n_events),
              "item": rng.integers(0, 100, n_events),
              "x": np.round(rng.exponential(10, n_events), 2),
              "ts": rng.integers(0, 30 * 24 * HOUR, n_events)}
    spine = pd.DataFrame({"user": rng.integers(0, n_users + 100, n_spine),
                          "ts": rng.integers(-HOUR, 31 * 24 * HOUR, n_spine)})
    return events, spine


WEEK = Window.sliding("7d", "1h")
SEEDED_VIEW = view_of(Feature("total", "sum", "x"), Feature("n", "count"),
                      Feature("latest", "last", "x"), Feature("week", "sum", "x", WEEK),
                      Feature("week_n", "count", window=WEEK, filter="x > 5"),
                      Feature("recent", "last_n", "x", WEEK, n=3))


def pandas_expected(events, spine):
    """Lifetime sum/count/last and a 7-day (hourly tiles) sum via merge_asof and
    cumulative sums: an independent formulation."""
    ev = pd.DataFrame(events).sort_values("ts", kind="stable")
    ev["cum"] = ev.groupby("user")["x"].cumsum()
    ev["cnt"] = ev.groupby("user").cumcount() + 1
    rows = spine.reset_index().sort_values("ts", kind="stable")
    joined = pd.merge_asof(rows, ev[["user", "ts", "cum", "cnt", "x"]], on="ts", by="user",
                           direction="backward", allow_exact_matches=True)
    joined = joined.set_index("index").sort_index()
    # the 7-day window covers tiles (t//h - 168, t//h]: events with ts >= (t//h - 167) * h
    start = (spine["ts"] // HOUR - 167) * HOUR
    early = pd.merge_asof(
        pd.DataFrame({"ts": start - 1, "user": spine["user"]}).reset_index()
        .sort_values("ts", kind="stable"),
        ev[["user", "ts", "cum"]], on="ts", by="user", direction="backward")
    early = early.set_index("index").sort_index()
    week = joined["cum"] - early["cum"].fillna(0)
    week[joined["cum"].isna()] = np.nan
    return joined["cum"], joined["cnt"], joined["x"], week


def test_larger_random_data_equals_pandas():
    events, spine = seeded()
    out = training_set(spine, [SEEDED_VIEW], {"clicks": events}, views=[SEEDED_VIEW],
                       chunk_rows=9_999).to_pandas()
    total, n, latest, week = pandas_expected(events, spine)
    np.testing.assert_allclose(out["total"], total, rtol=1e-9)
    np.testing.assert_array_equal(out["n"].fillna(-1), n.fillna(-1))
    np.testing.assert_allclose(out["week"], week, rtol=1e-7, atol=1e-6)
    # last: ties in time at one entity are possible; pandas' merge_asof takes the last row
    np.testing.assert_array_equal(out["latest"].fillna(-1), latest.fillna(-1))


def test_sources_parquet_archive_spill_merge_and_batches_agree(tmp_path):
    events, spine = seeded(20_000, 500, 5_000, seed=9)
    features = [SEEDED_VIEW]
    reference = training_set(spine, features, {"clicks": events}, views=[SEEDED_VIEW])
    # an unsorted archive of several files: scanned and sorted externally (spilled runs)
    unsorted_dir = tmp_path / "unsorted"
    unsorted_dir.mkdir()
    for part in range(3):
        sl = slice(part * 7000, (part + 1) * 7000)
        pq.write_table(pa.table({k: v[sl] for k, v in events.items()}),
                       unsorted_dir / f"part-{part}.parquet", row_group_size=1500)
    spilled = training_set(spine, features, {"clicks": str(unsorted_dir)},
                           views=[SEEDED_VIEW], chunk_rows=2_500, spill_dir=str(tmp_path))
    assert spilled.equals(reference)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tally-sort-")]
    # a time-sorted archive: streamed row group by row group
    order = np.argsort(events["ts"], kind="stable")
    sorted_path = tmp_path / "sorted.parquet"
    pq.write_table(pa.table({k: v[order] for k, v in events.items()}), sorted_path,
                   row_group_size=1000)
    source = dataclasses.replace(events_source, archive=str(sorted_path))
    archived_view = dataclasses.replace(SEEDED_VIEW, source=source)
    streamed = training_set(spine, [archived_view], views=[archived_view], chunk_rows=3_000)
    assert streamed.equals(reference)
    # the archive plus an in-memory tail, merged in time order
    first, rest = order[:12_000], order[12_000:]
    archive_path = tmp_path / "older.parquet"
    pq.write_table(pa.table({k: v[first] for k, v in events.items()}), archive_path)
    merged = training_set(spine, features, {"clicks": [str(archive_path),
                                                       {k: v[rest] for k, v in events.items()}]},
                          views=[SEEDED_VIEW], chunk_rows=1_000)
    assert merged.equals(reference)
    # batches: spine order, and time order as the replay advances
    batches = list(iter_training_batches(spine, features, {"clicks": events},
                                         views=[SEEDED_VIEW], batch_rows=1_234))
    assert pa.Table.from_batches(batches).equals(reference)
    timed = pa.Table.from_batches(list(iter_training_batches(
        spine, features, {"clicks": events}, views=[SEEDED_VIEW], batch_rows=777,
        order="time", chunk_rows=2_000)))
    by_time = reference.take(pa.array(np.argsort(spine["ts"].to_numpy(), kind="stable")))
    assert timed.equals(by_time)


def test_progress_reports_every_row():
    events, spine = seeded(5_000, 100, 3_000, seed=1)
    seen = []
    training_set(spine, ["v:total"], {"clicks": events}, views=[SEEDED_VIEW],
                 progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (3_000, 3_000)


def test_cli_training_set(tmp_path, capsys):
    from tally.service import cli
    events, spine = seeded(5_000, 100, 2_000, seed=2)
    archive = tmp_path / "events.parquet"
    pq.write_table(pa.table(events), archive)
    spine_path = tmp_path / "labels.parquet"
    pq.write_table(pa.Table.from_pandas(spine, preserve_index=False), spine_path)
    definitions = tmp_path / "defs.py"
    definitions.write_text(
        "from tally.core.definitions import Entity, Feature, FeatureView, Source\n"
        "user = Entity('user', 'int64')\n"
        "clicks = Source('clicks', 'clicks', schema={'user': 'int64', 'item': 'int64', "
        f"'x': 'float64', 'ts': 'int64'}}, archive={str(archive)!r}, "
        "earliest_event_time=-2**62, max_event_time_ahead=2**62)\n"
        "v = FeatureView('v', user, clicks, features=[Feature('total', 'sum', 'x'), "
        "Feature('n', 'count')])\n")
    out = tmp_path / "train.parquet"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["training-set", "--spine", str(spine_path), "--features", "v:total,v:n",
                  "--definitions", str(definitions), "--out", str(out)])
    assert exit_info.value.code == 0
    assert "rows" in capsys.readouterr().err
    got = pq.read_table(out)
    view = view_of(Feature("total", "sum", "x"), Feature("n", "count"))
    assert got.equals(training_set(spine, ["v:total", "v:n"], {"clicks": events},
                                   views=[view]))


# --------------------------------------------------------------------------
# ONLINE == OFFLINE against a real broker


@pytest.mark.pulsar
def test_online_lookups_equal_the_training_set_from_the_topic(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    import asyncio

    from tally.service.ingest.run import Ingestion
    from tally.service.store.lmdb import LmdbStore
    from tally.service.pulsar.producer import EventProducer
    from tally.service.history.topic import PulsarTopic

    source = Source("reads", topic_name,
                    schema={"user": "int64", "item": "int64", "x": "float64", "ts": "int64"})
    window = Window.sliding("3h", "1h")
    view = FeatureView("online_offline", user, source, features=[
        Feature("total", "sum", "x"), Feature("n", "count"), Feature("top", "max", "x"),
        Feature("latest", "last", "x"), Feature("total_3h", "sum", "x", window),
        Feature("n_3h", "count", window=window, filter="x > 2"),
        Feature("first_3h", "first", "x", window), Feature("mean", "mean", "x")])
    pulsar_broker.create_partitioned_topic(topic_name, 3)

    rng = np.random.default_rng(11)
    n_users, per_phase, phases = 300, 4_000, 5
    start = 1_732_780_800_000
    now = {"ms": start}
    store = LmdbStore(tmp_path / "store")
    reader = Ingestion(view, pulsar_client, store, batch_timeout_ms=20,
                       clock=lambda: now["ms"])
    producer = EventProducer(pulsar_client, topic_name, "user")
    lookups, produced = [], 0
    phase_start = start
    try:
        for phase in range(phases):
            # each phase spans 100 minutes, so sliding windows move between phases
            ts = np.sort(rng.integers(phase_start, phase_start + 100 * 60_000, per_phase))
            # phase 0 knows half the users; the last two only 50 of them, the last
            # after a pause of 4 hours: others sit idle while their windows expire
            users = rng.integers(0, (n_users // 2, n_users, n_users, 50, 50)[phase], per_phase)
            xs = np.round(rng.exponential(3, per_phase), 3)
            for u, t, x in zip(users, ts, xs):
                producer.send({"user": int(u), "item": 0, "x": float(x), "ts": int(t)})
            producer.flush()
            produced += per_phase
            t_phase = int(ts[-1])
            now["ms"] = t_phase
            reader.run(until=lambda ingestion: ingestion.stats.messages >= produced,
                       idle_timeout_s=60)
            # what tally serve's expiry rewrite does at each hop boundary: rewrite
            # every record as of now (so idle entities' windows move too)
            for worker in reader.workers:
                asyncio.run(worker.writer.write(worker.state, np.arange(len(worker.state))))
            keys = np.arange(n_users + 5)
            for key, record in zip(keys, store.get_many(view.name, keys)):
                lookups.append((int(key), t_phase, record))
            phase_start += 100 * 60_000 + (4 * HOUR if phase == 3 else 0)
    finally:
        producer.close()
        reader.close()
    assert reader.stats.events == produced

    spine = pd.DataFrame({"user": [k for k, _, _ in lookups], "ts": [t for _, t, _ in lookups]})
    names = [f.name for f in view.features]
    topic = PulsarTopic(pulsar_client)
    offline = training_set(spine, [view], views=[view], sources={"reads": topic},
                           chunk_rows=2_500)
    offline = offline.to_pydict()
    assert topic.messages == produced and topic.rejected == 0
    mismatches, compared = [], 0
    for row, (key, t, record) in enumerate(lookups):
        for name in names:
            online = None if record is None else record[name]
            if isinstance(online, float) and math.isnan(online):
                online = None
            compared += 1
            if offline[name][row] != online:
                mismatches.append((key, t, name, online, offline[name][row]))
    assert compared == len(lookups) * len(names)
    assert not mismatches, mismatches[:10]
    # the phases did exercise nulls, windows that moved, and idle entities
    assert any(r is None for _, _, r in lookups)
    moved = [i for i in range(len(lookups)) if offline["total"][i] is not None
             and offline["total_3h"][i] != offline["total"][i]]
    assert len(moved) > len(lookups) // 3
    emptied = [i for i in range(len(lookups)) if offline["n"][i] and offline["n_3h"][i] == 0
               and offline["first_3h"][i] is None]
    assert emptied          # an idle entity whose window expired by time alone
    store.close()
