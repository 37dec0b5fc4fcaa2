"""Point-in-time-correct training data, computed by the online engine itself.

:func:`training_set` joins a *spine* (entity keys, a timestamp per row, any
label columns) with feature values as of each row's timestamp: a row at time
``t`` sees exactly the events with event time <= ``t`` and nothing later,
under the same windows (tiles of one hop, expiry by time) as the online path,
because it *is* the online path's code: the events are replayed in event-time
order (stable in log order) through the view's own :class:`ViewState` arenas,
and each spine row is answered right after the events with time <= its time
were applied (``tally.core.arena.replay_*``, one C loop per arena merging
sorted events with sorted queries).

Nulls: a row whose entity has no event with time <= ``t`` (never seen, or
only later events) gets nulls in every feature of that view; the row is kept.
An entity with earlier events but an empty window gets what a lookup would
return then: 0 for count/sum, null for mean/min/max/first/last, an empty list
for last_n/top_k.

Memory: O(state + spine + one event chunk), never spine x events. Events are
streamed in time-sorted chunks (``chunk_rows``, default 1M) with one chunk of
lookahead; sources that are not time-sorted are sorted externally
(``tally.core.event_sources``: sorted runs spilled to disk, merged by
chunks). The spine is held in memory (its key and time columns plus, for the
result, the feature columns); :func:`iter_training_batches` with
``order="time"`` yields results as the replay advances instead of holding them.

Lateness: events are replayed in event-time order, so none is ever late; the
online path, which applies events in arrival order, drops an event that
arrives after its entity's ring has moved past it (``late_dropped``). For a
stream whose events arrive in order (or within the allowed lateness) the two
agree exactly; a training set never drops a late event.

This module needs only numpy and pyarrow. Events come from event sources
(``tally.core.event_sources``: tables, Parquet archives, and anything with
``sorted_chunks``, such as ``tally.service.history.topic.PulsarTopic``);
``tally.training_set`` (``tally.service.training``) also accepts a broker URL
and a registry path, and opens them.

Long because the replay's orchestration (spine, requested features,
per-source event streams, outputs) reads best in one place.
"""
import os
import warnings

import numpy as np
import pyarrow as pa

from tally.core import arena as _arena
from tally.core.aggregations import arrow_of, arrow_type
from tally.core.definitions import Feature, FeatureService, FeatureView
from tally.core.errors import TrainingSetError, TrainingSetWarning
from tally.core.event_sources import (DEFAULT_CHUNK_ROWS, archive_and_topic, is_columns,
                                      n_events, open_events, slice_columns, stable_order)
from tally.core.enrich import Enricher, dimensions_of, tables_for
from tally.core.events import valid_keys
from tally.core.materialize import derived_expressions, with_derived
from tally.core.request_features import compiled_computed, compute
from tally.core.view import EVENT_TIME, ViewState

DEFAULT_QUERY_BLOCK = 1 << 18         # spine rows per kernel call
TIMESTAMP_CANDIDATES = ("ts", "timestamp", "event_timestamp", "event_time")
_INF = np.iinfo(np.int64).max


# --------------------------------------------------------------------------
# Public API


