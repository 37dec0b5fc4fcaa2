"""HISTOGRAM and derived features (ENTROPY, TOP_VALUE, arithmetic): online
records and training sets give the same values, and both equal pandas."""
import math

import msgpack
import numpy as np
import pandas as pd
import pytest

from tally import Derived, Entity, Feature, FeatureView, Source, Window, training_set
from tally.core.errors import DefinitionError
from tally.core.expressions import entropy
from tally.core.materialize import online_schema, records_for
from tally.core.record import decode_record
from tally.core.sql import load_sql
from tally.core.view import ViewState
from tally.service.ingest.fold import Fold, IngestStats

HOUR = 3_600_000
WIDE = dict(earliest_event_time=-2**62, max_event_time_ahead=2**62)
READS = Source("reads", "reads", {"user": "int64", "category": "string",
                                  "readtime": "float64", "ts": "int64"}, **WIDE)
CATEGORIES = ["news", "sports", "tech", "arts", "culture", "travel"]


def taste():
    return FeatureView("taste", Entity("user"), READS, [
        Feature("categories", "histogram", "category", k=8),
        Feature("categories_1d", "histogram", "category", window=Window.sliding("1d", "1h")),
        Feature("total", "sum", "readtime"),
        Feature("reads", "count"),
    ], derived=[Derived("diversity", "ENTROPY(categories)"),
                Derived("diversity_1d", "ENTROPY(categories_1d)"),
                Derived("top_category", "TOP_VALUE(categories)"),
                Derived("mean_readtime", "total / reads"),
                Derived("sporty", "COALESCE(CONTAINS(categories, 'sports'), 0)")])


def events(seed=5, n=4000, users=60):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(len(CATEGORIES)), users)     # each user's taste
    user = rng.integers(0, users, n)
    category = [CATEGORIES[rng.choice(len(CATEGORIES), p=weights[u])] for u in user]
    return pd.DataFrame({"user": user, "category": category,
                         "readtime": rng.random(n) * 60, "ts": rng.integers(0, 10 * 24 * HOUR, n)})


