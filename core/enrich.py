"""Enrichment: each event joined with a dimension's row as of the event's time.

A dimension (``Join.dimension``) is a keyed table kept from a changelog: every
row of its source is a new version of its key's attributes, valid from the
row's event time. An event at time ``t`` sees, for its key (the event's
``Join.on`` field), the version with the greatest time <= ``t``; among
versions of equal time, the one later in the changelog (a key's rows are on
one partition, so that order is the log's, online and offline alike). An
article re-categorised later does not rewrite the reads before it.

One :class:`DimensionTable` answers these as-of lookups for the stream, the
bootstrap and training sets alike, so the three enrich an event the same
way. The stream feeds it as the changelog arrives
(``tally.service.ingest.dimensions``); a bootstrap and a training set load
the whole history first.

Events whose key has no version at their time -- an article unknown, or
only known from later -- get null attributes (aggregations skip nulls, as
they skip a null field) and are counted as ``misses``. In the stream, a
partition folds a batch only once the dimension has been read up to the time
the batch was received, so a row published before its events is always seen.
A row published after events it would have changed (a *late row*: its time
is at or before an event of its key already folded) changes nothing already
folded -- state is never rewritten -- and is counted (``late_rows``); a
training set, which reads the whole history, gives those events the row.
Online and offline agree whenever dimension rows are published before the
events that read them.
"""
import bisect

import numpy as np

from tally.core.keyindex import Int64KeyIndex, StringKeyIndex

_NO_TIME = np.iinfo(np.int64).min


class DimensionTable:
    """The versions of one dimension's rows by key, for as-of lookups."""

    def __init__(self, dimension, key):
        self.dimension, self.key = dimension, key
        self.key_type = dimension.field_type(key)
        self.index = (Int64KeyIndex if self.key_type == "int64" else StringKeyIndex)()
        self.attributes = [(n, t) for n, t in dimension.schema if n != key]
        self.n_rows = 0
        self.row_time = np.empty(0, np.int64)
        self.values = {n: _empty(t, 0) for n, t in self.attributes}
        self.valid = {n: np.empty(0, bool) for n, _ in self.attributes}
        self.latest_row = np.empty(0, np.int64)      # per slot: its newest version
        self.latest_time = np.empty(0, np.int64)
        self.joined_until = np.empty(0, np.int64)     # per slot: newest event time joined
        self.history = {}         # slot -> ([times], [rows]) for keys with > 1 version
        self.late_rows = 0

    def __len__(self):
        return len(self.index)

    # -- the changelog ---------------------------------------------------------

    def add(self, columns, valid=None):
        """Add decoded changelog rows (dict of arrays, in log order; ``valid``
        masks the nulls of optional fields) as new versions."""
        n = len(columns[self.key])
        if not n:
            return
        valid = valid or {}
        rows = np.arange(self.n_rows, self.n_rows + n)
        self._append_rows(columns, valid, n)
        slots = self.index.slots(columns[self.key])
        self._grow_slots(len(self.index))
        times = self.row_time[rows]
        for slot, row, t in zip(slots.tolist(), rows.tolist(), times.tolist()):
            self._add_version(slot, row, t)

    def _add_version(self, slot, row, t):
        if t <= self.joined_until[slot]:
            self.late_rows += 1
        latest = int(self.latest_row[slot])
        if latest < 0:
            self.latest_row[slot], self.latest_time[slot] = row, t
            return
        if slot not in self.history:
            self.history[slot] = ([int(self.latest_time[slot])], [latest])
        times, rows = self.history[slot]
        at = bisect.bisect_right(times, t)          # ties: the later row wins
        times.insert(at, t)
        rows.insert(at, row)
        self.latest_row[slot], self.latest_time[slot] = rows[-1], times[-1]

    def _append_rows(self, columns, valid, n):
        need = self.n_rows + n
        if need > len(self.row_time):
            capacity = max(need, 2 * len(self.row_time), 1024)
            self.row_time = _grown(self.row_time, capacity)
            for name, dtype in self.attributes:
                self.values[name] = _grown(self.values[name], capacity, dtype)
                self.valid[name] = _grown(self.valid[name], capacity)
        stop = self.n_rows + n
        self.row_time[self.n_rows:stop] = columns[self.dimension.timestamp_field]
        for name, dtype in self.attributes:
            values = np.asarray(columns[name])
            present = _present(values, dtype)
            if name in valid:
                present &= valid[name]
            if dtype != "float64" and values.dtype.kind == "f":    # a table's null ints
                values = np.where(present, values, 0)
            self.values[name][self.n_rows:stop] = values
            self.valid[name][self.n_rows:stop] = present
        self.n_rows = stop

    def _grow_slots(self, n_slots):
        if n_slots <= len(self.latest_row):
            return
        capacity = max(n_slots, 2 * len(self.latest_row), 1024)
        old = len(self.latest_row)
        self.latest_row = _grown(self.latest_row, capacity)
        self.latest_time = _grown(self.latest_time, capacity)
        self.joined_until = _grown(self.joined_until, capacity)
        self.latest_row[old:] = -1
        self.latest_time[old:] = _NO_TIME
        self.joined_until[old:] = _NO_TIME

    # -- as-of lookups ---------------------------------------------------------

    def rows_as_of(self, keys, times, present=None):
        """The row index of each (key, time)'s version, -1 for none;
        ``present`` masks the events that have a key."""
        rows = np.full(len(keys), -1, np.int64)
        if not len(self.index) or not len(keys):
            return rows
        slots = self.index.lookup(keys)
        if present is not None:
            slots[~present] = -1
        known = np.flatnonzero(slots >= 0)
        slots, times = slots[known], np.asarray(times, np.int64)[known]
        rows[known] = self.latest_row[slots]
        for i in np.flatnonzero(times < self.latest_time[slots]).tolist():
            rows[known[i]] = self._version_at(int(slots[i]), int(times[i]))  # older versions
        np.maximum.at(self.joined_until, slots, times)
        return rows

    def _version_at(self, slot, t):
        history = self.history.get(slot)
        if history is None:
            return -1                                    # its only version is later
        times, rows = history
        at = bisect.bisect_right(times, t)
        return rows[at - 1] if at else -1

    def attributes_of(self, rows, names):
        """``({name: values}, {name: valid})`` of the rows (-1: null)."""
        hit = rows >= 0
        safe = np.where(hit, rows, 0)
        values, valid = {}, {}
        for name in names:
            if not self.n_rows:
                values[name] = _empty(self.dimension.field_type(name), len(rows))
                valid[name] = hit
                continue
            present = hit & self.valid[name][safe]
            values[name] = _nulled(self.values[name][safe], present)
            valid[name] = present
        return values, valid

    # -- snapshots (a bootstrap hands the table to its reader processes) ------

    def __getstate__(self):
        state = dict(self.__dict__)
        state["index"] = self.index.export_arrays()
        return state

    def __setstate__(self, state):
        index_class = Int64KeyIndex if state["key_type"] == "int64" else StringKeyIndex
        state["index"] = index_class.from_arrays(state["index"])
        self.__dict__.update(state)