def training_set(spine, features=None, sources=None, *, service=None, views=None,
                 registry=None, timestamp_column=None, keys=None, pulsar=None,
                 chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None, progress=None) -> pa.Table:
    """The spine with one column per feature: its value as of each row's time.

    ``spine``: a pandas DataFrame, an Arrow Table/RecordBatch, a dict of
    columns or a Parquet path, with the entity key column(s), a timestamp
    column (epoch ms integers, or Arrow/pandas timestamps) and any labels.
    Rows may be unsorted and repeated; the result keeps the spine's rows, in
    the spine's order, with its columns first.

    ``features``: ``"view:feature"`` strings (also ``"view.feature"``,
    ``"view@v3:feature"``, or ``"view"`` for all of a view's features),
    FeatureView objects (all their features) or Feature objects (found in
    ``views``). Names resolve against ``views`` (draft FeatureView objects,
    not applied anywhere) first, then ``registry`` (a Registry or its path).

    ``sources``: where each source's events come from, keyed by source or
    view name, or one value for all: an in-memory table (dict of arrays,
    DataFrame, Arrow Table), a Parquet path/URI, a ``PulsarTopic`` or
    ``"pulsar://..."`` URL, or a list of these (merged in event-time order).
    By default a view reads its source's ``archive`` (if set) and, if
    ``pulsar`` (a service URL, a client, or a ``PulsarTopic`` — with an
    ``admin_url`` it reads in parallel like a bootstrap) is given, its topic from the
    earliest message to the end at call time; with both, the archive's
    events before its declared boundary and the topic's from it on (the
    bootstrap's rule, ``tally.service.history.plan``). A join's dimension
    is a source like any other (``sources={"articles": ...}``): its whole
    history is read, so each event is joined with the row valid at its time.

    ``keys`` maps an entity (or view) name to the spine column holding its
    keys; by default the column named after the entity, else the view's
    ``key_column``. ``timestamp_column`` defaults to the first of
    ``ts``/``timestamp``/``event_timestamp``/``event_time`` present.

    ``service`` (instead of ``features``): a FeatureService, or the name of
    one in ``registry``: its features, each column named as the service
    answers it online (a spine column of that name is refused), then its
    request-time columns, computed on the spine's keys and declared request
    fields by the code the lookup server runs.

    A feature column is named after the feature, or ``view__feature`` when
    that name is taken (by a spine column or another requested feature).
    ``progress(done, total)`` is called as spine rows are answered.
    """
    job = _Job(spine, features, sources, views, registry, timestamp_column, keys, pulsar,
               chunk_rows, spill_dir, progress, service)
    try:
        job.run(job.n_rows)
        return job.table()
    finally:
        job.close()


def iter_training_batches(spine, features=None, sources=None, *, batch_rows=65_536,
                          order="spine", **options):
    """Yield the training set as Arrow RecordBatches of up to ``batch_rows``.

    ``order="spine"`` (default) yields the rows in spine order (the whole set
    is computed first); ``order="time"`` yields them in time order (stable in
    spine order) as the replay advances, holding only one batch of results:
    the shape for a training set larger than memory. Other arguments as for
    :func:`training_set`. See the README for PyTorch and tf.data recipes."""
    if order not in ("spine", "time"):
        raise TrainingSetError(f"order={order!r}: use 'spine' or 'time'")
    if order == "spine":
        yield from training_set(spine, features, sources, **options).to_batches(
            max_chunksize=batch_rows)
        return
    job = _Job(spine, features, sources, options.pop("views", None),
               options.pop("registry", None), options.pop("timestamp_column", None),
               options.pop("keys", None), options.pop("pulsar", None),
               options.pop("chunk_rows", DEFAULT_CHUNK_ROWS), options.pop("spill_dir", None),
               options.pop("progress", None), options.pop("service", None))
    if options:
        raise TypeError(f"unexpected arguments {sorted(options)}")
    try:
        for start in range(0, job.n_rows, batch_rows):
            stop = min(start + batch_rows, job.n_rows)
            job.run(stop)
            yield job.time_batch(start, stop)
    finally:
        job.close()


# --------------------------------------------------------------------------
# Resolving features


class _Requested:
    __slots__ = ("view", "feature", "name")

    def __init__(self, view, feature):
        self.view, self.feature, self.name = view, feature, None


def resolve_features(features, views=None, registry=None):
    """``[(view, feature)]`` for the feature references, in order."""
    if features is None:
        raise TrainingSetError("name the features (e.g. ['user_reading:total_readtime']) or "
                               "a feature service (service='recommend')")
    if isinstance(features, (str, Feature, FeatureView)):
        features = [features]
    views = list(views or ())
    by_name = {}
    for view in views:
        if not isinstance(view, FeatureView):
            raise TrainingSetError(f"views: {view!r} is not a FeatureView")
        by_name.setdefault(view.name, view)
    if registry is not None and not hasattr(registry, "get"):
        raise TrainingSetError(f"registry={registry!r}: pass an open registry (a path is "
                               "opened by tally.training_set)")
    return _resolve(features, views, by_name, registry)


