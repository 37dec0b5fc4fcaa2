"""The state of one feature view: a key index plus one arena per feature.

Values keep their type (``tally.core.aggregations.value_type``): features
that keep an int64 column's values (first, last, last_n, top_k,
distinct_count) have int64 arenas, and so do those over a string column,
which fold the strings' 64-bit codes (``tally.core.strings``); the state's
:class:`StringDictionary` maps codes back to ``str`` when it reads. Folding is
two steps, so that the stream can refuse a payload whole: :meth:`encode`
gives a batch its codes and names the events it refuses (a string whose code
another string already has), :meth:`fold` applies a batch; :meth:`apply` does
both, leaving the refused events out.
"""
from dataclasses import dataclass

import numpy as np

from tally.core.aggregations import exact
from tally.core.arena import FeatureArena, TiledArena, make_arena
from tally.core.errors import SnapshotError
from tally.core.filters import compile_filter
from tally.core.keyindex import Int64KeyIndex, StringKeyIndex
from tally.core.strings import StringDictionary, string_codes

# A hidden lifetime arena holds each entity's newest event time, which the
# online record carries so that readers can judge staleness.
EVENT_TIME = "__event_time__"
_STRINGS = "strings."            # the dictionary's arrays in export_arrays


@dataclass
class EncodedBatch:
    """A batch of events ready for the arenas: the decoded ``columns``, their
    ``valid`` masks (False: a null), the codes of the string columns that
    features aggregate, and the events the state refuses (row -> reason)."""
    columns: dict
    valid: dict
    codes: dict
    refused: dict

    def __len__(self):
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def select(self, keep):
        """The events where ``keep`` is true (``refused`` is left behind)."""
        def take(arrays):
            return {name: values[keep] for name, values in arrays.items()}
        return EncodedBatch(take(self.columns), take(self.valid), take(self.codes), {})

    def accepted(self):
        """The batch without the events the state refused."""
        if not self.refused:
            return self
        keep = np.ones(len(self), dtype=bool)
        keep[list(self.refused)] = False
        return self.select(keep)


