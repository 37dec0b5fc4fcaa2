"""From view state to online records: what the pipeline writes after each batch."""
import functools

import numpy as np

from tally.core.aggregations import value_type
from tally.core.errors import DefinitionError, RecordError
from tally.core.expressions import Expression
from tally.core.record import (ALIGN, FIXED_TYPES, INT64_MAX, INT64_MIN, MAX_RECORD_BYTES,
                               Records, ViewSchema)
from tally.core.view import EVENT_TIME


def online_schema(view, version=1) -> ViewSchema:
    """The schema of the view's online records: each feature with the type it
    has online and in training sets alike (``value_type``), derived ones last."""
    types = feature_types(view)
    return ViewSchema(view.name, version, view.entity.key_type,
                      tuple((name, types[name]) for name in view.feature_names))


def feature_types(view):
    """{feature name: value type}, derived features included."""
    inputs = view.input_source
    types = {f.name: value_type(f.aggregation, inputs.field_type(f.column))
             for f in view.features}
    for derived, expression in derived_expressions(view, types):
        types[derived.name] = expression.type
    return types


def derived_expressions(view, types=None):
    """[(Derived, compiled Expression)] of the view's derived features."""
    if not view.derived:
        return []
    if types is None:
        return _compiled(view)
    return [(d, Expression(d.expression, types)) for d in view.derived]


@functools.lru_cache(maxsize=256)
def _compiled(view):
    """Compiled once per view: records_for runs for every batch."""
    return derived_expressions(view, feature_types(view))


def with_derived(view, values, n, expressions=None):
    """``values`` ({feature: (values, valid)}) with the derived features added:
    one code computes them for records and for training rows."""
    for derived, expression in expressions if expressions is not None \
            else derived_expressions(view):
        values[derived.name] = expression(values, n)
    return values


def check_servable(view):
    """Refuse, with the reason, a view whose records the online store cannot
    hold: a feature name too long for the schema, or records that could
    exceed MAX_RECORD_BYTES with every list full. String bytes are not known
    before events arrive; a record they make too long is refused when written
    (and dead-lettered). Called by ``tally plan`` and ``tally apply``."""
    schema = online_schema(view)
    try:
        schema.to_bytes()
    except RecordError as error:
        raise DefinitionError(f"view {view.name!r} cannot be served online: {error}") from None
    params = {f.name: getattr(f, "param", None) for f in view.features + view.derived}
    sizes = {name: _largest_value(dtype, params[name]) for name, dtype in schema.features
             if dtype not in FIXED_TYPES}
    largest = schema.fixed_size + sum(sizes.values())
    if largest > MAX_RECORD_BYTES:
        biggest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        raise DefinitionError(
            f"view {view.name!r} cannot be served online: with every list full its record "
            f"takes {largest:,} bytes, above the limit of {MAX_RECORD_BYTES:,}; the largest "
            f"features are {biggest}: lower their n or k, or split the view")


def _largest_value(dtype, param):
    """The bytes (padded) a full variable value of ``dtype`` takes, its
    strings counted as empty."""
    if dtype == "string":
        size = 0
    elif dtype.startswith("list<"):
        size = 8 + (4 if dtype == "list<string>" else 8) * param
    else:                                               # top_k: counts, then the values
        size = 8 + 8 * param + _largest_value(f"list<{dtype[6:-1]}>", param)
    return size + (-size & (ALIGN - 1))


def next_expiry(view, as_of):
    """The first time after ``as_of`` at which a windowed value of the view can
    change without a new event: the next hop boundary of its windows."""
    hops = [f.window.hop_ms for f in view.features if f.window.size_ms]
    if not hops:
        return INT64_MAX
    return min((as_of // hop + 1) * hop for hop in hops)


def records_for(state, schema, slots, as_of, write_time):
    """The online :class:`Records` of ``slots`` as of ``as_of``."""
    values = with_derived(state.view, state.read(slots, as_of), len(slots))
    event_time, has_event = values.pop(EVENT_TIME)
    event_time = np.where(has_event, event_time, 0).astype(np.int64)
    event_time[~has_event] = INT64_MIN
    valid_until = np.full(len(slots), next_expiry(state.view, as_of), dtype=np.int64)
    return Records(values, event_time, write_time, valid_until)