def _resolve(features, views, by_name, registry):
    resolved = []
    for ref in features:
        if isinstance(ref, FeatureView):
            resolved += [(ref, f) for f in ref.features + ref.derived]
        elif isinstance(ref, Feature):
            owners = [v for v in views if ref in v.features]
            if len(owners) != 1:
                raise TrainingSetError(
                    f"feature {ref.name!r}: a Feature object needs its view; "
                    + ("pass it in views=[...]" if not owners else
                       f"it is in several views ({[v.name for v in owners]}); "
                       "write 'view:feature'"))
            resolved.append((owners[0], ref))
        elif isinstance(ref, str):
            view_ref, feature_name = _split_ref(ref)
            view = by_name.get(view_ref)
            if view is None:
                if registry is None:
                    known = sorted(by_name) or "none"
                    raise TrainingSetError(
                        f"{ref!r}: no view {view_ref!r} among views= (known: {known}) and "
                        "no registry given; pass the FeatureView in views=[...] or a "
                        "registry=")
                try:
                    view = registry.get(view_ref, kind="view")
                except Exception as error:        # the registry's own NotFound, etc.
                    raise TrainingSetError(f"{ref!r}: {error}") from None
            if feature_name is None:
                resolved += [(view, f) for f in view.features + view.derived]
            else:
                try:
                    resolved.append((view, view.feature(feature_name)))
                except KeyError as error:
                    raise TrainingSetError(f"{ref!r}: {error.args[0]}") from None
        else:
            raise TrainingSetError(f"features: {ref!r} is not a 'view:feature' string, a "
                                   "Feature or a FeatureView")
    if not resolved:
        raise TrainingSetError("features is empty; name at least one, e.g. "
                               "'user_reading:total_readtime'")
    seen, unique = set(), []
    for view, feature in resolved:
        if (id(view), feature.name) not in seen:
            seen.add((id(view), feature.name))
            unique.append((view, feature))
    return unique


def service_features(service, registry=None):
    """(the "view:feature" refs, {(view, feature): column}) of a feature
    service given as a FeatureService or by its name in ``registry``."""
    if isinstance(service, str):
        if registry is None or not hasattr(registry, "get"):
            raise TrainingSetError(f"service={service!r}: name a registry (registry=) to "
                                   "find it in, or pass the FeatureService")
        try:
            service = registry.get(service, kind="service")
        except Exception as error:                # the registry's own NotFound, etc.
            raise TrainingSetError(f"service={service!r}: {error}") from None
    if not isinstance(service, FeatureService):
        raise TrainingSetError(f"service={service!r}: pass a FeatureService or its name")
    return ([f"{f.view}:{f.feature}" for f in service.features],
            {(f.view, f.feature): f.alias for f in service.features})


def _service(service, registry):
    if isinstance(service, FeatureService):
        return service
    return registry.get(service, kind="service")


def _flat(column):
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _split_ref(ref):
    """'view:feature' | 'view.feature' | 'view@v2:feature' | 'view' -> (view ref, feature)."""
    ref = ref.strip()
    if ":" in ref:
        view_ref, feature = ref.split(":", 1)
        if view_ref in ("view",):             # the registry's 'view:name' kind prefix
            return _split_ref(feature)
        return view_ref, feature or None
    pin = ""
    if "@" in ref:
        ref, pin = ref.split("@", 1)
        pin = "@" + pin
    name, _, feature = ref.partition(".")
    return name + pin, feature or None




# --------------------------------------------------------------------------
# The spine


def read_spine(spine):
    """The spine as an Arrow Table."""
    if isinstance(spine, pa.Table):
        return spine
    if isinstance(spine, pa.RecordBatch):
        return pa.Table.from_batches([spine])
    if isinstance(spine, (str, os.PathLike)):
        import pyarrow.parquet as pq
        return pq.read_table(os.fspath(spine))
    if isinstance(spine, dict):
        return pa.table({k: np.asarray(v) if not isinstance(v, (pa.Array, pa.ChunkedArray))
                         else v for k, v in spine.items()})
    if hasattr(spine, "to_arrow"):           # polars and friends
        return spine.to_arrow()
    try:
        import pandas as pd
    except ImportError:                      # pragma: no cover
        pd = None
    if pd is not None and isinstance(spine, pd.DataFrame):
        return pa.Table.from_pandas(spine, preserve_index=False)
    raise TrainingSetError(f"spine: {type(spine).__name__} is not a DataFrame, an Arrow "
                           "table or a Parquet path")