def oracle(frame, user, t):
    mine = frame[(frame.user == user) & (frame.ts <= t)]
    counts = mine.category.value_counts()
    epoch = mine.ts // HOUR
    recent = mine[(epoch > t // HOUR - 24) & (epoch <= t // HOUR)].category.value_counts()
    return {"diversity": entropy(counts.tolist()) if len(counts) else None,
            "diversity_1d": entropy(recent.tolist()) if len(recent) else None,
            "top_category": set(counts[counts == counts.max()].index) if len(counts) else None,
            "mean_readtime": mine.readtime.sum() / len(mine) if len(mine) else None,
            "sporty": int("sports" in counts.index) if len(mine) else None,  # no record
            "categories": dict(counts)}


def check(row, expected, where):
    for name in ("diversity", "diversity_1d", "mean_readtime"):
        if expected[name] is None:
            assert row[name] is None or (isinstance(row[name], float) and math.isnan(row[name])), \
                (where, name, row[name])
        else:
            assert row[name] == pytest.approx(expected[name], abs=1e-12), (where, name)
    if expected["top_category"] is not None:
        assert row["top_category"] in expected["top_category"], where
    assert row["sporty"] == expected["sporty"], (where, row["sporty"])


def test_histogram_counts_are_exact_up_to_k_values_and_derived_features_match_pandas():
    frame, view = events(), taste()
    rng = np.random.default_rng(9)
    spine = pd.DataFrame({"user": rng.integers(0, 60, 300), "ts": rng.integers(0, 11 * 24 * HOUR, 300)})
    table = training_set(spine, [view], sources=frame)
    for row in table.to_pylist():
        expected = oracle(frame, row["user"], row["ts"])
        check(row, expected, row)
        if row["categories"] is not None and len(row["categories"]):
            assert {p["value"]: p["count"] for p in row["categories"]} == expected["categories"]


def test_records_carry_derived_features_equal_to_the_training_set():
    frame, view = events(seed=6), taste()
    state, stats = ViewState(view), IngestStats()
    fold = Fold(view, stats)
    rows = frame.to_dict("records")
    for start in range(0, len(rows), 300):
        fold(state, [msgpack.packb({"user": int(r["user"]), "category": r["category"],
                                    "readtime": float(r["readtime"]), "ts": int(r["ts"])})
                     for r in rows[start:start + 300]])
    end = int(frame.ts.max())
    users = np.array(sorted(frame.user.unique()))
    schema = online_schema(view)
    assert [n for n, _ in schema.features][-5:] == [d.name for d in view.derived]
    records = records_for(state, schema, state.index.lookup(users), end, end)
    encoded = records.encode(schema)
    offline = training_set(pd.DataFrame({"user": users, "ts": end}), [view], sources=frame)
    for i, (user, row) in enumerate(zip(users.tolist(), offline.to_pylist())):
        online = decode_record(schema, encoded[i])
        # integer counts: the same bits; a sum's float rounding follows its order
        for name in ("diversity", "diversity_1d", "top_category", "sporty"):
            assert online[name] == row[name] or (online[name] != online[name] and
                                                 row[name] is None), (user, name)
        assert online["mean_readtime"] == pytest.approx(row["mean_readtime"], rel=1e-12)
        check(online, oracle(frame, user, end), user)


def test_sql_writes_derived_features_over_aggregates():
    (view,) = load_sql("""CREATE VIEW taste AS SELECT user,
        ENTROPY(HISTOGRAM(category, 8)) AS diversity,
        SUM(readtime) / COUNT(*) AS mean_readtime, COUNT(*) AS reads,
        reads * 2 AS twice FROM reads GROUP BY user""", sources=[READS])
    assert [f.name for f in view.features] == ["reads", "histogram_category", "sum_readtime"] \
        or {f.name for f in view.features} == {"reads", "histogram_category", "sum_readtime"}
    assert {d.name: d.expression for d in view.derived} == {
        "diversity": "ENTROPY(histogram_category)",
        "mean_readtime": "sum_readtime / reads", "twice": "reads * 2"}


def test_derived_features_are_checked_at_definition_time():
    def refused(expression):
        with pytest.raises(DefinitionError) as error:
            FeatureView("v", Entity("user"), READS, [Feature("total", "sum", "readtime")],
                        derived=[Derived("x", expression)])
        return str(error.value)
    assert "ENTROPY reads (value, count) pairs" in refused("ENTROPY(total)")
    assert "'totl' is not a value it can read; did you mean 'total'?" in refused("totl / 2")
    assert "outside the expression language" in refused("SQRT(total)")
    with pytest.raises(DefinitionError, match="used twice"):
        FeatureView("v", Entity("user"), READS, [Feature("total", "sum", "readtime")],
                    derived=[Derived("total", "total * 2")])


@pytest.mark.parametrize("op", ["=", "<>", "<", "<=", ">", ">="])
def test_string_comparisons_are_null_when_either_side_is(op):
    """A comparison of two string columns (a request-time feature's
    ``article_info.category = user_taste.top_category``) against Python's,
    null where either side is."""
    import operator
    from tally.core.expressions import Expression
    python = {"=": operator.eq, "<>": operator.ne, "<": operator.lt, "<=": operator.le,
              ">": operator.gt, ">=": operator.ge}[op]
    a = ["news", None, "arts", "tech", "", None, "sports"]
    b = ["news", "tech", None, "arts", "", None, "spor"]
    columns = {name: (np.array(values, dtype=object),
                      np.array([v is not None for v in values]))
               for name, values in (("a", a), ("b", b))}
    values, valid = Expression(f"a {op} b", {"a": "string", "b": "string"})(columns, len(a))
    assert valid.tolist() == [x is not None and y is not None for x, y in zip(a, b)]
    assert [int(v) for v, ok in zip(values, valid) if ok] == \
        [int(python(x, y)) for x, y in zip(a, b) if x is not None and y is not None]