class ViewState:
    """Folds decoded event columns into the arenas of one view and reads them back."""

    def __init__(self, view, expected_entities=0):
        self.view = view
        index_class = Int64KeyIndex if view.entity.key_type == "int64" else StringKeyIndex
        self.index = index_class(expected_entities)
        inputs = view.input_source          # the source with its joins' attributes
        self.column_types = {f.name: inputs.field_type(f.column)
                             for f in view.features if f.column}
        self.arenas = {f.name: _arena_for(f, self._exact(f), expected_entities)
                       for f in view.features}
        self.filters = {f.name: compile_filter(f.filter, inputs.schema)
                        for f in view.features if f.filter}
        self.arenas[EVENT_TIME] = FeatureArena("max", capacity=max(expected_entities, 1))
        # features whose values are strings, and the string columns that need
        # the dictionary (distinct_count only needs codes)
        over_strings = [f for f in view.features if self.column_types.get(f.name) == "string"]
        self.string_features = {f.name for f in over_strings if f.aggregation != "distinct_count"}
        self.string_columns = {f.column: False for f in over_strings}
        for f in over_strings:
            self.string_columns[f.column] |= f.name in self.string_features
        self.strings = StringDictionary()
        self.refused_strings = 0      # strings refused: their code was another string's

    def _exact(self, feature):
        return feature.column is not None and \
            exact(feature.aggregation, self.column_types[feature.name])

    def __len__(self):
        return len(self.index)

    # -- folding ---------------------------------------------------------------

    def encode(self, columns, valid=None):
        """A batch of decoded events (a dict of column arrays, one entry per
        event, in stream order; ``valid`` masks the nulls of optional
        columns) as the arenas take it: an :class:`EncodedBatch`. New strings
        enter the dictionary; a string whose code another string has is
        refused (counted in ``refused_strings``)."""
        valid = dict(valid or {})
        codes, refused = {}, {}
        for column, decoded in self.string_columns.items():
            values = columns[column]
            if decoded:
                column_codes, nulls, clashes = self.strings.encode(values)
                for row, known in clashes.items():
                    refused.setdefault(row, f"field {column!r}: string {values[row]!r} has "
                                            f"the 64-bit code of {known!r}, which the view "
                                            "already holds; it is refused, not merged")
                self.refused_strings += len(clashes)
            else:
                column_codes, nulls = string_codes(values)
            codes[column] = column_codes
            valid[column] = ~nulls if column not in valid else valid[column] & ~nulls
        return EncodedBatch(dict(columns), valid, codes, refused)

    def fold(self, batch, touched=True):
        """Apply an :class:`EncodedBatch`; returns the slots it touched (None
        without ``touched``: a bootstrap writes every record at the end, and
        finding them costs as much as a feature's fold)."""
        slots = self.index.slots(batch.columns[self.view.key_column])
        timestamps = batch.columns[self.view.source.timestamp_field]
        for feature in self.view.features:
            values, keep = self.inputs(feature, batch)
            self.arenas[feature.name].update(slots, timestamps, values, keep)
        self.arenas[EVENT_TIME].update(slots, timestamps, timestamps.astype(np.float64))
        return np.unique(slots) if touched else None

    def apply(self, columns, valid=None):
        """Fold a batch of decoded events (see :meth:`encode`), leaving out
        the events it refuses, and return the slots it touched."""
        return self.fold(self.encode(columns, valid).accepted())

    def inputs(self, feature, batch):
        """``(values, mask)`` of ``feature``'s arena for a batch: its column
        (a string column's codes), and the events it applies (its filter's,
        without the column's nulls); None for what it does not use."""
        keep = self.filters[feature.name](batch.columns, batch.valid) \
            if feature.name in self.filters else None
        if feature.column is None:
            return None, keep
        values = batch.codes.get(feature.column)
        if values is None:
            values = batch.columns[feature.column]
        present = batch.valid.get(feature.column)
        if self._exact(feature) and values.dtype.kind == "f":
            values, present = _int64_of_floats(feature, values, present)
        if present is not None:
            keep = present if keep is None else keep & present
        return values, keep

    # -- reading ---------------------------------------------------------------

    def read(self, slots, as_of):
        """``{feature: (values, valid)}`` for ``slots`` as of ``as_of`` (epoch ms),
        plus the newest event time under the key ``EVENT_TIME``. Values have
        the feature's value type: int64 or float64 arrays, object arrays of
        str (None where invalid), of lists of values (last_n) and of lists of
        (value, count) tuples (top_k)."""
        values = {name: arena.read(slots, as_of) for name, arena in self.arenas.items()}
        for name in self.string_features:
            feature_values, valid = values[name]
            values[name] = (self.decode(name, feature_values, valid), valid)
        return values

    def read_keys(self, keys, as_of):
        return self.read(self.index.lookup(keys), as_of)

    def decode(self, name, values, valid):
        """A string feature's values read from its arena (codes) as strings."""
        aggregation = self.view.feature(name).aggregation
        out = np.empty(len(values), dtype=object)
        rows = np.flatnonzero(valid)
        if aggregation in ("first", "last"):
            out[rows] = self.strings.strings(np.asarray(values)[rows])
        elif aggregation == "last_n":
            for row in rows.tolist():
                out[row] = self.strings.strings(values[row])
        else:                                       # top_k: (code, count) pairs
            for row in rows.tolist():
                pairs = values[row]
                out[row] = list(zip(self.strings.strings([c for c, _ in pairs]),
                                    [n for _, n in pairs]))
        return out

    # -- merging and snapshots -------------------------------------------------

    def merge(self, later):
        """Fold ``later`` (the state of the part of the stream after this one)
        into this state."""
        self.strings.merge(later.strings, f"view {self.view.name!r}")
        dst_slots = self.index.slots(later.index.all_keys())
        for name, arena in self.arenas.items():
            arena.merge(later.arenas[name], dst_slots)
        self.refused_strings += later.refused_strings

    def export_arrays(self):
        arrays = {f"index.{k}": v for k, v in self.index.export_arrays().items()}
        for name, arena in self.arenas.items():
            for k, v in arena.export_arrays(len(self.index)).items():
                arrays[f"arena.{name}.{k}"] = v
        if self.string_features:
            arrays.update({_STRINGS + k: v for k, v in self.strings.export_arrays().items()})
        return arrays

    def describe(self):
        return {name: arena.describe() for name, arena in self.arenas.items()}

    @classmethod
    def from_arrays(cls, view, params, arrays):
        """Restore a state saved by ``describe`` and ``export_arrays``; a
        snapshot taken before value types (int64 values kept as float64) is
        converted where that is exact, else refused (see ``_migrated``)."""
        state = cls(view)
        expected = state.describe()
        old = set()                      # features saved before value types
        if params != expected:
            if set(params) != set(expected):
                raise SnapshotError(f"view {view.name!r}: the snapshot was taken with other "
                                    f"features ({sorted(params)}) than the view's "
                                    f"({sorted(expected)})")
            old = {name for name, want in expected.items()
                   if _saved_before_value_types(view, name, params[name], want)}
        index_arrays = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("index.")}
        state.index = type(state.index).from_arrays(index_arrays)
        for name in state.arenas:
            prefix = f"arena.{name}."
            own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if name in old:
                own = _migrated(view, name, expected[name], own)
            state.arenas[name] = TiledArena.from_arrays(expected[name], own)
        strings = {k[len(_STRINGS):]: v for k, v in arrays.items() if k.startswith(_STRINGS)}
        if strings:
            state.strings = StringDictionary.from_arrays(strings)
        return state