def epoch_ms(column, name="timestamp"):
    """An int64 numpy array of epoch milliseconds from an Arrow column of
    integers (already ms) or timestamps (floored to the millisecond)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise TrainingSetError(f"spine column {name!r} has {column.null_count} nulls; every "
                               "row needs a time")
    kind = column.type
    if pa.types.is_timestamp(kind):
        per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[kind.unit]
        raw = column.cast(pa.int64()).to_numpy()
        return raw * 1000 if per_ms is None else np.floor_divide(raw, per_ms)
    if pa.types.is_date(kind):
        return column.cast(pa.timestamp("ms")).cast(pa.int64()).to_numpy()
    if pa.types.is_integer(kind):
        return column.cast(pa.int64()).to_numpy()
    raise TrainingSetError(f"spine column {name!r} is {kind}; use epoch milliseconds "
                           "(integers) or timestamps")


def _spine_keys(table, column, key_type, where):
    """(keys as numpy int64 / object, present mask) of a spine key column."""
    data = table.column(column)
    if isinstance(data, pa.ChunkedArray):
        data = data.combine_chunks()
    present = np.ones(len(data), dtype=bool) if not data.null_count else \
        np.asarray(data.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if key_type == "int64":
        if pa.types.is_floating(data.type):       # pandas: integers with missing values
            raw = data.fill_null(0).to_numpy(zero_copy_only=False)
            if not np.array_equal(raw, np.floor(raw)) or not np.isfinite(raw).all():
                raise TrainingSetError(f"{where}: spine column {column!r} holds non-integer "
                                       "numbers, but the entity has int64 keys")
            present &= ~np.isnan(data.to_numpy(zero_copy_only=False))
            return raw.astype(np.int64), present
        if not (pa.types.is_integer(data.type) or pa.types.is_dictionary(data.type)):
            raise TrainingSetError(f"{where}: spine column {column!r} is {data.type}, but the "
                                   "entity has int64 keys; give integer keys")
        values = data.cast(pa.int64()).fill_null(0).to_numpy()
    else:
        if not (pa.types.is_string(data.type) or pa.types.is_large_string(data.type)):
            data = data.cast(pa.string())
        values = np.asarray(data.fill_null("").to_numpy(zero_copy_only=False), dtype=object)
    return values, present


# --------------------------------------------------------------------------
# Event chunks: in memory, and merging time-sorted streams
























# --------------------------------------------------------------------------
# The replay


def replay_generic(arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts):
    """The slow, obviously correct replay through the arena's public API: for
    each distinct query time, ``update`` with the events up to it, then
    ``read``. Used for arenas without a kernel, and by the tests."""
    values, valid = [], []
    i = 0
    ev_ts = np.asarray(ev_ts)
    q_ts = np.asarray(q_ts)
    bounds = np.flatnonzero(np.diff(q_ts)) + 1
    for group in np.split(np.arange(len(q_ts)), bounds) if len(q_ts) else []:
        t = q_ts[group[0]]
        j = int(np.searchsorted(ev_ts, t, "right"))
        if j > i:
            arena.update(ev_slots[i:j], ev_ts[i:j],
                         None if ev_values is None else ev_values[i:j],
                         None if ev_mask is None else ev_mask[i:j])
            i = j
        v, ok = arena.read(q_slots[group], t)
        values.append(v)
        valid.append(ok)
    if i < len(ev_ts):
        arena.update(ev_slots[i:], ev_ts[i:], None if ev_values is None else ev_values[i:],
                     None if ev_mask is None else ev_mask[i:])
    if not values:
        return np.empty(0), np.empty(0, dtype=bool)
    return np.concatenate(values), np.concatenate(valid)


class _Output:
    """One feature's answers, in the spine's time order, typed as the
    feature's value type (string features: codes mapped back by ``state``)."""

    def __init__(self, requested, n_rows, state):
        self.requested = requested
        feature = requested.feature
        self.type = arrow_type(feature.aggregation, state.column_types.get(feature.name))
        self.state = state if feature.name in state.string_features else None
        self.is_list = pa.types.is_list(self.type)
        self.valid = np.zeros(n_rows, dtype=bool)
        if not self.is_list:
            self.values = np.zeros(n_rows, dtype=self.type.to_pandas_dtype())
        self.pieces = []            # lists: (start, pa.ListArray) in time order

    def put(self, start, result):
        """Store a kernel's answers for sorted rows [start, start + n)."""
        if self.is_list:
            if len(result) == 3:                         # last_n: offsets, values, valid
                offsets, values, valid = result
                array = pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(self._items(values), self.type.value_type))
            else:                                        # top_k: offsets, items, counts, valid
                offsets, items, counts, valid = result
                item_type = self.type.value_type.field("value").type
                array = pa.ListArray.from_arrays(
                    pa.array(offsets), pa.StructArray.from_arrays(
                        [pa.array(self._items(items), item_type), pa.array(counts)],
                        names=["value", "count"]))
            self.pieces.append((start, array))
        else:
            values, valid = result
            if self.state is not None:
                values = self.state.decode(self.requested.feature.name, values, valid)
            self.values[start:start + len(values)] = values
        self.valid[start:start + len(valid)] = valid

    def _items(self, values):
        """A kernel's flat list items: a string feature's codes as strings."""
        return values if self.state is None else self.state.strings.strings(values)

    def arrow(self, start, stop, seen, take=None):
        """Rows [start, stop) (time order) as an Arrow array; ``take``
        re-orders them (the spine order)."""
        mask = ~(self.valid[start:stop] & seen[start:stop])
        if self.is_list:
            pieces = [a for s, a in self.pieces if start <= s < stop]
            array = pa.concat_arrays(pieces) if pieces else pa.array([], self.type)
            if len(array) != stop - start:
                raise AssertionError("replay output pieces do not cover the rows")
            array = _with_nulls(array, mask)
            self.pieces = [(s, a) for s, a in self.pieces if s >= stop]
        else:
            array = pa.array(self.values[start:stop], self.type, mask=mask)
        return array if take is None else array.take(pa.array(take))


