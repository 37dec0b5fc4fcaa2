"""The aggregations: everything Tally knows about each one, in one table.

Per aggregation: whether it takes a column and of which types, whether it
keeps the column's values (rather than computing with them), its integer
parameter (``n`` of last_n, ``k`` of top_k) and that parameter's bound, and
the names SQL calls it by (the first is the one Tally writes). Definitions
validate against this table, the SQL dialect parses and writes with it, the
online record and training sets take their types from it (``value_type``,
``arrow_type``); the compiled kernels behind each aggregation are chosen by
``tally.core.arena.make_arena``.

An aggregation that keeps values (first, last, last_n, top_k, and
distinct_count, which tells them apart) keeps an int64 column's values
exactly and takes string columns: the view state gives each string a 64-bit
code (``tally.core.strings``) and the arena keeps codes as it keeps int64s.
"""
from dataclasses import dataclass

from tally.core.types import FIELD_TYPES, NUMERIC_TYPES

# The column types whose values an aggregation that keeps values keeps as
# 64-bit integers (string: its code); other columns are folded as float64.
EXACT_TYPES = ("int64", "string")


@dataclass(frozen=True)
class Aggregation:
    name: str
    takes_column: bool
    column_types: tuple = ()
    keeps_values: bool = False
    param: str = None          # "n" or "k": the integer parameter it requires
    max_param: int = None
    sql_names: tuple = ()
    summary: str = ""
    default_param: int = None  # the parameter when none is given (else it is required)

    def sql_call(self, column="col"):
        """How SQL writes a call: 'SUM(col)', 'LAST_N(col, n)'."""
        args = column if self.takes_column else "*"
        return f"{self.sql_names[0]}({args}{', ' + self.param if self.param else ''})"


AGGREGATIONS = {a.name: a for a in (
    Aggregation("count", False, sql_names=("COUNT",), summary="number of events"),
    Aggregation("sum", True, NUMERIC_TYPES, sql_names=("SUM",), summary="sum of the column"),
    Aggregation("mean", True, NUMERIC_TYPES, sql_names=("AVG", "MEAN"),
                summary="arithmetic mean of the column"),
    Aggregation("min", True, NUMERIC_TYPES, sql_names=("MIN",), summary="smallest value"),
    Aggregation("max", True, NUMERIC_TYPES, sql_names=("MAX",), summary="largest value"),
    Aggregation("first", True, FIELD_TYPES, True, sql_names=("FIRST",),
                summary="value of the earliest event"),
    Aggregation("last", True, FIELD_TYPES, True, sql_names=("LAST",),
                summary="value of the latest event"),
    Aggregation("last_n", True, FIELD_TYPES, True, "n", 4096,
                sql_names=("LAST_N",), summary="the n latest values, newest first"),
    Aggregation("distinct_count", True, FIELD_TYPES, True,
                sql_names=("APPROX_COUNT_DISTINCT", "DISTINCT_COUNT"),
                summary="approximate number of distinct values (HyperLogLog)"),
    Aggregation("top_k", True, FIELD_TYPES, True, "k", 1024,
                sql_names=("APPROX_TOP_K", "TOP_K"),
                summary="approximate k most frequent values (Misra-Gries)"),
    Aggregation("histogram", True, FIELD_TYPES, True, "k", 1024, sql_names=("HISTOGRAM",),
                summary="count of each value, most frequent first: exact up to k "
                        "distinct values, approximate beyond (Misra-Gries)",
                default_param=32),
)}

# SQL function name -> aggregation, for the names sqlglot parses as plain
# (anonymous) functions
SQL_NAMES = {name: a.name for a in AGGREGATIONS.values() for name in a.sql_names}


def exact(aggregation, column_type):
    """Whether the arena of ``aggregation`` over a ``column_type`` column keeps
    64-bit integers (int64 values, string codes) instead of float64."""
    return AGGREGATIONS[aggregation].keeps_values and column_type in EXACT_TYPES


def value_type(aggregation, column_type=None):
    """The type of an aggregation's values over a column of ``column_type``
    (one of ``VALUE_TYPES``): the same online and in training sets. Counts
    are int64; sums, means, minima and maxima float64; first, last and the
    items of last_n and top_k keep an int64 or string column's type."""
    kind = AGGREGATIONS[aggregation]
    if kind.name in ("count", "distinct_count"):
        return "int64"
    item = column_type if exact(aggregation, column_type) else "float64"
    if kind.name in ("first", "last"):
        return item
    if kind.name == "last_n":
        return f"list<{item}>"
    if kind.name in ("top_k", "histogram"):       # (value, count) pairs
        return f"top_k<{item}>"
    return "float64"


def arrow_type(aggregation, column_type=None):
    """The Arrow type of an aggregation's values in a training set: its
    ``value_type`` (top_k<T> is a list of struct<value: T, count: int64>)."""
    return arrow_of(value_type(aggregation, column_type))


def arrow_of(kind):
    """The Arrow type a training set gives values of value type ``kind``
    (a derived feature's too)."""
    import pyarrow as pa          # only training sets need it: keep definitions light
    scalars = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}
    if kind.startswith("list<"):
        return pa.list_(scalars[kind[5:-1]])
    if kind.startswith("top_k<"):
        return pa.list_(pa.struct([("value", scalars[kind[6:-1]]), ("count", pa.int64())]))
    return scalars[kind]
