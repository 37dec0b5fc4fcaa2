"""The aggregations: everything Tally knows about each one, in one table.

Per aggregation: whether it takes a column and of which types, its integer
parameter (``n`` of last_n, ``k`` of top_k) and that parameter's bound, the
type its value has online (in the record) and in a training set (Arrow), and
the names SQL calls it by (the first is the one Tally writes). Definitions
validate against this table, the SQL dialect parses and writes with it, the
online record and training sets take their types from it; the compiled
kernels behind each aggregation are chosen by ``tally.core.arena.make_arena``.

The arenas hold float64 values, so every aggregated column is numeric for
now; string columns need the view state to hash (and, for top_k, to map
back) strings first: then add "string" to ``column_types``.
"""
from dataclasses import dataclass

from tally.core.types import NUMERIC_TYPES


@dataclass(frozen=True)
class Aggregation:
    name: str
    takes_column: bool
    column_types: tuple = ()
    param: str = None          # "n" or "k": the integer parameter it requires
    max_param: int = None
    online_type: str = "float64"   # "int64" | "float64" | "list" (not in record layout 1)
    training_type: str = "float64"  # see arrow_type()
    sql_names: tuple = ()
    summary: str = ""

    def sql_call(self, column="col"):
        """How SQL writes a call: 'SUM(col)', 'LAST_N(col, n)'."""
        args = column if self.takes_column else "*"
        return f"{self.sql_names[0]}({args}{', ' + self.param if self.param else ''})"


AGGREGATIONS = {a.name: a for a in (
    Aggregation("count", False, online_type="int64", training_type="int64",
                sql_names=("COUNT",), summary="number of events"),
    Aggregation("sum", True, NUMERIC_TYPES, sql_names=("SUM",), summary="sum of the column"),
    Aggregation("mean", True, NUMERIC_TYPES, sql_names=("AVG", "MEAN"),
                summary="arithmetic mean of the column"),
    Aggregation("min", True, NUMERIC_TYPES, sql_names=("MIN",), summary="smallest value"),
    Aggregation("max", True, NUMERIC_TYPES, sql_names=("MAX",), summary="largest value"),
    Aggregation("first", True, NUMERIC_TYPES, sql_names=("FIRST",),
                summary="value of the earliest event"),
    Aggregation("last", True, NUMERIC_TYPES, sql_names=("LAST",),
                summary="value of the latest event"),
    Aggregation("last_n", True, NUMERIC_TYPES, "n", 4096, online_type="list",
                training_type="list<float64>", sql_names=("LAST_N",),
                summary="the n latest values, newest first"),
    Aggregation("distinct_count", True, NUMERIC_TYPES, online_type="int64",
                training_type="int64", sql_names=("APPROX_COUNT_DISTINCT", "DISTINCT_COUNT"),
                summary="approximate number of distinct values (HyperLogLog)"),
    Aggregation("top_k", True, NUMERIC_TYPES, "k", 1024, online_type="list",
                training_type="list<struct<value: float64, count: int64>>",
                sql_names=("APPROX_TOP_K", "TOP_K"),
                summary="approximate k most frequent values (Misra-Gries)"),
)}

# SQL function name -> aggregation, for the names sqlglot parses as plain
# (anonymous) functions
SQL_NAMES = {name: a.name for a in AGGREGATIONS.values() for name in a.sql_names}


def arrow_type(aggregation):
    """The Arrow type of an aggregation's values in a training set."""
    import pyarrow as pa          # only training sets need it: keep definitions light
    kind = AGGREGATIONS[aggregation].training_type
    if kind == "int64":
        return pa.int64()
    if kind == "list<float64>":
        return pa.list_(pa.float64())
    if kind.startswith("list<struct"):
        return pa.list_(pa.struct([("value", pa.float64()), ("count", pa.int64())]))
    return pa.float64()


def value_type(aggregation, column_type=None):
    """The type of an aggregation's values over a column of ``column_type``
    (one of ``VALUE_TYPES``): the same online and in training sets. Counts
    are int64; sums, means, minima and maxima float64; first, last and the
    items of last_n and top_k keep an int64 or string column's type."""
    kind = AGGREGATIONS[aggregation]
    if kind.name in ("count", "distinct_count"):
        return "int64"
    item = column_type if column_type in ("int64", "string") else "float64"
    if kind.name in ("first", "last"):
        return item
    if kind.name == "last_n":
        return f"list<{item}>"
    if kind.name == "top_k":
        return f"top_k<{item}>"
    return "float64"
