"""Typed values in the core: int64 columns kept exactly (near +-2**63),
string columns in every aggregation that keeps values (windows and filters
included), the string dictionary in snapshots, collisions refused, snapshots
of the float64 era migrated or refused, and training sets typed as online
reads -- each against pandas or brute force."""
import msgpack
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tally.core import snapshot
from tally.core import view as view_module
from tally.core.aggregations import AGGREGATIONS, arrow_type, value_type
from tally.core.arena import make_arena
from tally.core.definitions import Entity, Feature, FeatureView, Source, Window
from tally.core.errors import DefinitionError, SnapshotError, TrainingSetWarning
from tally.core.sql import view_from_sql
from tally.core.strings import StringDictionary, string_code
from tally.core.training import training_set
from tally.core.types import VALUE_TYPES
from tally.core.view import EVENT_TIME, ViewState
from tally.service.ingest.fold import Fold, IngestStats

HOUR = 3_600_000
START = 1_732_780_800_000
I64 = np.iinfo(np.int64)
# ids that float64 cannot tell apart: neighbours of +-2**63 and of 2**53
HUGE = np.array([I64.max, I64.max - 1, I64.max - 2, I64.min, I64.min + 1,
                 2**53 + 1, 2**53, -(2**53) - 1, 0, 7], dtype=np.int64)
WORDS = np.array(["news", "sport", "", "économie", "政治", "sport ", "a'b", "skip"],
                 dtype=object)

user = Entity("user", "int64")
events_source = Source("reads", "reads", schema={"user": "int64", "article": "int64",
                                                 "title": "string", "category": "string",
                                                 "readtime": "float64", "ts": "int64"})
week = Window.sliding("7d", "1d")
tumbling = Window.tumbling("1d")


def features(column, window, suffix, filter=None):
    return [Feature(f"first_{suffix}", "first", column, window, filter=filter),
            Feature(f"last_{suffix}", "last", column, window, filter=filter),
            Feature(f"last_n_{suffix}", "last_n", column, window, filter=filter, n=4),
            Feature(f"top_k_{suffix}", "top_k", column, window, filter=filter, k=3),
            Feature(f"distinct_{suffix}", "distinct_count", column, window, filter=filter)]


VIEW = FeatureView("typed", user, events_source, features=(
    features("article", Window.lifetime(), "article")
    + features("article", week, "article_7d")
    + features("title", Window.lifetime(), "title")
    + features("title", tumbling, "title_1d", filter="category IN ('news', 'sport')")
    + features("title", week, "title_7d", filter="title != 'skip'")
    + [Feature("reads", "count")]))


def make_events(n=6_000, users=40, seed=0, nulls=True):
    rng = np.random.default_rng(seed)
    ts = START + np.sort(rng.integers(0, 20 * 24 * HOUR, n))
    # few distinct values per user, so that top_k's counters are exact
    article = HUGE[rng.integers(0, len(HUGE), n)]
    title = WORDS[rng.integers(0, len(WORDS), n)].copy()
    category = np.array(["news", "sport", "other"], dtype=object)[rng.integers(0, 3, n)]
    article_valid = np.ones(n, dtype=bool)
    if nulls:
        title[rng.random(n) < 0.05] = None
        article_valid = rng.random(n) >= 0.05
    columns = {"user": rng.integers(0, users, n), "article": np.where(article_valid, article, 0),
               "title": title, "category": category, "readtime": rng.random(n), "ts": ts}
    return columns, {"article": article_valid}


def apply_in_batches(state, columns, valid, batch=1_500):
    for start in range(0, len(columns["ts"]), batch):
        state.apply({k: v[start:start + batch] for k, v in columns.items()},
                    {k: v[start:start + batch] for k, v in valid.items()})


# -- the oracle ---------------------------------------------------------------

