"""Expressions over feature values: derived features and request-time features.

One small, typed, vectorised language computes a value from other values of
the same row -- a view's features (``FeatureView.derived``: e.g.
``ENTROPY(categories)``, ``total_readtime / reads``) or a feature service's
columns and request fields (``FeatureService`` computed columns: e.g.
``article_info.category = user_taste.top_category``). The same compiled
expression runs online (records, lookups) and offline (training sets) on the
same representation of values, so both give the same value.

Values are columns: int64 and float64 numpy arrays (with a validity mask),
object arrays of ``str``, of lists (``list<T>``) and of lists of ``(value,
count)`` pairs (``top_k<T>``, also a histogram's), None for a null.

The language (SQL syntax, parsed by sqlglot)::

    literals      1, 2.5, 'sports'
    names         feature  |  view.feature  |  request.field
    arithmetic    a + b, a - b, a * b, a / b     (x / 0 is null)
    comparisons   =, <>, <, <=, >, >=            (1 or 0, an int64)
    logic         AND, OR, NOT                   (over 1/0)
    functions     ENTROPY(pairs)      Shannon entropy in bits of the counts
                  TOP_VALUE(pairs)    the most frequent value
                  SIZE(list|pairs)    the number of items
                  CONTAINS(list|pairs, x)  1 if x is an item (a pair's value)
                  COALESCE(a, b, ...) the first non-null
                  ABS(x), LN(x)

A null input gives a null result (COALESCE aside; ``x = null`` is null).
Types are checked when the expression is defined: a refused expression names
the construct and the fix.
"""
import math

import numpy as np
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from tally.core.errors import DefinitionError

NUMBERS = ("int64", "float64")
_ARITHMETIC = {exp.Add: np.add, exp.Sub: np.subtract, exp.Mul: np.multiply}
_COMPARISONS = {exp.EQ: "eq", exp.NEQ: "ne", exp.LT: "lt", exp.LTE: "le", exp.GT: "gt",
                exp.GTE: "ge"}
_OPS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
        "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b}


class ExpressionError(DefinitionError):
    """An expression outside the language, or of mismatched types."""


def parse_expression(text):
    import sqlglot

    from tally.core.dialect import Tally
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("the expression is empty; write one, e.g. 'total / reads'")
    try:
        return sqlglot.parse_one(text, dialect=Tally)
    except (ParseError, TokenError) as error:
        raise ExpressionError(f"{text!r} does not parse: {str(error).splitlines()[0]}") \
            from None


def referenced(text):
    """The names an expression reads (``view.feature`` qualified)."""
    return sorted({_name(c) for c in parse_expression(text).find_all(exp.Column)})


def _name(column):
    return f"{column.table}.{column.name}" if column.table else column.name


