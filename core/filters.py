"""Feature filters: SQL boolean expressions over a source's columns.

A filter such as ``readtime > 0 AND article IN (1, 2, 3)`` selects the events a
feature aggregates. It is parsed with sqlglot (the Tally dialect,
:mod:`tally.core.dialect`), never with regular expressions or ``eval``, and

* normalised to a canonical text (:func:`normalize_filter`: sqlglot's
  formatting, redundant parentheses removed, needed ones restored), so equal
  filters hash equally;
* checked against a source schema (:func:`check_filter`: known columns,
  compatible types, a boolean result);
* compiled to a numpy-vectorised evaluator (:func:`compile_filter`) that walks
  the AST once, at compile time, into a tree of closures.

The grammar (anything else is refused, naming the construct)::

    predicate  := predicate OR predicate | predicate AND predicate | NOT predicate
                | operand (= | <> | != | < | <= | > | >=) operand
                | operand [NOT] IN (literal, ...)
                | operand [NOT] BETWEEN operand AND operand
                | operand IS [NOT] NULL | operand IS [NOT] TRUE | FALSE
                | bool column | TRUE | FALSE | ( predicate )
    operand    := operand (+ | - | * | / | %) operand | - operand | column | literal
                | ( operand )
    literal    := number | 'string' | TRUE | FALSE | NULL

Column names are case-sensitive, as in the source's schema. Nulls follow SQL's
three-valued logic: a comparison with a null is unknown,
``unknown AND false`` is false, ``unknown OR true`` is true, and an event is
selected only when the filter is true. Division (``/``) is true division; a
division or modulo by zero is null.
"""
import difflib

import numpy as np
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from tally.core.dialect import Tally, format_parse_error, needs_quotes
from tally.core.errors import FilterError

SUPPORTED = ("comparisons (= <> < <= > >=), AND, OR, NOT, IN (...), BETWEEN, IS [NOT] NULL "
             "and arithmetic (+ - * / %) over columns and literals")

_TYPE_OF_FIELD = {"int64": "number", "float64": "number", "bool": "bool", "string": "string"}


# --------------------------------------------------------------------------
# Parsing and canonical text

def parse_filter(text) -> exp.Expression:
    """The sqlglot AST of a filter (refuses anything but one expression)."""
    if not isinstance(text, str) or not text.strip():
        raise FilterError("the filter is empty; write a SQL boolean expression such as "
                          "'readtime > 0'")
    try:
        statements = Tally().parse(text)
    except (ParseError, TokenError) as error:
        raise FilterError(f"syntax error: {format_parse_error(error)}; write a SQL boolean "
                          "expression such as 'readtime > 0'") from None
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        raise FilterError("write one expression (no ';'), e.g. 'readtime > 0'")
    node = statements[0]
    _check_nodes(node)
    return node


# Binding strength, loosest first; used to drop redundant parentheses and to
# restore the needed ones.
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)
_PRECEDENCE = [((exp.Or,), 1), ((exp.And,), 2), ((exp.Not,), 3),
               (_COMPARISONS + (exp.Is, exp.In, exp.Between), 4),
               ((exp.Add, exp.Sub), 5), ((exp.Mul, exp.Div, exp.Mod), 6), ((exp.Neg,), 7)]


def _precedence(node):
    for classes, level in _PRECEDENCE:
        if isinstance(node, classes):
            return level
    return 10


def canonical_sql(node) -> str:
    """The canonical text of a filter AST: sqlglot formatting, with exactly the
    parentheses the precedence needs and identifiers quoted only when needed."""
    node = _reparenthesize(_strip_parens(node.copy()))
    for identifier in node.find_all(exp.Identifier):
        identifier.set("quoted", needs_quotes(identifier.name))
    return node.sql(dialect=Tally)


def normalize_filter(text) -> str:
    """Canonical text of a filter: ``'readtime>0  and (x=1)'`` -> ``'readtime > 0 AND x = 1'``."""
    return canonical_sql(parse_filter(text))