def _columns_of(array):
    """An output array as derived features read values online: numbers as
    numpy arrays, strings and lists as objects, (value, count) pairs as tuples."""
    valid = ~np.asarray(array.is_null().to_numpy(zero_copy_only=False), bool)
    if pa.types.is_list(array.type):
        pairs = pa.types.is_struct(array.type.value_type)
        rows = array.to_pylist()
        values = np.empty(len(rows), dtype=object)
        values[:] = [None if row is None else
                     [(p["value"], p["count"]) for p in row] if pairs else row for row in rows]
        return values, valid
    if pa.types.is_string(array.type):
        return np.array(array.to_pylist(), dtype=object), valid
    return array.fill_null(0).to_numpy(zero_copy_only=False), valid


def _with_nulls(list_array, mask):
    if not mask.any():
        return list_array
    return pa.ListArray.from_arrays(list_array.offsets, list_array.values,
                                    mask=pa.array(mask))


class _ViewReplay:
    """One view's state, its spine slots and its kernel calls."""

    def __init__(self, view, requested, key_values, key_present, order, ts_field, tables):
        self.view = view
        self.state = ViewState(view)
        self.enrich = Enricher(view, tables) if view.joins else None
        self.requested = requested
        self.derived = [(d, e) for d, e in derived_expressions(view)
                        if d.name in {r.feature.name for r in requested}]
        # spine keys get slots first, so a spine row's slot is known upfront;
        # whether its entity has had an event yet is the EVENT_TIME arena's say
        slots = np.full(len(order), -1, dtype=np.int64)
        present = key_present[order]
        if present.any():
            keys = key_values[order][present]
            slots[present] = self.state.index.slots(keys)
        self.q_slots = slots
        self.seen = np.zeros(len(order), dtype=bool)
        self.ts_field = ts_field
        names = {r.feature.name for r in requested} | \
            {n for _, e in self.derived for n in e.names}    # a derived feature's inputs
        self.arena_names = [f.name for f in view.features if f.name in names]
        used = {f.column for f in view.features if f.name in names and f.column} | \
            {c for name, flt in self.state.filters.items() if name in names
             for c in flt.columns}
        # the events' own fields (a join's attributes come from its table)
        self.columns = [view.key_column, ts_field] + sorted(
            {c for c in used if view.source.field_type(c)} | {j.on for j in view.joins})

    def replay(self, events, q_start, q_stop, q_ts, outputs):
        """Apply ``events`` (sorted) and answer sorted spine rows [q_start, q_stop)."""
        q_slots = self.q_slots[q_start:q_stop]
        batch = None
        if events is not None and n_events(events):
            keys = events[self.view.key_column]
            # events without a storable key have no entity: the stream refuses them
            present = valid_keys(keys, self.view.entity.key_type)
            if not present.all():
                events = {name: values[present] for name, values in events.items()}
            batch = self._encoded(events)
        if batch is not None and len(batch):
            keys = batch.columns[self.view.key_column]
            if keys.dtype.kind == "f":
                keys = keys.astype(np.int64)
            slots = self.state.index.slots(keys)
            ts = batch.columns[self.ts_field]
        else:
            slots, ts, batch = np.empty(0, np.int64), np.empty(0, np.int64), None
        for arena in self.state.arenas.values():
            arena.reserve(len(self.state.index))
        for name in self.arena_names:
            values, mask = self.state.inputs(self.view.feature(name), batch) \
                if batch is not None else (None, None)
            result = _kernel(self.state.arenas[name], slots, ts, values, mask, q_slots, q_ts)
            outputs[(id(self.view), name)].put(q_start, result)
        seen = _kernel(self.state.arenas[EVENT_TIME], slots, ts,
                       ts.astype(np.float64), None, q_slots, q_ts)[1]
        self.seen[q_start:q_stop] = seen

    def _encoded(self, events):
        """The events (enriched by the view's joins) as the arenas take them;
        those the stream would refuse (a string whose code another string
        has) are left out, with a warning."""
        valid = None
        if self.enrich is not None:
            events, valid = self.enrich(events)
        batch = self.state.encode(events, valid)
        if not batch.refused:
            return batch
        reasons = sorted(set(batch.refused.values()))
        warnings.warn(f"view {self.view.name!r}: {len(batch.refused)} events left out of the "
                      f"training set, as the stream refuses them: {reasons[0]}"
                      + (f" (and {len(reasons) - 1} more reasons)" if len(reasons) > 1 else ""),
                      TrainingSetWarning, stacklevel=2)
        return batch.accepted()


