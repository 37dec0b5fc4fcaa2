"""Feature filters: canonical text, validation against a schema, and the numpy
evaluator, whose results are checked against SQLite's own WHERE evaluation
(SQL three-valued logic) on random filters over columns with nulls."""
import sqlite3

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.core.filters import (FilterError, check_filter, compile_filter, filter_columns,
                                normalize_filter)

SCHEMA = (("user", "int64"), ("readtime", "float64"), ("country", "string"),
          ("premium", "bool"), ("ts", "int64"))


# --------------------------------------------------------------------------
# canonical text

@pytest.mark.parametrize("a, b", [
    ("readtime>0", "readtime > 0"),
    ("  readtime  >  0  ", "(readtime > 0)"),
    ("readtime > 0 and user = 1", "readtime > 0 AND (user = 1)"),
    ("a > 1 AND (b < 2 OR c = 3)", "(a > 1) and (b < 2 or (c = 3))"),
    ("x != 1", "x <> 1"),
    ("NOT x IS NULL", "x IS NOT NULL"),
    ("NOT x IN (1, 2)", "x NOT IN (1,2)"),
    ("a AND (b AND c)", "a AND b AND c"),
    ('"readtime" > 0', "readtime > 0"),
])
def test_equal_filters_have_equal_canonical_text(a, b):
    assert normalize_filter(a) == normalize_filter(b)


@pytest.mark.parametrize("text, canonical", [
    ("readtime>0", "readtime > 0"),
    ("(a OR b) AND c", "(a OR b) AND c"),
    ("a OR (b AND c)", "a OR b AND c"),
    ("NOT (a AND b)", "NOT (a AND b)"),
    ("a - (b - c) > (1)", "a - (b - c) > 1"),
    ("(a - b) - c > 1", "a - b - c > 1"),
    ("a * (b + c) >= 2", "a * (b + c) >= 2"),
    ("x not between 1 and 2", "x NOT BETWEEN 1 AND 2"),
    ("country in ('de','fr')", "country IN ('de', 'fr')"),
    ("flag is true", "flag IS TRUE"),
    ('"window" > 1 AND "read time" < 2', '"window" > 1 AND "read time" < 2'),
])
def test_canonical_text(text, canonical):
    assert normalize_filter(text) == canonical
    assert normalize_filter(canonical) == canonical          # idempotent


def test_parentheses_that_change_meaning_are_kept():
    assert normalize_filter("(a OR b) AND c") != normalize_filter("a OR b AND c")
    assert normalize_filter("a - (b - c) > 0") != normalize_filter("a - b - c > 0")


def test_filter_columns():
    assert filter_columns("readtime > 0 AND country IN ('de') OR user IS NULL") == \
        {"readtime", "country", "user"}


# --------------------------------------------------------------------------
# refusals, with their messages

@pytest.mark.parametrize("text, message", [
    ("", "the filter is empty; write a SQL boolean expression such as 'readtime > 0'"),
    ("readtime >", "syntax error: line 1, col"),
    ("readtime > 0; user = 1", "write one expression (no ';'), e.g. 'readtime > 0'"),
    ("country LIKE 'd%'", "LIKE is not supported in filters; use comparisons (= <> < <= > >=), "
                          "AND, OR, NOT, IN (...), BETWEEN, IS [NOT] NULL and arithmetic "
                          "(+ - * / %) over columns and literals"),
    ("LOWER(country) = 'de'", "function LOWER() is not supported in filters"),
    ("SUM(readtime) > 0", "aggregate SUM() is not supported in filters"),
    ("user IN (SELECT user FROM t)", "is not supported in filters"),
    ("e.readtime > 0", "column 'e.readtime' has a table prefix; write the bare column name "
                       "'readtime'"),
    ("user IN (1, user)", "IN lists literal values only (found 'user'); write x IN (1, 2, 3) "
                          "or x IN ('a', 'b')"),
    ("CASE WHEN user > 1 THEN TRUE END", "CASE is not supported in filters"),
    ("CAST(user AS TEXT) = '1'", "CAST is not supported in filters"),
])
def test_unsupported_filters_are_refused(text, message):
    with pytest.raises(FilterError) as error:
        normalize_filter(text)
    assert message in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("readtme > 0", "column 'readtme' is not a field of the source; did you mean 'readtime'? "
                    "use one of user, readtime, country, premium, ts"),
    ("country > 3", "'country > 3' compares values of different types ('3' is a number, "
                    "'country' is a string); compare numbers with numbers, strings with "
                    "quoted strings ('...') and bools with TRUE/FALSE"),
    ("user IN ('a', 'b')", "compares values of different types"),
    ("readtime + 1", "the filter is a number, not a condition; compare it, e.g. "
                     "'readtime + 1 > 0'"),
    ("country", "the filter is a string, not a condition"),
    ("readtime > 0 AND user", "AND needs a condition, but 'user' is a number"),
    ("NOT readtime", "NOT needs a condition, but 'readtime' is a number"),
    ("country * 2 > 1", "arithmetic needs a number, but 'country' is a string"),
    ("user IS TRUE", "IS TRUE/FALSE needs a condition, but 'user' is a number"),
])
def test_filters_are_checked_against_the_schema(text, message):
    with pytest.raises(FilterError) as error:
        check_filter(text, SCHEMA)
    assert message in str(error.value)