def filter_columns(text_or_node) -> frozenset:
    node = parse_filter(text_or_node) if isinstance(text_or_node, str) else text_or_node
    return frozenset(c.name for c in node.find_all(exp.Column))


def _map_children(node, rewrite):
    """Replace each child expression of ``node`` (also in lists) by ``rewrite(child)``."""
    for key, value in list(node.args.items()):
        if isinstance(value, exp.Expression):
            node.set(key, rewrite(value))
        elif isinstance(value, list):
            node.set(key, [rewrite(v) if isinstance(v, exp.Expression) else v for v in value])


def _strip_parens(node):
    while isinstance(node, exp.Paren):
        node = node.this
    _map_children(node, _strip_parens)
    return node


def _reparenthesize(node):
    _map_children(node, _reparenthesize)
    level = _precedence(node)
    if isinstance(node, (exp.And, exp.Or)):
        # associative: only a looser operand needs parentheses
        _wrap_if(node, "this", lambda child: _precedence(child) < level)
        _wrap_if(node, "expression", lambda child: _precedence(child) < level)
    elif isinstance(node, exp.Binary):
        # left-associative and non-associative operators
        _wrap_if(node, "this", lambda child: _precedence(child) < level
                 or (_precedence(child) == level and level == 4))
        _wrap_if(node, "expression", lambda child: _precedence(child) <= level)
    elif isinstance(node, (exp.Not, exp.Neg)):
        _wrap_if(node, "this", lambda child: _precedence(child) < level)
    elif isinstance(node, (exp.Is, exp.In, exp.Between)):
        for key in ("this", "low", "high"):
            _wrap_if(node, key, lambda child: _precedence(child) <= 4)
    return node


def _wrap_if(node, key, predicate):
    child = node.args.get(key)
    if isinstance(child, exp.Expression) and predicate(child):
        node.set(key, exp.Paren(this=child))


# --------------------------------------------------------------------------
# The allowed constructs

_ALLOWED = (exp.And, exp.Or, exp.Not, exp.Paren, exp.Column, exp.Identifier, exp.Literal,
            exp.Boolean, exp.Null, exp.In, exp.Between, exp.Is, exp.Neg, exp.Add, exp.Sub,
            exp.Mul, exp.Div, exp.Mod) + _COMPARISONS

_NAMES = {exp.Like: "LIKE", exp.ILike: "ILIKE", exp.Select: "a SELECT", exp.Subquery: "a subquery",
          exp.Case: "CASE", exp.Cast: "CAST", exp.Star: "*", exp.Exists: "EXISTS",
          exp.Window: "a window function (OVER)", exp.Interval: "INTERVAL",
          exp.NullSafeEQ: "IS NOT DISTINCT FROM", exp.NullSafeNEQ: "IS DISTINCT FROM",
          exp.DPipe: "|| (string concatenation)", exp.Placeholder: "a placeholder",
          exp.Tuple: "a tuple", exp.Array: "an array"}


def describe_construct(node):
    """A human name for a construct: 'LIKE', 'function LOWER()', 'a subquery'."""
    for cls, name in _NAMES.items():
        if type(node) is cls:
            return name
    if isinstance(node, exp.AggFunc):
        return f"aggregate {node.sql_name()}()"
    if isinstance(node, exp.Func):
        name = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
        return f"function {name.upper()}()"
    return type(node).__name__.upper()


def _check_nodes(root):
    for node in root.walk():
        if not isinstance(node, _ALLOWED):
            raise FilterError(f"{describe_construct(node)} is not supported in filters; "
                              f"use {SUPPORTED}")
        if isinstance(node, exp.Column) and (node.table or not isinstance(node.this,
                                                                         exp.Identifier)):
            raise FilterError(f"column {node.sql()!r} has a table prefix; write the bare "
                              f"column name {node.name!r}")
        if isinstance(node, exp.In):
            if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
                raise FilterError("IN over a subquery is not supported in filters; list the "
                                  "values: x IN (1, 2, 3)")
            for item in node.expressions:
                if not isinstance(item, (exp.Literal, exp.Boolean, exp.Null, exp.Neg)):
                    raise FilterError(f"IN lists literal values only (found {item.sql()!r}); "
                                      "write x IN (1, 2, 3) or x IN ('a', 'b')")
        if isinstance(node, exp.Is) and not isinstance(node.expression,
                                                       (exp.Null, exp.Boolean)):
            raise FilterError("IS compares with NULL, TRUE or FALSE only; write x IS NULL, "
                              "x IS NOT NULL or flag IS TRUE")