def _kernel(arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts):
    if isinstance(arena, _arena.FeatureArena):
        return _arena.replay_scalar(arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts)
    if isinstance(arena, _arena.LastNArena):
        return _arena.replay_last_n(arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts)
    if isinstance(arena, _arena.DistinctCountArena):
        return _arena.replay_distinct_count(arena, ev_slots, ev_ts, ev_values, ev_mask,
                                            q_slots, q_ts)
    if isinstance(arena, _arena.TopKArena):
        return _arena.replay_top_k(arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts)
    return replay_generic(arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts)


class _SourceReplay:
    """The views reading one source: one event stream, merged with the spine."""

    def __init__(self, source, views, stream, sorted_ts, block):
        self.source = source
        self.views = views
        self.stream = iter(stream)
        self.sorted_ts = sorted_ts
        self.block = block
        self.qpos = 0
        self.buffer = None
        self.lookahead = self._next()
        self.events_read = 0

    def _next(self):
        chunk = next(self.stream, None)
        while chunk is not None and n_events(chunk) == 0:
            chunk = next(self.stream, None)
        return chunk

    def advance(self, q_end, outputs):
        """Answer sorted spine rows [qpos, q_end)."""
        ts_field = self.source.timestamp_field
        while self.qpos < q_end:
            if self.buffer is None or n_events(self.buffer) == 0:
                self.buffer, self.lookahead = self.lookahead, None
                if self.buffer is not None:
                    self.events_read += n_events(self.buffer)
                    self.lookahead = self._next()
            # rows earlier than every event not yet buffered can be answered
            bound = _INF if self.lookahead is None else int(self.lookahead[ts_field][0])
            answerable = int(np.searchsorted(self.sorted_ts, bound, "left")) \
                if bound != _INF else len(self.sorted_ts)
            q_hi = min(q_end, self.qpos + self.block, answerable)
            if q_hi > self.qpos:
                q_ts = self.sorted_ts[self.qpos:q_hi]
                events = None
                if self.buffer is not None:
                    cut = int(np.searchsorted(self.buffer[ts_field], q_ts[-1], "right"))
                    events = slice_columns(self.buffer, 0, cut)
                    self.buffer = slice_columns(self.buffer, cut)
                for replay in self.views:
                    replay.replay(events, self.qpos, q_hi, q_ts, outputs)
                self.qpos = q_hi
            else:
                # the whole buffer is earlier than the next spine row
                for replay in self.views:
                    replay.replay(self.buffer, self.qpos, self.qpos, self.sorted_ts[:0],
                                  outputs)
                self.buffer = None

    def close(self):
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()