def in_window(df, window, as_of):
    if window.size_ms == 0:
        return df[df["ts"] <= as_of]
    current, epoch = as_of // window.hop_ms, df["ts"] // window.hop_ms
    return df[(epoch > current - window.size_ms // window.hop_ms) & (epoch <= current)]


def expected(columns, valid, feature, users, as_of):
    """(values, valid) of a feature by its definition, with pandas; top_k
    ties by value, as the arena orders an int64 column (codes: a string's)."""
    df = pd.DataFrame({k: pd.Series(list(v), dtype=object) if v.dtype == object else v
                       for k, v in columns.items()})
    df = df[valid["article"]] if feature.column == "article" else df[df["title"].notna()]
    if feature.filter == "category IN ('news', 'sport')":
        df = df[df["category"].isin(["news", "sport"])]
    elif feature.filter == "title <> 'skip'":
        df = df[df["title"] != "skip"]
    df = in_window(df, feature.window, as_of)
    out, ok = [], []
    for u in users:
        rows = df[df["user"] == u][feature.column].tolist()
        seen = u in set(columns["user"][columns["ts"] <= as_of].tolist())
        if feature.aggregation in ("first", "last"):
            ok.append(bool(rows))
            out.append((rows[0] if feature.aggregation == "first" else rows[-1]) if rows else None)
        elif feature.aggregation == "last_n":
            ok.append(seen)
            out.append(rows[::-1][:feature.n])
        elif feature.aggregation == "top_k":
            ok.append(seen)
            counts = pd.Series(rows, dtype=object).value_counts()
            key = (lambda v: string_code(v)) if feature.column == "title" else (lambda v: v)
            pairs = sorted(counts.items(), key=lambda p: (-p[1], key(p[0])))
            out.append([(v, int(c)) for v, c in pairs[:feature.k]])
        else:
            ok.append(seen)
            out.append(len(set(rows)))
    return out, np.array(ok)


def check_view_state(state, columns, valid, as_of):
    users = np.unique(columns["user"])
    got = state.read_keys(users, as_of)
    for feature in VIEW.features:
        if feature.column is None:
            continue
        values, ok = got[feature.name]
        want, want_ok = expected(columns, valid, feature, users, as_of)
        where = f"{feature.name} as of {as_of}"
        if feature.aggregation in ("first", "last"):
            np.testing.assert_array_equal(ok, want_ok, where)
            if feature.column == "article":
                assert values.dtype == np.int64, where
                assert values[ok].tolist() == [w for w, o in zip(want, want_ok) if o], where
            else:
                assert values.dtype == object, where
                assert values.tolist() == want, where
        elif feature.aggregation == "distinct_count":
            assert values.dtype == np.int64, where
            assert values.tolist() == want, where
        else:
            assert values.dtype == object, where
            item = int if feature.column == "article" else str
            for value, w, row_ok in zip(values, want, ok):
                if feature.aggregation == "top_k":
                    assert all(type(v) is item and type(c) is int for v, c in value), where
                    value = [tuple(p) for p in value]
                else:
                    assert all(type(v) is item for v in value), where
                assert value == w, where


@pytest.mark.parametrize("days_after", [0, 1, 3, 9])
def test_int64_and_string_values_equal_pandas(days_after):
    columns, valid = make_events()
    state = ViewState(VIEW)
    apply_in_batches(state, columns, valid)
    assert len(state.strings) == len(set(WORDS))        # every title, once
    check_view_state(state, columns, valid, int(columns["ts"].max()) + days_after * 24 * HOUR)


def test_int64_values_float64_cannot_hold_stay_exact():
    view = FeatureView("ids", user, events_source, features=[
        Feature("last_article", "last", "article"),
        Feature("recent", "last_n", "article", n=3),
        Feature("top", "top_k", "article", k=2),
        Feature("distinct", "distinct_count", "article")])
    ids = np.array([I64.max, I64.max - 1, I64.min + 1, I64.min], dtype=np.int64)
    assert len(set(ids.astype(np.float64).tolist())) == 2       # float64 merges them
    state = ViewState(view)
    state.apply({"user": np.zeros(4, np.int64), "article": ids,
                 "ts": START + np.arange(4, dtype=np.int64)})
    got = state.read_keys(np.array([0]), START + 10)
    assert got["last_article"][0].tolist() == [I64.min]
    assert got["recent"][0][0] == [I64.min, I64.min + 1, I64.max - 1]
    assert sorted(got["top"][0][0]) == sorted([(int(I64.min), 1), (int(I64.min + 1), 1)])
    assert got["distinct"][0].tolist() == [4]


def test_arena_refuses_float_values_for_int64_and_int64_for_arithmetic():
    arena = make_arena("last", value_type="int64")
    with pytest.raises(TypeError, match="int64 values"):
        arena.update(np.array([0]), np.array([START]), np.array([1.5]))
    with pytest.raises(ValueError, match="only first and last"):
        make_arena("sum", value_type="int64")


# -- string definitions and filters ---------------------------------------------

@pytest.mark.parametrize("aggregation", ["sum", "mean", "min", "max"])
def test_arithmetic_of_a_string_column_is_refused_at_definition(aggregation):
    with pytest.raises(DefinitionError) as error:
        FeatureView("bad", user, events_source, features=[
            Feature("title_total", aggregation, "title")])
    message = str(error.value)
    assert "title_total" in message and "string" in message
    assert "last" in message and "top_k" in message           # the fix: what works
    with pytest.raises(DefinitionError, match="title"):
        view_from_sql(f"SELECT user, {aggregation.upper()}(title) AS t FROM reads "
                      "GROUP BY user", sources=[events_source], name="bad")


def test_string_filters_in_sql_where_equal_the_python_dsl():
    columns, valid = make_events(seed=5, nulls=False)
    sql_view = view_from_sql(
        "SELECT user, LAST(title) AS last_title, TOP_K(title, 2) AS top_titles, "
        "COUNT(*) FILTER (WHERE title = 'news') AS news "
        "FROM reads WHERE category IN ('news', 'sport') AND title != 'skip' GROUP BY user",
        sources=[events_source], name="by_sql")
    state = ViewState(sql_view)
    state.apply(columns)
    users = np.unique(columns["user"])
    got = state.read_keys(users, int(columns["ts"].max()))
    df = pd.DataFrame({k: list(v) for k, v in columns.items()})
    df = df[df["category"].isin(["news", "sport"]) & (df["title"] != "skip")]
    for i, u in enumerate(users.tolist()):
        mine = df[df["user"] == u]
        assert got["last_title"][0][i] == (mine["title"].iloc[-1] if len(mine) else None)
        assert got["news"][0][i] == int((mine["title"] == "news").sum())
        counts = mine["title"].value_counts()
        want = sorted(counts.items(), key=lambda p: (-p[1], string_code(p[0])))[:2]
        assert got["top_titles"][0][i] == [(v, int(c)) for v, c in want]


# -- snapshots --------------------------------------------------------------------

def test_snapshot_round_trip_keeps_the_dictionary_and_merge_equals_one_pass():
    columns, valid = make_events(seed=1)
    whole = ViewState(VIEW)
    apply_in_batches(whole, columns, valid)
    half = len(columns["ts"]) // 2
    first, second = ViewState(VIEW), ViewState(VIEW)
    apply_in_batches(first, {k: v[:half] for k, v in columns.items()},
                     {k: v[:half] for k, v in valid.items()})
    apply_in_batches(second, {k: v[half:] for k, v in columns.items()},
                     {k: v[half:] for k, v in valid.items()})
    buffer = snapshot.dumps(first.export_arrays(), {"params": first.describe()})
    arrays, meta = snapshot.loads(buffer)
    assert any(name.startswith("strings.") for name in arrays)
    restored = ViewState.from_arrays(VIEW, meta["params"], arrays)
    assert len(restored.strings) == len(first.strings)
    restored.merge(second)
    as_of = int(columns["ts"].max())
    users = np.unique(columns["user"])
    got, want = restored.read_keys(users, as_of), whole.read_keys(users, as_of)
    for feature in VIEW.features:
        if feature.aggregation == "top_k":     # a merged summary may differ; exact here
            assert [sorted(v) for v in got[feature.name][0]] == \
                [sorted(v) for v in want[feature.name][0]]
        else:
            assert got[feature.name][0].tolist() == want[feature.name][0].tolist(), \
                feature.name
    check_view_state(restored, columns, valid, as_of)


def test_a_dictionary_snapshot_whose_string_lost_its_code_is_refused():
    dictionary = StringDictionary()
    dictionary.encode(["news", "sport"])
    arrays = dictionary.export_arrays()
    arrays["codes"] = arrays["codes"][::-1].copy()
    with pytest.raises(ValueError, match="does not have the code"):
        StringDictionary.from_arrays(arrays)


INT_VIEW = FeatureView("ids_old", user, events_source, features=[
    Feature("first_article", "first", "article", week),
    Feature("last_article", "last", "article"),
    Feature("recent", "last_n", "article", n=3),
    Feature("top", "top_k", "article", k=2),
    Feature("total", "sum", "readtime")])


def old_format_snapshot(view, columns):
    """A snapshot as Tally wrote it before value types: every arena float64
    (int64 values converted), arenas described without a value type."""
    state = ViewState(view)
    for feature in view.features:
        state.arenas[feature.name] = make_arena(
            feature.aggregation, feature.window.size_ms, feature.window.hop_ms,
            feature.lateness_ms, getattr(feature, "param", None))
    float_columns = dict(columns, article=columns["article"].astype(np.float64))
    state.fold(state.encode(float_columns))
    params = state.describe()
    assert all("value_type" not in p for p in params.values())
    return snapshot.loads(snapshot.dumps(state.export_arrays(), {"params": params}))


def test_an_old_snapshot_of_int64_values_below_2_53_migrates_exactly():
    rng = np.random.default_rng(2)
    n = 500
    columns = {"user": rng.integers(0, 10, n), "article": rng.integers(-2**52, 2**52, n),
               "readtime": rng.random(n), "ts": START + np.sort(rng.integers(0, 9 * HOUR, n))}
    arrays, meta = old_format_snapshot(INT_VIEW, columns)
    restored = ViewState.from_arrays(INT_VIEW, meta["params"], arrays)
    fresh = ViewState(INT_VIEW)
    fresh.apply(columns)
    users = np.arange(10)
    got, want = restored.read_keys(users, START + 9 * HOUR), fresh.read_keys(users, START + 9 * HOUR)
    for name in ("first_article", "last_article", "recent", "top", "total"):
        assert got[name][0].tolist() == want[name][0].tolist(), name
    assert got["last_article"][0].dtype == np.int64
    # and it is saved in today's format afterwards
    assert restored.describe()["last_article"]["value_type"] == "int64"


def test_an_old_snapshot_it_cannot_convert_is_refused_with_what_to_do():
    columns = {"user": np.array([0, 1]), "article": np.array([2**60 + 1, 5]),
               "readtime": np.ones(2), "ts": np.array([START, START + 1])}
    arrays, meta = old_format_snapshot(INT_VIEW, columns)
    with pytest.raises(SnapshotError, match="re-bootstrap the view"):
        ViewState.from_arrays(INT_VIEW, meta["params"], arrays)
    sketch = FeatureView("sketch", user, events_source,
                         features=[Feature("distinct", "distinct_count", "article")])
    arrays, meta = old_format_snapshot(sketch, dict(columns, article=np.array([1, 2])))
    with pytest.raises(SnapshotError, match="hashed them as float64.*re-bootstrap"):
        ViewState.from_arrays(sketch, meta["params"], arrays)


# -- collisions ---------------------------------------------------------------------

class _Colliding(StringDictionary):
    """A dictionary in which 'sport' has already been given to another string."""

    def __init__(self):
        super().__init__()
        self.add(string_code("sport"), "not sport")


def test_a_colliding_string_is_refused_never_merged(monkeypatch):
    monkeypatch.setattr(view_module, "StringDictionary", _Colliding)
    columns, valid = make_events(seed=4, nulls=False)
    state = ViewState(VIEW)
    apply_in_batches(state, columns, valid)
    sport = columns["title"] == "sport"
    assert state.refused_strings == int(sport.sum()) > 0
    # the state is the state of the stream without those events
    kept = {k: v[~sport] for k, v in columns.items()}
    got = state.read_keys(np.unique(kept["user"]), int(columns["ts"].max()))
    oracle = ViewState(VIEW)
    oracle.apply(kept)
    want = oracle.read_keys(np.unique(kept["user"]), int(columns["ts"].max()))
    for feature in VIEW.features:
        assert got[feature.name][0].tolist() == want[feature.name][0].tolist(), feature.name
    assert not any("not sport" in row or "sport" in row for row in got["last_n_title"][0])


def test_the_stream_dead_letters_the_payload_of_a_colliding_string(monkeypatch):
    monkeypatch.setattr(view_module, "StringDictionary", _Colliding)
    source = Source("reads", "reads", schema=dict(events_source.schema),
                    earliest_event_time=-2**62, max_event_time_ahead=2**62)
    view = FeatureView("typed", user, source, features=[Feature("t", "last", "title"),
                                                        Feature("reads", "count")])
    rows = [("news", 1), ("sport", 2), ("news", 3), ("sport", 4)]
    payloads = [msgpack.packb({"user": 1, "article": 1, "title": title, "category": "c",
                               "readtime": 1.0, "ts": ts}) for title, ts in rows]
    stats = IngestStats()
    state = ViewState(view)
    touched, rejects = Fold(view, stats)(state, payloads)
    assert [index for index, _ in rejects] == [1, 3]
    assert all("'sport'" in reason and "refused" in reason for _, reason in rejects)
    assert stats.events == 2 and stats.rejected == 2
    got = state.read_keys(np.array([1]), 10)
    assert got["t"][0].tolist() == ["news"] and got["reads"][0].tolist() == [2]


def test_a_training_set_warns_and_leaves_colliding_events_out(monkeypatch):
    monkeypatch.setattr(view_module, "StringDictionary", _Colliding)
    columns, _ = make_events(seed=6, nulls=False)
    spine = {"user": np.unique(columns["user"]),
             "ts": np.full(len(np.unique(columns["user"])), int(columns["ts"].max()))}
    with pytest.warns(TrainingSetWarning, match="'sport'"):
        table = training_set(spine, ["typed:last_n_title"], columns, views=[VIEW])
    lists = table.column("last_n_title").to_pylist()
    assert not any("sport" in row for row in lists) and any("sport " in row for row in lists)


# -- training sets have the online types ---------------------------------------------

def test_arrow_type_is_value_type():
    scalars = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}
    seen = set()
    for name, spec in AGGREGATIONS.items():
        for column_type in spec.column_types or (None,):
            kind = value_type(name, column_type)
            seen.add(kind)
            item = scalars.get(kind) or scalars[kind.split("<")[1].rstrip(">")]
            want = item if kind in scalars else pa.list_(item) if kind.startswith("list") \
                else pa.list_(pa.struct([("value", item), ("count", pa.int64())]))
            assert arrow_type(name, column_type) == want, (name, column_type)
    assert seen == set(VALUE_TYPES)


def _online_as_arrow(values, ok, feature):
    """An online read as a training set holds it (top_k pairs as structs)."""
    out = []
    for value, present in zip(values.tolist(), ok.tolist()):
        if not present:
            out.append(None)
        elif feature.aggregation == "top_k":
            out.append([{"value": v, "count": c} for v, c in value])
        else:
            out.append(value)
    return out


def test_training_set_values_and_types_equal_online_reads():
    columns, valid = make_events(seed=8, nulls=False)
    rng = np.random.default_rng(9)
    times = np.sort(rng.integers(START, int(columns["ts"].max()) + 48 * HOUR, 12))
    users = np.unique(columns["user"])
    spine = pd.DataFrame({"user": np.tile(users, len(times)),
                          "ts": np.repeat(times, len(users))})
    table = training_set(spine, ["typed"], columns, views=[VIEW])
    for t in times.tolist():
        state = ViewState(VIEW)
        upto = columns["ts"] <= t
        state.apply({k: v[upto] for k, v in columns.items()})
        online = state.read_keys(users, t)
        seen = online[EVENT_TIME][1]
        rows = (spine["ts"] == t).to_numpy()
        for feature in VIEW.features:
            column = table.column(feature.name)
            assert column.type == arrow_type(feature.aggregation,
                                             VIEW.source.field_type(feature.column)
                                             if feature.column else None), feature.name
            values, ok = online[feature.name]
            want = _online_as_arrow(values, ok & seen, feature)
            got = column.filter(pa.array(rows)).to_pylist()
            assert got == want, (feature.name, t)