def test_valid_filters_pass_the_check():
    for text in ("readtime > 0", "premium", "NOT premium AND country = 'de'",
                 "user % 10 = 3 OR readtime BETWEEN 1 AND 2.5", "country IS NULL",
                 "premium IS NOT TRUE", "readtime > NULL", "TRUE", "-readtime < -1"):
        check_filter(text, SCHEMA)


# --------------------------------------------------------------------------
# evaluation

COLUMNS = {
    "user": np.array([1, 2, 3, 4, 5], dtype=np.int64),
    "readtime": np.array([0.0, 12.5, np.nan, 90.0, 3.0]),
    "country": np.array(["de", "fr", None, "us", "de"], dtype=object),
    "premium": np.array([True, False, True, False, True]),
}


@pytest.mark.parametrize("text, expected", [
    ("readtime > 0", [0, 1, 0, 1, 1]),
    ("NOT readtime > 0", [1, 0, 0, 0, 0]),              # null stays unknown under NOT
    ("readtime > 0 OR premium", [1, 1, 1, 1, 1]),       # unknown OR true = true
    ("readtime > 0 AND premium", [0, 0, 0, 0, 1]),
    ("readtime IS NULL", [0, 0, 1, 0, 0]),
    ("country IS NOT NULL AND country <> 'de'", [0, 1, 0, 1, 0]),
    ("country IN ('de', 'us')", [1, 0, 0, 1, 1]),
    ("country NOT IN ('de')", [0, 1, 0, 1, 0]),
    ("user BETWEEN 2 AND 4", [0, 1, 1, 1, 0]),
    ("user NOT BETWEEN 2 AND 4", [1, 0, 0, 0, 1]),
    ("user % 2 = 0", [0, 1, 0, 1, 0]),
    ("readtime / user > 5", [0, 1, 0, 1, 0]),
    ("readtime / (user - 1) >= 0", [0, 1, 0, 1, 1]),     # division by zero is null
    ("-user < -3", [0, 0, 0, 1, 1]),
    ("premium IS TRUE", [1, 0, 1, 0, 1]),
    ("premium = FALSE", [0, 1, 0, 1, 0]),
    ("user IN (1, NULL)", [1, 0, 0, 0, 0]),
    ("NOT user IN (1, NULL)", [0, 0, 0, 0, 0]),
    ("TRUE", [1, 1, 1, 1, 1]),
    ("user > NULL", [0, 0, 0, 0, 0]),
    ("country > 'e'", [0, 1, 0, 1, 0]),
    ("user = NULL - NULL", [0, 0, 0, 0, 0]),             # found by hypothesis
    ("-NULL IS NULL AND NULL + 1 IS NULL", [1, 1, 1, 1, 1]),
])
def test_evaluation(text, expected):
    check_filter(text, SCHEMA)
    result = compile_filter(text, SCHEMA)(COLUMNS)
    assert result.dtype == bool and result.tolist() == [bool(x) for x in expected]


