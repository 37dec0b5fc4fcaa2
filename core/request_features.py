"""Request-time features: a feature service's computed columns.

A feature service answers a row -- the request's entity keys, e.g. (user,
current article) -- with its features read from the store, then computes its
``computed`` columns from them and the request fields: "is the current
article in the user's top category" (``article_info.category =
user_taste.top_category``), "has the user read it" (``CONTAINS(
user_reading.recent_articles, request.article)``). Expressions are
``tally.core.expressions``; a :class:`~tally.core.definitions.RequestFunction`
is a vectorised Python function. The lookup server runs them on every
request, a training set on the spine's rows, through :func:`compute`: the
same code on the same representation of values, so a model trains on the
value it is served.

The names a computed column reads (:func:`service_types`): each feature as
``view.feature`` and by its column name, ``request.<entity>`` for each entity
key of the row, and ``request.<field>`` for the service's declared request
fields (given in the lookup request's row, or a spine column of that name).
"""
import hashlib
import importlib
import inspect

import numpy as np

from tally.core.errors import DefinitionError
from tally.core.expressions import Expression, ExpressionError


def service_types(service, types_of_view, key_types):
    """{name: value type} a computed column may read; ``types_of_view(view)``
    gives a view's {feature: value type}, ``key_types`` {entity: key type}."""
    types = {}
    for f in service.features:
        kind = types_of_view(f.view)[f.feature]
        types[f"{f.view}.{f.feature}"] = kind
        types[f.alias] = kind
    for entity, key_type in key_types.items():
        types[f"request.{entity}"] = key_type
    for name, kind in service.request:
        types[f"request.{name}"] = kind
    return types


def compiled_computed(service, views):
    """``[(entry, evaluator)]`` of the service's computed columns, checked
    against ``views`` ({name: FeatureView}); an evaluator has ``type``,
    ``names`` and ``(columns, n) -> (values, valid)``."""
    from tally.core.materialize import feature_types
    if not service.computed:
        return []
    key_types = {views[f.view].entity.name: views[f.view].entity.key_type
                 for f in service.features}
    types = service_types(service, lambda view: feature_types(views[view]), key_types)
    return compile_entries(service, types)


def compile_entries(service, types):
    where = f"feature service {service.name!r}"
    compiled = []
    for entry in service.computed:
        try:
            evaluator = Expression(entry.expression, types) if entry.kind == "expression" \
                else _Function(entry, types)
        except ExpressionError as error:
            raise DefinitionError(f"{where}, computed {entry.name!r}: {error}") from None
        compiled.append((entry, evaluator))
    return compiled


def compute(compiled, columns, n):
    """``columns`` ({name: (values, valid)}) with the computed columns added."""
    for entry, evaluator in compiled:
        columns[entry.name] = evaluator(columns, n)
    return columns


def request_columns(rows, names, types):
    """{``request.<name>``: (values, valid)} of request rows (dicts)."""
    columns = {}
    for name in names:
        kind = types[f"request.{name}"]
        raw = [row.get(name) for row in rows]
        valid = np.array([v is not None for v in raw], bool)
        if kind == "string":
            values = np.array(raw, dtype=object)
        else:
            values = np.array([v if v is not None else 0 for v in raw],
                              dtype=np.int64 if kind == "int64" else np.float64)
        columns[f"request.{name}"] = (values, valid)
    return columns


# --------------------------------------------------------------------------
# Python functions


def resolve_function(ref, where):
    module_name, _, attribute = ref.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise DefinitionError(f"{where}: function {ref!r} cannot be imported ({error}); name "
                              "it as 'package.module:function', importable where it runs") \
            from None
    if not callable(function):
        raise DefinitionError(f"{where}: {ref!r} is not a function")
    return function


def function_code(ref, name):
    """sha256 of a function's source: what a RequestFunction pins."""
    function = resolve_function(ref, f"computed {name!r}")
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        source = repr(getattr(function, "__code__", function))
    return hashlib.sha256(source.encode()).hexdigest()


class _Function:
    """A RequestFunction as an evaluator of :func:`compute`."""

    def __init__(self, entry, types):
        self.entry = entry
        self.type = entry.type
        self.names = list(entry.inputs)
        if self.type not in ("int64", "float64", "string"):
            raise ExpressionError(f"type {self.type!r}: a function returns int64, float64 "
                                  "or string")
        for name in self.names:
            if name not in types:
                raise ExpressionError(f"input {name!r} is not a value it can read; use one of "
                                      f"{', '.join(sorted(types))}")
        where = f"computed {entry.name!r}"
        self.function = resolve_function(entry.function, where)
        if function_code(entry.function, entry.name) != entry.code:
            raise ExpressionError(f"function {entry.function!r} is not the code the service "
                                  "was defined with (its source changed); apply the service "
                                  "again to make this code its new version")

    def __call__(self, columns, n):
        arrays = [_nulls_as_values(*columns[name]) for name in self.names]
        result = np.asarray(self.function(*arrays))
        if result.shape != (n,):
            raise ValueError(f"computed {self.entry.name!r}: {self.entry.function} returned "
                             f"shape {result.shape} for {n} rows")
        if self.type == "string":
            values = result.astype(object)
            return values, np.array([v is not None for v in values], bool)
        values = result.astype(np.float64)
        valid = ~np.isnan(values)
        if self.type == "int64":
            return np.where(valid, values, 0).astype(np.int64), valid
        return values, valid


def _nulls_as_values(values, valid):
    """What a function gets: NaN for a null number, None for a null object."""
    if values.dtype == object:
        out = values.copy()
        out[~valid] = None
        return out
    return np.where(valid, values.astype(np.float64), np.nan) if not valid.all() else values
