"""The state of one feature view: a key index plus one arena per feature."""
import numpy as np

from tally.core.arena import FeatureArena, TiledArena, make_arena
from tally.core.filters import compile_filter
from tally.core.keyindex import Int64KeyIndex, StringKeyIndex

# A hidden lifetime arena holds each entity's newest event time, which the
# online record carries so that readers can judge staleness.
EVENT_TIME = "__event_time__"


class ViewState:
    """Folds decoded event columns into the arenas of one view and reads them back."""

    def __init__(self, view, expected_entities=0):
        self.view = view
        index_class = Int64KeyIndex if view.entity.key_type == "int64" else StringKeyIndex
        self.index = index_class(expected_entities)
        self.arenas = {f.name: _arena_for(f, expected_entities) for f in view.features}
        self.filters = {f.name: compile_filter(f.filter, view.source.schema)
                        for f in view.features if f.filter}
        self.arenas[EVENT_TIME] = FeatureArena("max", capacity=max(expected_entities, 1))

    def __len__(self):
        return len(self.index)

    def apply(self, columns, valid=None):
        """Fold a batch of decoded events (a dict of column arrays, one entry per
        event, in stream order; ``valid`` masks the nulls of optional columns)
        and return the slots it touched."""
        slots = self.index.slots(columns[self.view.key_column])
        timestamps = columns[self.view.source.timestamp_field]
        for feature in self.view.features:
            values = None if feature.column is None else columns[feature.column]
            keep = self.filters[feature.name](columns, valid) \
                if feature.name in self.filters else None
            self.arenas[feature.name].update(slots, timestamps, values, keep)
        self.arenas[EVENT_TIME].update(slots, timestamps, timestamps.astype(np.float64))
        return np.unique(slots)

    def read(self, slots, as_of):
        """``{feature: (values, valid)}`` for ``slots`` as of ``as_of`` (epoch ms),
        plus the newest event time under the key ``EVENT_TIME``."""
        return {name: arena.read(slots, as_of) for name, arena in self.arenas.items()}

    def read_keys(self, keys, as_of):
        return self.read(self.index.lookup(keys), as_of)

    def merge(self, later):
        """Fold ``later`` (the state of the part of the stream after this one)
        into this state."""
        dst_slots = self.index.slots(later.index.all_keys())
        for name, arena in self.arenas.items():
            arena.merge(later.arenas[name], dst_slots)

    def export_arrays(self):
        arrays = {f"index.{k}": v for k, v in self.index.export_arrays().items()}
        for name, arena in self.arenas.items():
            for k, v in arena.export_arrays(len(self.index)).items():
                arrays[f"arena.{name}.{k}"] = v
        return arrays

    def describe(self):
        return {name: arena.describe() for name, arena in self.arenas.items()}

    @classmethod
    def from_arrays(cls, view, params, arrays):
        """Restore a state saved by ``describe`` and ``export_arrays``."""
        state = cls(view)
        expected = state.describe()
        if params != expected:
            raise ValueError(f"view {view.name!r}: the snapshot was taken with other "
                             f"feature definitions ({params}) than the view's ({expected})")
        index_arrays = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("index.")}
        state.index = type(state.index).from_arrays(index_arrays)
        for name in state.arenas:
            prefix = f"arena.{name}."
            state.arenas[name] = TiledArena.from_arrays(
                params[name], {k[len(prefix):]: v for k, v in arrays.items()
                               if k.startswith(prefix)})
        return state


def _arena_for(feature, expected_entities):
    return make_arena(feature.aggregation, feature.window.size_ms, feature.window.hop_ms,
                      feature.lateness_ms, getattr(feature, "param", None),
                      capacity=max(expected_entities, 1))