class _Job:
    def __init__(self, spine, features, sources, views, registry, timestamp_column, keys,
                 pulsar, chunk_rows, spill_dir, progress, service=None):
        self.spine = read_spine(spine)
        self.n_rows = self.spine.num_rows
        self.progress = progress
        columns = None                         # a service names its columns
        self.service = None
        if service is not None:
            if features is not None:
                raise TrainingSetError("give features or service=, not both")
            features, columns = service_features(service, registry)
            self.service = _service(service, registry)
        pairs = resolve_features(features, views, registry)
        ts_name = timestamp_column or next(
            (c for c in TIMESTAMP_CANDIDATES if c in self.spine.schema.names), None)
        if ts_name is None or ts_name not in self.spine.schema.names:
            raise TrainingSetError(
                f"spine: no timestamp column {timestamp_column or ''!r}; name it with "
                f"timestamp_column= (columns: {self.spine.schema.names})")
        spine_ts = epoch_ms(self.spine.column(ts_name), ts_name)
        self.order = stable_order(spine_ts)
        self.sorted_ts = np.ascontiguousarray(spine_ts[self.order])

        # requested features, their output names, grouped by view and source
        requested = [_Requested(v, f) for v, f in pairs]
        names = [r.feature.name for r in requested]
        taken = set(self.spine.schema.names)
        for r in requested:
            clash = r.feature.name in taken or names.count(r.feature.name) > 1
            r.name = f"{r.view.name}__{r.feature.name}" if clash else r.feature.name
            if columns is not None:
                r.name = columns[(r.view.name, r.feature.name)]
            if r.name in taken:
                raise TrainingSetError(f"feature column {r.name!r} clashes with a spine "
                                       "column; rename the spine column")
            taken.add(r.name)
        self.requested = requested

        keys = dict(keys or {})
        view_replays, by_view = [], {}
        for r in requested:
            by_view.setdefault(id(r.view), (r.view, []))[1].append(r)
        tables = load_dimension_tables([v for v, _ in by_view.values()], sources, pulsar,
                                       chunk_rows, spill_dir)
        self.entity_columns = {}               # entity -> its spine key column
        for view, reqs in by_view.values():
            column = keys.get(view.name) or keys.get(view.entity.name)
            if column is None:
                column = next((c for c in (view.entity.name, view.key_column)
                               if c in self.spine.schema.names), None)
            if column is None or column not in self.spine.schema.names:
                raise TrainingSetError(
                    f"view {view.name!r}: the spine has no key column for entity "
                    f"{view.entity.name!r} (looked for {column or view.entity.name!r}); "
                    f"add one or map it with keys={{{view.entity.name!r}: 'column'}} "
                    f"(spine columns: {self.spine.schema.names})")
            key_values, key_present = _spine_keys(self.spine, column, view.entity.key_type,
                                                  f"view {view.name!r}")
            self.entity_columns[view.entity.name] = column
            view_replays.append(_ViewReplay(view, reqs, key_values, key_present, self.order,
                                            view.source.timestamp_field, tables))
        self.view_replays = view_replays
        self.computed = []
        if self.service is not None and self.service.computed:
            self.computed = compiled_computed(self.service, {v.name: v for v, _ in
                                                             by_view.values()})
            self._check_request_fields()
        self.outputs = {(id(replay.view), name): _Output(
                            _Requested(replay.view, replay.view.feature(name)), self.n_rows,
                            replay.state)
                        for replay in view_replays for name in replay.arena_names}

        # one event stream per source (views of one source share it)
        groups = {}
        for replay in view_replays:
            source = replay.view.source
            groups.setdefault(_source_key(source), (source, []))[1].append(replay)
        self.sources = []
        try:
            for source, replays in groups.values():
                columns = list(dict.fromkeys(c for r in replays for c in r.columns))
                spec = _source_spec(sources, source, [r.view for r in replays], pulsar)
                stream = open_events(spec, source, columns, chunk_rows, spill_dir)
                self.sources.append(_SourceReplay(source, replays, stream, self.sorted_ts,
                                                  DEFAULT_QUERY_BLOCK))
        except BaseException:
            self.close()
            raise

    def run(self, q_end):
        step = max(DEFAULT_QUERY_BLOCK, 1)
        done = min(s.qpos for s in self.sources) if self.sources else q_end
        while done < q_end:
            stop = min(q_end, done + step)
            for source in self.sources:
                source.advance(stop, self.outputs)
            done = stop
            if self.progress:
                self.progress(done, self.n_rows)

    def _feature_arrays(self, start, stop, take=None):
        """The requested features' arrays of rows [start, stop): derived
        ones computed from their inputs' (see ``with_derived``)."""
        arrays = {}
        for replay in self.view_replays:
            for name in replay.arena_names:
                arrays[(id(replay.view), name)] = self.outputs[(id(replay.view), name)].arrow(
                    start, stop, replay.seen, take)
            if replay.derived:
                columns = {name: _columns_of(arrays[(id(replay.view), name)])
                           for name in replay.arena_names}
                computed = with_derived(replay.view, columns, stop - start, replay.derived)
                # an entity without events has no record online: no derived value either
                seen = replay.seen[start:stop] if take is None else replay.seen[start:stop][take]
                for derived, expression in replay.derived:
                    values, valid = computed[derived.name]
                    valid = valid & seen
                    arrays[(id(replay.view), derived.name)] = pa.array(
                        values.tolist(), arrow_of(expression.type), mask=~valid)
        return [arrays[(id(r.view), r.feature.name)] for r in self.requested]

    def table(self):
        inverse = np.empty(self.n_rows, dtype=np.int64)
        inverse[self.order] = np.arange(self.n_rows)
        arrays = self._feature_arrays(0, self.n_rows, inverse)
        table = self.spine
        for name, array in self._with_computed(self.spine, arrays):
            table = table.append_column(pa.field(name, array.type), array)
        return table

    def time_batch(self, start, stop):
        rows = self.spine.take(pa.array(self.order[start:stop]))
        pairs = self._with_computed(rows, self._feature_arrays(start, stop))
        arrays = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
                  for c in rows.columns] + [array for _, array in pairs]
        names = rows.schema.names + [name for name, _ in pairs]
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def _with_computed(self, spine_rows, arrays):
        """``[(column, array)]``: the features, then the service's computed
        columns (``tally.core.request_features``) of these spine rows."""
        pairs = [(r.name, array) for r, array in zip(self.requested, arrays)]
        if not self.computed:
            return pairs
        columns = {}
        for r, array in zip(self.requested, arrays):
            columns[r.name] = columns[f"{r.view.name}.{r.feature.name}"] = _columns_of(array)
        for entity, column in self.entity_columns.items():
            columns[f"request.{entity}"] = _columns_of(_flat(spine_rows.column(column)))
        for name, _ in self.service.request:
            columns[f"request.{name}"] = _columns_of(_flat(spine_rows.column(name)))
        compute(self.computed, columns, spine_rows.num_rows)
        for entry, evaluator in self.computed:
            values, valid = columns[entry.name]
            pairs.append((entry.name, pa.array(values.tolist(), arrow_of(evaluator.type),
                                               mask=~valid)))
        return pairs

    def _check_request_fields(self):
        for name, _ in self.service.request:
            if name not in self.spine.schema.names:
                raise TrainingSetError(
                    f"feature service {self.service.name!r} reads request field {name!r}: "
                    f"add a spine column {name!r} (spine columns: {self.spine.schema.names})")

    def events_read(self):
        return sum(s.events_read for s in self.sources)

    def close(self):
        for source in getattr(self, "sources", ()):
            source.close()