# --------------------------------------------------------------------------
# Type checking against a schema

def check_filter(text, schema):
    """Check that the filter's columns are in ``schema`` ((name, type) pairs or a
    dict) and that its types fit; raises :class:`FilterError`."""
    node = parse_filter(text) if isinstance(text, str) else text
    types = dict(schema.items() if isinstance(schema, dict) else schema)
    result = _type(node, types)
    if result not in ("bool", "null"):
        raise FilterError(f"the filter is a {result}, not a condition; compare it, e.g. "
                          f"'{node.sql()} > 0'")


def _literal_type(node):
    if isinstance(node, exp.Literal):
        return "string" if node.is_string else "number"
    if isinstance(node, exp.Boolean):
        return "bool"
    return "null"


def _type(node, types):
    if isinstance(node, exp.Paren):
        return _type(node.this, types)
    if isinstance(node, exp.Column):
        name = node.name
        if name not in types:
            close = difflib.get_close_matches(name, list(types), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise FilterError(f"column {name!r} is not a field of the source; {hint}use "
                              f"one of {', '.join(types)}")
        return _TYPE_OF_FIELD[types[name]]
    if isinstance(node, (exp.Literal, exp.Boolean, exp.Null)):
        return _literal_type(node)
    if isinstance(node, (exp.And, exp.Or)):
        for side in (node.this, node.expression):
            _expect(side, _type(side, types), "bool", node.key.upper())
        return "bool"
    if isinstance(node, exp.Not):
        _expect(node.this, _type(node.this, types), "bool", "NOT")
        return "bool"
    if isinstance(node, exp.Neg):
        _expect(node.this, _type(node.this, types), "number", "unary -")
        return "number"
    if isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod)):
        for side in (node.this, node.expression):
            _expect(side, _type(side, types), "number", "arithmetic")
        return "number"
    if isinstance(node, _COMPARISONS):
        _compatible(node, [node.this, node.expression], types)
        return "bool"
    if isinstance(node, exp.In):
        _compatible(node, [node.this] + list(node.expressions), types)
        return "bool"
    if isinstance(node, exp.Between):
        _compatible(node, [node.this, node.args["low"], node.args["high"]], types)
        return "bool"
    if isinstance(node, exp.Is):
        kind = _type(node.this, types)
        if isinstance(node.expression, exp.Boolean):
            _expect(node.this, kind, "bool", "IS TRUE/FALSE")
        return "bool"
    raise FilterError(f"{describe_construct(node)} is not supported in filters; "
                      f"use {SUPPORTED}")


def _expect(node, actual, wanted, where):
    if actual not in (wanted, "null"):
        raise FilterError(f"{where} needs a {'condition' if wanted == 'bool' else wanted}, "
                          f"but {node.sql()!r} is a {actual}")


def _compatible(node, operands, types):
    kinds = {(_type(o, types), o.sql()) for o in operands}
    real = {k for k, _ in kinds if k != "null"}
    if len(real) > 1:
        shown = ", ".join(f"{text!r} is a {kind}" for kind, text in sorted(kinds))
        raise FilterError(f"{node.sql()!r} compares values of different types ({shown}); "
                          "compare numbers with numbers, strings with quoted strings "
                          "('...') and bools with TRUE/FALSE")


# --------------------------------------------------------------------------
# Compilation to numpy