class Enricher:
    """Adds a view's joined attributes to batches of its events."""

    def __init__(self, view, tables):
        """``tables``: {(dimension name, key): DimensionTable} holding every join's."""
        self.view = view
        self.joins = [(join, tables[table_key(join)]) for join in view.joins]
        self.misses = 0            # events of some join with no version at their time

    def __call__(self, columns, valid=None):
        """``(columns, valid)`` with the attributes added (new dicts)."""
        columns, valid = dict(columns), dict(valid or {})
        times = columns[self.view.source.timestamp_field]
        for join, table in self.joins:
            keys, present = _keys(columns[join.on], valid.get(join.on))
            rows = table.rows_as_of(keys, times, present)
            self.misses += int(np.count_nonzero(rows < 0))
            values, masks = table.attributes_of(rows, join.columns)
            for column in join.columns:
                columns[join.prefix + column] = values[column]
                valid[join.prefix + column] = masks[column]
        return columns, valid


def _keys(keys, present):
    """Join keys as the index takes them, and which events have one (a
    table's null int is NaN, a null string None; "" is never a key)."""
    if keys.dtype.kind == "f":
        has = ~np.isnan(keys)
        keys = np.where(has, keys, 0).astype(np.int64)
    elif keys.dtype == object:
        has = np.fromiter((type(k) is str for k in keys), bool, len(keys))
        if not has.all():
            keys = np.where(has, keys, "")
    else:
        has = None
    if present is not None:
        has = present if has is None else has & present
    return keys, has


def table_key(join):
    """Joins on one dimension and key share one table."""
    return (join.dimension.name, join.key)


def tables_for(views):
    """Empty tables for every join of ``views``: {table_key: DimensionTable}."""
    tables = {}
    for view in views:
        for join in view.joins:
            if table_key(join) not in tables:
                tables[table_key(join)] = DimensionTable(join.dimension, join.key)
    return tables


def dimensions_of(views):
    """{table_key: Join}: one join of each dimension table the views read."""
    return {table_key(j): j for view in views for j in view.joins}


# --------------------------------------------------------------------------
# Typed columns: int64, float64 (NaN: null), bool, object arrays of str (None)


def _empty(dtype, n):
    if dtype == "string":
        return np.full(n, None, dtype=object)
    return np.zeros(n, dtype={"int64": np.int64, "float64": np.float64, "bool": bool}[dtype])


def _grown(array, capacity, dtype=None):
    grown = _empty(dtype, capacity) if dtype is not None else \
        np.zeros(capacity, dtype=array.dtype)
    grown[:len(array)] = array
    return grown


def _present(values, dtype):
    if values.dtype.kind == "f":
        return ~np.isnan(values)
    if dtype == "string":
        return np.fromiter((v is not None for v in values), bool, len(values))
    return np.ones(len(values), dtype=bool)


def _nulled(values, present):
    if present.all():
        return values
    if values.dtype == object:
        values = values.copy()
        values[~present] = None
    elif values.dtype.kind == "f":
        values = np.where(present, values, np.nan)
    else:
        values = np.where(present, values, 0)
    return values