def _int64_of_floats(feature, values, present):
    """A table's int64 column with nulls arrives as float64 with NaN (see
    ``tally.core.events``): int64 values, exact below 2**53, and the mask."""
    present = ~np.isnan(values) if present is None else present & ~np.isnan(values)
    if np.any(np.abs(values[present]) >= 2.0 ** 53):
        raise ValueError(
            f"feature {feature.name!r}: column {feature.column!r} arrived as float64 (an int64 "
            "column with nulls, read from a table), which cannot hold its values beyond "
            "2**53 exactly; fill or drop the nulls so that the column stays int64")
    return np.where(present, values, 0).astype(np.int64), present


def _arena_for(feature, is_exact, expected_entities):
    return make_arena(feature.aggregation, feature.window.size_ms, feature.window.hop_ms,
                      feature.lateness_ms, getattr(feature, "param", None),
                      capacity=max(expected_entities, 1),
                      value_type="int64" if is_exact else "float64")


# -- snapshots taken before value types -----------------------------------------
# Such a snapshot kept an int64 column's values as float64 and describes its
# arenas without "value_type". Values below 2**53 in magnitude are exact in a
# float64, so they convert back exactly; larger ones lost their low digits.

_VALUE_ARRAYS = {"first": "f64", "last": "f64", "last_n": "val", "top_k": "items"}
_REBOOTSTRAP = "re-bootstrap the view (tally bootstrap {view}) to rebuild its state from events"


def _saved_before_value_types(view, name, saved, expected):
    """Whether an arena saved as ``saved`` is ``expected`` as saved before
    value types (False: it is ``expected``); refuses other definitions."""
    if saved == expected:
        return False
    if expected.get("value_type") == "int64" and \
            saved == {k: v for k, v in expected.items() if k != "value_type"}:
        return True
    raise SnapshotError(f"view {view.name!r}: the snapshot was taken with other feature "
                        f"definitions ({name}: {saved}) than the view's ({expected})")


def _migrated(view, name, expected, arrays):
    """An int64 arena's arrays saved as float64 values, as int64 bit patterns."""
    where = f"view {view.name!r}, feature {name!r}"
    key = _VALUE_ARRAYS.get(expected["aggregation"])
    if key is None:
        raise SnapshotError(
            f"{where}: the snapshot was taken before Tally kept int64 values exactly; its "
            f"{expected['aggregation']} sketch hashed them as float64 and cannot be "
            f"converted: {_REBOOTSTRAP.format(view=view.name)}")
    values = np.asarray(arrays[key], dtype=np.float64)
    held = ~np.isnan(values)                       # NaN: an empty cell
    kept = values[held]
    if not np.all((np.abs(kept) < 2.0 ** 53) & (kept == np.floor(kept))):
        raise SnapshotError(
            f"{where}: the snapshot was taken before Tally kept int64 values exactly, and "
            "holds values beyond 2**53 that float64 could not keep: "
            f"{_REBOOTSTRAP.format(view=view.name)}")
    bits = values.view(np.int64).copy()
    bits[held] = kept.astype(np.int64)
    return {**arrays, key: bits.view(np.float64)}