def load_dimension_tables(views, sources=None, pulsar=None, chunk_rows=DEFAULT_CHUNK_ROWS,
                          spill_dir=None):
    """The views' dimension tables, each loaded with its whole history (its
    archive and, with ``pulsar``, its topic; or ``sources``, as for a training
    set): an event sees the version of its time, as the stream's table gives
    it. A training set and a bootstrap join their events with these."""
    tables = tables_for(views)
    for key, join in dimensions_of(views).items():
        dimension = join.dimension
        spec = _source_spec(sources, dimension, [], pulsar)
        stream = open_events(spec, dimension, dimension.fields, chunk_rows, spill_dir)
        try:
            for chunk in stream:
                tables[key].add(chunk)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    return tables


def _source_key(source):
    return tuple(sorted((k, str(v)) for k, v in source.to_dict().items()))


def _source_spec(sources, source, views, pulsar):
    """Where ``source``'s events come from (see training_set)."""
    if sources is not None:
        names = [source.name] + [v.name for v in views] + [source.topic]
        if not isinstance(sources, dict) or is_columns(sources, source, names):
            return sources
        for name in names:
            if name in sources:
                return sources[name]
    if source.archive and pulsar is not None:
        return archive_and_topic(source.archive, pulsar, source)
    defaults = [spec for spec in (source.archive, pulsar) if spec is not None]
    if not defaults:
        raise TrainingSetError(
            f"source {source.name!r}: no events; pass sources={{{source.name!r}: ...}} (a "
            "DataFrame, a Parquet path or a PulsarTopic), give the source an archive, or "
            "pass pulsar='pulsar://host:6650' to read its topic")
    return defaults if len(defaults) > 1 else defaults[0]