class CompiledFilter:
    """``f(columns, valid=None) -> np.ndarray[bool]``: which events pass.

    ``columns`` maps column names to equally long numpy arrays (as decoded by
    ``tally.core.decode``); ``valid`` optionally maps names to boolean arrays,
    False where the value is null. Without ``valid``, NaN (float) and None
    (object) values are nulls."""

    def __init__(self, text, schema=None):
        node = parse_filter(text)
        if schema is not None:
            check_filter(node, schema)
        self.text = canonical_sql(node)
        self.columns = filter_columns(node)
        self._evaluate = _compile(node)

    def __call__(self, columns, valid=None):
        n = _length(columns, self.columns)
        missing = self.columns - set(columns)
        if missing:
            raise KeyError(f"filter {self.text!r} needs the columns {sorted(missing)}")
        values, nulls = self._evaluate(_Context(columns, valid or {}, n))
        values = np.broadcast_to(np.asarray(values, dtype=bool), (n,))
        if nulls is not None:
            values = values & ~np.broadcast_to(nulls, (n,))
        return np.array(values, dtype=bool)

    def __repr__(self):
        return f"CompiledFilter({self.text!r})"


def compile_filter(text, schema=None) -> CompiledFilter:
    """Compile a filter to a vectorised evaluator ``f(columns[, valid]) -> bool array``.

    With ``schema`` ((name, type) pairs, e.g. ``Source.schema``) the filter is
    type-checked first."""
    return CompiledFilter(text, schema)


class _Context:
    __slots__ = ("columns", "valid", "n")

    def __init__(self, columns, valid, n):
        self.columns, self.valid, self.n = columns, valid, n


def _length(columns, needed):
    for name in needed:
        if name in columns:
            return len(columns[name])
    for values in columns.values():
        return len(values)
    return 0


def _or_nulls(*masks):
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    result = masks[0]
    for mask in masks[1:]:
        result = result | mask
    return result


def _literal_value(node):
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        text = node.this
        try:
            return int(text)
        except ValueError:
            return float(text)
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    return None


def _compile(node):
    """node -> f(ctx) -> (values, nulls or None); values may be scalars."""
    if isinstance(node, exp.Paren):
        return _compile(node.this)
    if isinstance(node, exp.Column):
        return _compile_column(node.name)
    if isinstance(node, exp.Null):
        return lambda ctx: (0, True)      # a placeholder value, always masked
    if isinstance(node, (exp.Literal, exp.Boolean)):
        value = _literal_value(node)
        return lambda ctx: (value, None)
    if isinstance(node, exp.Neg):
        inner = _compile(node.this)

        def neg(ctx):
            values, nulls = inner(ctx)
            return np.negative(_as_number(values)), nulls
        return neg
    if isinstance(node, exp.Not):
        inner = _compile(node.this)

        def negate(ctx):
            values, nulls = inner(ctx)
            return np.logical_not(values), nulls
        return negate
    if isinstance(node, (exp.And, exp.Or)):
        return _compile_logic(node)
    if isinstance(node, _COMPARISONS):
        return _compile_comparison(type(node), _compile(node.this), _compile(node.expression))
    if isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod)):
        return _compile_arithmetic(type(node), _compile(node.this), _compile(node.expression))
    if isinstance(node, exp.Between):
        low = _compile_comparison(exp.GTE, _compile(node.this), _compile(node.args["low"]))
        high = _compile_comparison(exp.LTE, _compile(node.this), _compile(node.args["high"]))
        return _kleene_and(low, high)
    if isinstance(node, exp.In):
        return _compile_in(node)
    if isinstance(node, exp.Is):
        return _compile_is(node)
    raise FilterError(f"{describe_construct(node)} is not supported in filters; "
                      f"use {SUPPORTED}")


def _compile_column(name):
    def column(ctx):
        values = ctx.columns[name]
        valid = ctx.valid.get(name)
        if valid is not None:
            nulls = ~np.asarray(valid, dtype=bool)
        elif values.dtype.kind == "f":
            nulls = np.isnan(values)
        elif values.dtype.kind == "O":
            nulls = np.equal(values, None)
        else:
            nulls = None
        if nulls is not None and values.dtype.kind == "O" and nulls.any():
            values = np.where(nulls, "", values)     # comparable placeholder, masked
        return values, nulls
    return column


