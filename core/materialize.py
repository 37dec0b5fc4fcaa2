"""From view state to online records: what the pipeline writes after each batch."""
import numpy as np

from tally.core.aggregations import AGGREGATIONS
from tally.core.errors import DefinitionError
from tally.core.record import INT64_MAX, INT64_MIN, Records, ViewSchema
from tally.core.view import EVENT_TIME


def online_schema(view, version=1) -> ViewSchema:
    # Record layout 1 holds one 8-byte number per feature; lists need layout 2.
    lists = [f.name for f in view.features
             if AGGREGATIONS[f.aggregation].online_type == "list"]
    if lists:
        raise DefinitionError(
            f"view {view.name!r}: features {lists} hold lists, which online record "
            "layout 1 cannot store yet; serve them from a view without them, or use "
            "them offline (ViewState.read)")
    features = tuple((f.name, AGGREGATIONS[f.aggregation].online_type)
                     for f in view.features)
    return ViewSchema(view.name, version, view.entity.key_type, features)


def next_expiry(view, as_of):
    """The first time after ``as_of`` at which a windowed value of the view can
    change without a new event: the next hop boundary of its windows."""
    hops = [f.window.hop_ms for f in view.features if f.window.size_ms]
    if not hops:
        return INT64_MAX
    return min((as_of // hop + 1) * hop for hop in hops)


def records_for(state, schema, slots, as_of, write_time):
    """The online :class:`Records` of ``slots`` as of ``as_of``."""
    values = state.read(slots, as_of)
    event_time, has_event = values.pop(EVENT_TIME)
    event_time = np.where(has_event, event_time, 0).astype(np.int64)
    event_time[~has_event] = INT64_MIN
    valid_until = np.full(len(slots), next_expiry(state.view, as_of), dtype=np.int64)
    return Records(values, event_time, write_time, valid_until)