def test_validity_masks_mark_nulls():
    f = compile_filter("user > 2")
    valid = {"user": np.array([True, True, True, False, True])}
    assert f(COLUMNS, valid).tolist() == [False, False, True, False, True]
    assert compile_filter("user IS NULL")(COLUMNS, valid).tolist() == \
        [False, False, False, True, False]


def test_compiled_filter_reports_missing_columns():
    with pytest.raises(KeyError, match="needs the columns"):
        compile_filter("nope > 1")({"user": np.array([1])})


def test_compiled_filter_on_an_empty_batch():
    empty = {k: v[:0] for k, v in COLUMNS.items()}
    assert compile_filter("readtime > 0 AND country = 'de'")(empty).shape == (0,)


def test_compile_refuses_a_filter_that_does_not_fit_the_schema():
    with pytest.raises(FilterError, match="not a field"):
        compile_filter("nope > 1", SCHEMA)
    assert compile_filter("readtime > 0").text == "readtime > 0"


# --------------------------------------------------------------------------
# property: the evaluator agrees with SQLite on random filters

_NUMERIC = ("a", "b", "x")      # int64, int64, float64 (with nulls)


def _operand():
    leaf = st.one_of(st.sampled_from(_NUMERIC),
                     st.integers(-3, 3).map(str),
                     st.sampled_from(["1.5", "-0.5", "NULL"]))
    return st.recursive(leaf, lambda inner: st.tuples(
        inner, st.sampled_from(["+", "-", "*"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        max_leaves=3)


def _predicate():
    comparison = st.tuples(_operand(), st.sampled_from(["=", "<>", "<", "<=", ">", ">="]),
                           _operand()).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
    membership = st.tuples(st.sampled_from(_NUMERIC), st.booleans(),
                           st.lists(st.sampled_from(["0", "1", "2", "NULL"]), min_size=1,
                                    max_size=3)).map(
        lambda t: f"{t[0]} {'NOT ' if t[1] else ''}IN ({', '.join(t[2])})")
    between = st.tuples(st.sampled_from(_NUMERIC), st.booleans(), _operand(), _operand()).map(
        lambda t: f"{t[0]} {'NOT ' if t[1] else ''}BETWEEN {t[2]} AND {t[3]}")
    null_test = st.tuples(st.sampled_from(_NUMERIC), st.booleans()).map(
        lambda t: f"{t[0]} IS {'NOT ' if t[1] else ''}NULL")
    flag = st.sampled_from(["s = 'p'", "s <> 'q'", "s IN ('p', 'r')", "s IS NULL", "s > 'p'"])
    leaf = st.one_of(comparison, membership, between, null_test, flag)
    return st.recursive(leaf, lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["AND", "OR"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda p: f"NOT ({p})")), max_leaves=5)


_ROWS = st.lists(st.tuples(st.one_of(st.none(), st.integers(-3, 3)),
                           st.integers(-3, 3),
                           st.one_of(st.none(), st.sampled_from([-1.5, 0.0, 0.5, 2.0])),
                           st.one_of(st.none(), st.sampled_from(["p", "q", "r"]))),
                 min_size=1, max_size=12)


@given(text=_predicate(), rows=_ROWS)
def test_evaluator_agrees_with_sqlite(text, rows):
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (id INTEGER, a INTEGER, b INTEGER, x REAL, s TEXT)")
    db.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)",
                   [(i,) + row for i, row in enumerate(rows)])
    expected = {r[0] for r in db.execute(f"SELECT id FROM t WHERE {text}")}
    columns = {
        "a": np.array([0 if r[0] is None else r[0] for r in rows], dtype=np.int64),
        "b": np.array([r[1] for r in rows], dtype=np.int64),
        "x": np.array([np.nan if r[2] is None else r[2] for r in rows]),
        "s": np.array([r[3] for r in rows], dtype=object),
    }
    valid = {"a": np.array([r[0] is not None for r in rows])}
    canonical = normalize_filter(text)
    for filter_text in (text, canonical):
        got = compile_filter(filter_text)(columns, valid)
        assert set(np.flatnonzero(got).tolist()) == expected, filter_text