def _compile_logic(node):
    left, right = _compile(node.this), _compile(node.expression)
    return _kleene_and(left, right) if isinstance(node, exp.And) else _kleene_or(left, right)


def _truth(values, nulls):
    """(definitely true, definitely false) masks."""
    values = np.asarray(values, dtype=bool)
    if nulls is None:
        return values, ~values
    return values & ~nulls, ~values & ~nulls


def _kleene_and(left, right):
    def evaluate(ctx):
        lt, lf = _truth(*left(ctx))
        rt, rf = _truth(*right(ctx))
        true, false = lt & rt, lf | rf
        return true, ~(true | false)
    return evaluate


def _kleene_or(left, right):
    def evaluate(ctx):
        lt, lf = _truth(*left(ctx))
        rt, rf = _truth(*right(ctx))
        true, false = lt | rt, lf & rf
        return true, ~(true | false)
    return evaluate


_NUMPY_COMPARE = {exp.EQ: np.equal, exp.NEQ: np.not_equal, exp.GT: np.greater,
                  exp.GTE: np.greater_equal, exp.LT: np.less, exp.LTE: np.less_equal}


def _compile_comparison(cls, left, right):
    compare = _NUMPY_COMPARE[cls]

    def evaluate(ctx):
        lv, ln = left(ctx)
        rv, rn = right(ctx)
        with np.errstate(invalid="ignore"):
            return compare(lv, rv), _or_nulls(ln, rn)
    return evaluate


def _compile_arithmetic(cls, left, right):
    def evaluate(ctx):
        lv, ln = left(ctx)
        rv, rn = right(ctx)
        lv, rv = _as_number(lv), _as_number(rv)
        nulls = _or_nulls(ln, rn)
        with np.errstate(all="ignore"):
            if cls is exp.Add:
                return np.add(lv, rv), nulls
            if cls is exp.Sub:
                return np.subtract(lv, rv), nulls
            if cls is exp.Mul:
                return np.multiply(lv, rv), nulls
            zero = np.equal(rv, 0)
            nulls = _or_nulls(nulls, zero)
            safe = np.where(zero, 1, rv)
            if cls is exp.Div:
                return np.true_divide(lv, safe), nulls
            return np.mod(lv, safe), nulls
    return evaluate


def _as_number(values):
    """Booleans take part in arithmetic as 0/1 (numpy refuses bool - bool)."""
    if isinstance(values, (bool, np.bool_)):
        return int(values)
    if isinstance(values, np.ndarray) and values.dtype == bool:
        return values.astype(np.int64)
    return values


def _compile_in(node):
    this = _compile(node.this)
    values = [_literal_value(v.this) * -1 if isinstance(v, exp.Neg) else _literal_value(v)
              for v in node.expressions]
    has_null = any(v is None for v in values)
    values = [v for v in values if v is not None]
    strings = any(isinstance(v, str) for v in values)

    def evaluate(ctx):
        column, nulls = this(ctx)
        column = np.asarray(column)
        if not values:
            matched = np.zeros(column.shape, dtype=bool)
        elif strings or column.dtype.kind == "O":
            wanted = set(values)
            matched = np.fromiter((v in wanted for v in column.ravel()), dtype=bool,
                                  count=column.size).reshape(column.shape)
        else:
            matched = np.isin(column, np.asarray(values))
        if has_null:
            nulls = _or_nulls(nulls, ~matched)
        return matched, nulls
    return evaluate


def _compile_is(node):
    this = _compile(node.this)
    target = node.expression

    def evaluate(ctx):
        values, nulls = this(ctx)
        if isinstance(target, exp.Null):
            if nulls is None:
                return False, None
            return np.asarray(nulls, dtype=bool), None
        wanted = bool(target.this)
        result = np.equal(np.asarray(values, dtype=bool), wanted)
        if nulls is not None:
            result = result & ~nulls
        return result, None
    return evaluate