class Expression:
    """A compiled expression: ``type`` is its value type; calling it on
    ``{name: (values, valid)}`` gives ``(values, valid)``."""

    def __init__(self, text, types):
        """``types``: {name: value type} of the names it may read."""
        self.text = text
        self.node = parse_expression(text)
        # each column node's name, found once: sqlglot's name accessors cost
        # microseconds, and a lookup server evaluates on every request
        self._names = {id(c): _name(c) for c in self.node.find_all(exp.Column)}
        self.types = types
        self.type = self._type(self.node)
        self.names = referenced(text)

    def __call__(self, columns, n):
        values, valid = self._eval(self.node, columns, n)
        return _typed(values, valid, self.type)

    # -- types -------------------------------------------------------------

    def _type(self, node):
        if isinstance(node, exp.Paren):
            return self._type(node.this)
        if isinstance(node, exp.Column):
            name = self._names[id(node)]
            if name not in self.types:
                import difflib
                close = difflib.get_close_matches(name, list(self.types), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ExpressionError(f"{self.text!r}: {name!r} is not a value it can read; "
                                      f"{hint}use one of {', '.join(sorted(self.types))}")
            return self.types[name]
        if isinstance(node, exp.Literal):
            if node.is_string:
                return "string"
            return "int64" if node.this.lstrip("-").isdigit() else "float64"
        if isinstance(node, exp.Neg):
            return self._numeric(node.this, "-x")
        if type(node) in _ARITHMETIC or isinstance(node, exp.Div):
            left, right = self._numeric(node.this, node.sql()), \
                self._numeric(node.expression, node.sql())
            if isinstance(node, exp.Div) or "float64" in (left, right):
                return "float64"
            return "int64"
        if type(node) in _COMPARISONS:
            left, right = self._type(node.this), self._type(node.expression)
            if not (left == right or {left, right} <= set(NUMBERS)):
                raise ExpressionError(f"{self.text!r}: {node.sql()} compares {left} with "
                                      f"{right}; compare values of one type")
            if left not in NUMBERS + ("string",):
                raise ExpressionError(f"{self.text!r}: {node.sql()} compares {left} values; "
                                      "compare numbers or strings (SIZE, TOP_VALUE, "
                                      "CONTAINS read lists)")
            return "int64"
        if isinstance(node, (exp.And, exp.Or)):
            self._numeric(node.this, node.sql())
            self._numeric(node.expression, node.sql())
            return "int64"
        if isinstance(node, exp.Not):
            self._numeric(node.this, node.sql())
            return "int64"
        return self._function_type(node)

    def _numeric(self, node, where):
        kind = self._type(node)
        if kind not in NUMBERS:
            raise ExpressionError(f"{self.text!r}: {where} needs numbers, but "
                                  f"{node.sql()} is {kind}")
        return kind

    def _function_type(self, node):
        name, args = _call(node)
        if name is None:
            raise ExpressionError(f"{self.text!r}: {node.sql()} is outside the expression "
                                  "language; use arithmetic, comparisons, AND/OR/NOT and "
                                  "ENTROPY, TOP_VALUE, SIZE, CONTAINS, COALESCE, ABS, LN")
        kinds = [self._type(a) for a in args]
        arity = {"ENTROPY": 1, "TOP_VALUE": 1, "SIZE": 1, "CONTAINS": 2, "ABS": 1, "LN": 1}
        if name in arity and len(args) != arity[name]:
            raise ExpressionError(f"{self.text!r}: {name} takes {arity[name]} argument"
                                  f"{'s' if arity[name] > 1 else ''}")
        if name in ("ENTROPY", "TOP_VALUE"):
            if not kinds[0].startswith("top_k<"):
                raise ExpressionError(f"{self.text!r}: {name} reads (value, count) pairs "
                                      f"(a HISTOGRAM or TOP_K feature), not {kinds[0]}")
            return "float64" if name == "ENTROPY" else kinds[0][6:-1]
        if name == "SIZE":
            if not kinds[0].startswith(("list<", "top_k<")):
                raise ExpressionError(f"{self.text!r}: SIZE reads a list, not {kinds[0]}")
            return "int64"
        if name == "CONTAINS":
            item = kinds[0][kinds[0].index("<") + 1:-1] if "<" in kinds[0] else None
            if item is None or not (item == kinds[1] or {item, kinds[1]} <= set(NUMBERS)):
                raise ExpressionError(f"{self.text!r}: CONTAINS looks for a {kinds[1]} in "
                                      f"{kinds[0]}; look for a value of the list's item type")
            return "int64"
        if name == "COALESCE":
            if not args or len(set(kinds)) > 1 and not set(kinds) <= set(NUMBERS):
                raise ExpressionError(f"{self.text!r}: COALESCE takes values of one type")
            return "float64" if len(set(kinds)) > 1 else kinds[0]
        if name in ("ABS", "LN"):
            self._numeric(args[0], name)
            return "float64" if name == "LN" else kinds[0]
        raise AssertionError(name)

    # -- evaluation ----------------------------------------------------------

    def _eval(self, node, columns, n):
        if isinstance(node, exp.Paren):
            return self._eval(node.this, columns, n)
        if isinstance(node, exp.Column):
            values, valid = columns[self._names[id(node)]]
            return values, np.asarray(valid, bool)
        if isinstance(node, exp.Literal):
            kind = self._type(node)
            value = node.this if kind == "string" else \
                (int(node.this) if kind == "int64" else float(node.this))
            return np.full(n, value, dtype=object if kind == "string" else None), \
                np.ones(n, bool)
        if isinstance(node, exp.Neg):
            values, valid = self._eval(node.this, columns, n)
            return -_numbers(values, valid), valid
        if type(node) in _ARITHMETIC or isinstance(node, exp.Div):
            (a, va), (b, vb) = self._eval(node.this, columns, n), \
                self._eval(node.expression, columns, n)
            valid = va & vb
            a, b = _numbers(a, valid), _numbers(b, valid)
            if isinstance(node, exp.Div):
                valid = valid & (b != 0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    return np.where(valid, a / np.where(b == 0, 1, b), np.nan), valid
            return _ARITHMETIC[type(node)](a, b), valid
        if type(node) in _COMPARISONS:
            (a, va), (b, vb) = self._eval(node.this, columns, n), \
                self._eval(node.expression, columns, n)
            valid = va & vb
            op = _OPS[_COMPARISONS[type(node)]]
            if a.dtype == object or b.dtype == object:      # strings (types checked)
                out = op(np.where(valid, a, ""), np.where(valid, b, "")).astype(bool)
            else:
                out = op(_numbers(a, valid), _numbers(b, valid))
            return out.astype(np.int64), valid
        if isinstance(node, (exp.And, exp.Or)):
            (a, va), (b, vb) = self._eval(node.this, columns, n), \
                self._eval(node.expression, columns, n)
            a, b = _numbers(a, va) != 0, _numbers(b, vb) != 0
            if isinstance(node, exp.And):   # false wins over null, as in SQL
                valid = (va & vb) | (va & ~a) | (vb & ~b)
                return (a & b & va & vb).astype(np.int64), valid
            valid = (va & vb) | (va & a) | (vb & b)
            return ((a & va) | (b & vb)).astype(np.int64), valid
        if isinstance(node, exp.Not):
            values, valid = self._eval(node.this, columns, n)
            return (_numbers(values, valid) == 0).astype(np.int64), valid
        return self._call(node, columns, n)

    def _call(self, node, columns, n):
        name, args = _call(node)
        evaluated = [self._eval(a, columns, n) for a in args]
        if name == "COALESCE":
            values, valid = evaluated[0]
            values = values.astype(object) if values.dtype == object else \
                values.astype(np.float64 if self.type == "float64" else values.dtype)
            valid = valid.copy()
            for more, more_valid in evaluated[1:]:
                take = ~valid & more_valid
                values[take] = more[take]
                valid |= more_valid
            return values, valid
        values, valid = evaluated[0]
        if name == "ABS":
            return np.abs(_numbers(values, valid)), valid
        if name == "LN":
            x = _numbers(values, valid).astype(np.float64)
            valid = valid & (x > 0)
            return np.log(np.where(valid, x, 1.0)), valid
        if name == "CONTAINS":
            needle, needle_valid = evaluated[1]
            pairs = self._type(args[0]).startswith("top_k<")
            out = np.zeros(n, np.int64)
            valid = valid & needle_valid
            needles = needle.tolist()           # Python values: a list holds Python ints
            for i in np.flatnonzero(valid).tolist():
                items = values[i]
                items = [p[0] for p in items] if pairs else items
                out[i] = needles[i] in items
            return out, valid
        out = np.empty(n, dtype=object if name == "TOP_VALUE" else
                       (np.float64 if name == "ENTROPY" else np.int64))
        if name == "SIZE":
            out[:] = 0
        ok = valid.copy()
        for i in range(n):
            items = values[i] if valid[i] else None
            if name == "SIZE":
                out[i] = len(items) if items is not None else 0
            elif name == "ENTROPY":
                out[i] = entropy([c for _, c in items]) if items else np.nan
                ok[i] = bool(items)
            else:                                       # TOP_VALUE
                out[i] = items[0][0] if items else None
                ok[i] = bool(items)
        return out, ok


def entropy(counts):
    """Shannon entropy in bits of a distribution given by its counts."""
    total = float(sum(counts))
    return -sum((c / total) * math.log2(c / total) for c in counts if c > 0) + 0.0


def _call(node):
    """``(NAME, args)`` of a function call of the language, else (None, ())."""
    if isinstance(node, exp.Anonymous):
        name, args = node.name.upper(), list(node.expressions)
    elif isinstance(node, exp.Coalesce):
        name, args = "COALESCE", [node.this] + list(node.expressions)
    elif isinstance(node, exp.Abs):
        name, args = "ABS", [node.this]
    elif isinstance(node, exp.Ln):
        name, args = "LN", [node.this]
    elif isinstance(node, (exp.Contains, exp.ArrayContains)):
        name, args = "CONTAINS", [node.this, node.expression]
    else:
        return None, ()
    if name not in ("ENTROPY", "TOP_VALUE", "SIZE", "CONTAINS", "COALESCE", "ABS", "LN"):
        return None, ()
    return name, args


def _numbers(values, valid):
    """A numeric column with nulls as 0 (their results are masked anyway)."""
    if values.dtype == object:
        return np.array([v if ok and v is not None else 0 for v, ok in zip(values, valid)],
                        dtype=np.float64)
    if values.dtype.kind == "f":
        return np.where(valid, values, 0.0)
    return values


def _typed(values, valid, kind):
    """A result in the representation of its value type."""
    if kind == "int64":
        return np.where(valid, values, 0).astype(np.int64), valid
    if kind == "float64":
        values = np.asarray(values, dtype=np.float64)
        valid = valid & ~np.isnan(values)
        return np.where(valid, values, np.nan), valid
    out = np.asarray(values, dtype=object).copy()
    out[~valid] = None
    return out, valid
