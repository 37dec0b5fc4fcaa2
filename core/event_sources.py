"""Where a training set's events come from: event sources, and the
time-sorted chunks the replay (``tally.core.training``) consumes.

An **event source** is anything with a method
``sorted_chunks(source, columns, chunk_rows, spill_dir)`` yielding the events
of a ``Source`` as dicts of numpy columns (those named), sorted by event time
(stable: log order among equal times), in chunks of about ``chunk_rows``.
This module has the in-memory and Parquet ones and the tools to build more;
``tally.service.history.topic.PulsarTopic`` reads a topic. :func:`open_events`
turns anything a user may pass (a table, a Parquet path or URI, an event
source, a list of these) into one such stream.

* **In memory** (a dict of arrays, a DataFrame, an Arrow table): sorted once.
* **Parquet archive** (``Source.archive``: a local path or any pyarrow
  filesystem URI): read with ``pyarrow.dataset``, only the needed columns. If
  the row groups' time statistics show a time-sorted archive (each row
  group's [min, max] after the previous one's, in file order), row groups are
  streamed in order, several read ahead in parallel, each sorted locally:
  memory is a few row groups. Otherwise the dataset is scanned in parallel and
  sorted externally (below).
* **External sort** (:func:`external_sort`): events are cut into runs of
  ``chunk_rows``, each sorted stably by time; a single run stays in memory,
  more are spilled to Arrow IPC files (``spill_dir``, default a temporary
  directory, removed afterwards) in blocks of ``BLOCK_ROWS`` and merged by
  blocks: memory is one run while reading, then about ``chunk_rows`` + one
  block per run while merging.

Rows break the rules of ``tally.core.events`` are dropped as they are read
(the stream dead-letters them). Among events with equal times, the order is
log order: the archive before the topic (:func:`archive_and_topic`), and
within a topic each partition's order.
"""
import concurrent.futures
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from tally.core import events as rules
from tally.core.archive import archive_boundary
from tally.core.errors import TrainingSetError

DEFAULT_CHUNK_ROWS = 1 << 20          # events per replayed chunk
BLOCK_ROWS = 1 << 16                  # rows per block of a spilled run
READ_AHEAD = 4                        # archive row groups read in parallel ahead of the replay
_INF = np.iinfo(np.int64).max


def open_events(spec, source, columns, chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None):
    """Time-sorted chunks of ``source``'s ``columns`` from ``spec``: an in-memory
    table, a Parquet path or URI, an event source, or a list of these (merged
    in time order; among equal times, earlier list items first)."""
    if isinstance(spec, (list, tuple)):
        return merge_sorted([open_events(s, source, columns, chunk_rows, spill_dir)
                             for s in spec], source.timestamp_field, chunk_rows)
    if is_table(spec):
        return in_memory_chunks(valid_columns(spec, source, columns), source.timestamp_field,
                                chunk_rows)
    if hasattr(spec, "sorted_chunks"):
        return spec.sorted_chunks(source, columns, chunk_rows=chunk_rows, spill_dir=spill_dir)
    if isinstance(spec, str) and "://" in spec and spec.split("://")[0].startswith("pulsar"):
        raise TrainingSetError(f"source {source.name!r}: {spec!r} is a broker URL; read the "
                               "topic with tally.training_set(..., pulsar=...) or a PulsarTopic")
    if isinstance(spec, (str, os.PathLike)):
        return archive_events(os.fspath(spec), source, columns, chunk_rows, spill_dir)
    raise TrainingSetError(f"source {source.name!r}: {spec!r} is not an events table, a "
                           "Parquet path or URI, or an event source")


def valid_columns(data, source, columns):
    """The numpy columns of a table's rows that follow the rules of
    ``tally.core.events`` (others are dropped, as the stream refuses them)."""
    return rules.drop_invalid(rules.table_columns(data, source, columns), source)[0]


def is_columns(value, source=None, names=()):
    """A dict of event columns (rather than a dict of sources by name)."""
    if not isinstance(value, dict) or not value or any(n in value for n in names):
        return False
    if source is not None and source.timestamp_field in value:
        return True
    return all(isinstance(v, (np.ndarray, pa.Array, pa.ChunkedArray)) for v in value.values())


def is_table(value):
    if isinstance(value, (pa.Table, pa.RecordBatch)) or is_columns(value):
        return True
    return type(value).__name__ == "DataFrame"


# --------------------------------------------------------------------------
# Columns


def stable_order(ts):
    """``np.argsort(ts, kind="stable")``, faster: when the time range leaves
    room, each time is packed with its index into one int64 (time in the high
    bits, so ties order by index) and the packed values are sorted in place."""
    ts = np.asarray(ts, dtype=np.int64)
    n = len(ts)
    if n < 2:
        return np.arange(n)
    bits = int(n - 1).bit_length()
    low, high = int(ts.min()), int(ts.max())
    if high - low >= 1 << (62 - bits):
        return np.argsort(ts, kind="stable")
    packed = ((ts - low) << bits) | np.arange(n, dtype=np.int64)
    packed.sort()
    return packed & ((1 << bits) - 1)


def sort_columns(columns, ts_field):
    """The columns sorted by time, stable (ties keep their order)."""
    ts = columns[ts_field]
    if len(ts) < 2 or not np.any(np.diff(ts) < 0):
        return columns
    order = stable_order(ts)
    return {name: values[order] for name, values in columns.items()}


def slice_columns(columns, start, stop=None):
    return {name: values[start:stop] for name, values in columns.items()}


def concat_columns(parts):
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def n_events(columns):
    return len(next(iter(columns.values()))) if columns else 0


def in_memory_chunks(columns, ts_field, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Time-sorted chunks of an in-memory table (sorted once, stably)."""
    columns = sort_columns(columns, ts_field)
    n = n_events(columns)
    for start in range(0, n, chunk_rows):
        yield slice_columns(columns, start, start + chunk_rows)


def merge_sorted(streams, ts_field, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Merge time-sorted chunk streams into one, in time order; among equal
    times, the earlier stream's events first (so pass streams in log order:
    the archive before the topic). Holds about ``chunk_rows`` plus one chunk
    per stream (more only while one stream repeats a single time)."""
    streams = [iter(s) for s in streams]
    if len(streams) == 1:
        yield from streams[0]
        return
    k = len(streams)
    buffers = [None] * k              # loaded, not yet emitted rows of each stream
    done = [False] * k
    lowest = np.iinfo(np.int64).min

    def size(i):
        return 0 if buffers[i] is None else n_events(buffers[i])

    def frontier(i):
        """No row of stream i that is not loaded yet is earlier than this."""
        if done[i]:
            return _INF
        return lowest if size(i) == 0 else int(buffers[i][ts_field][-1])

    def load_lagging():
        i = min((j for j in range(k) if not done[j]), key=lambda j: (frontier(j), j))
        chunk = next(streams[i], None)
        if chunk is None:
            done[i] = True
        elif n_events(chunk):
            buffers[i] = chunk if size(i) == 0 else concat_columns([buffers[i], chunk])

    while True:
        while sum(size(i) for i in range(k)) < chunk_rows and not all(done):
            load_lagging()
        bound = min(frontier(i) for i in range(k))
        parts = []
        for i in range(k):
            if size(i) == 0:
                continue
            cut = size(i) if bound == _INF else \
                int(np.searchsorted(buffers[i][ts_field], bound, "left"))
            if cut:
                parts.append(slice_columns(buffers[i], 0, cut))
                buffers[i] = slice_columns(buffers[i], cut)
        if parts:
            yield sort_columns(concat_columns(parts), ts_field)
        elif all(done):
            return
        else:
            load_lagging()        # nothing is surely earlier than the lagging stream yet


# --------------------------------------------------------------------------
# External sort


def external_sort(batches, ts_field, chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None):
    """Time-sorted chunks of unsorted ``batches`` (dicts of numpy columns, in
    log order), stable: runs of ``chunk_rows`` sorted in memory, spilled to
    disk when there is more than one, then merged block by block."""
    runs, current, size, directory = [], [], 0, None
    try:
        for batch in batches:
            if not n_events(batch):
                continue
            current.append(batch)
            size += n_events(batch)
            if size >= chunk_rows:
                directory = directory or tempfile.mkdtemp(prefix="tally-sort-", dir=spill_dir)
                runs.append(spill_run(sort_columns(concat_columns(current), ts_field),
                                   os.path.join(directory, f"run-{len(runs)}.arrow")))
                current, size = [], 0
        tail = sort_columns(concat_columns(current), ts_field) if current else None
        if not runs:
            if tail is not None:
                yield from in_memory_chunks(tail, ts_field, chunk_rows)
            return
        streams = [read_run(path) for path in runs]
        if tail is not None:
            streams.append(in_memory_chunks(tail, ts_field, BLOCK_ROWS))
        yield from merge_sorted(streams, ts_field, chunk_rows)
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def spill_run(columns, path):
    table = _to_arrow(columns)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=BLOCK_ROWS)
    return path


def _to_arrow(columns):
    return pa.table({name: pa.array(values, from_pandas=True) if values.dtype == object
                     else values for name, values in columns.items()})


def read_run(path):
    with pa.memory_map(path) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            yield {name: _column_numpy(batch.column(j))
                   for j, name in enumerate(batch.schema.names)}


def _column_numpy(array):
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return np.asarray(array.to_numpy(zero_copy_only=False), dtype=object)
    return array.to_numpy(zero_copy_only=False)


def spill_empty_run(source, columns, path):
    types = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
             "string": pa.string()}
    schema = pa.schema([(c, types.get(source.field_type(c), pa.float64())) for c in columns])
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema):
        pass


# --------------------------------------------------------------------------
# Parquet archive


def archive_events(path, source, columns, chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None):
    """Time-sorted chunks of a Parquet dataset (path or filesystem URI)."""
    try:
        dataset = ds.dataset(path, format="parquet")
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as error:
        raise TrainingSetError(f"source {source.name!r}: archive {path!r}: {error}") from None
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise TrainingSetError(f"source {source.name!r}: archive {path!r} lacks columns "
                               f"{missing} (it has {dataset.schema.names})")
    row_groups = _sorted_row_groups(dataset, source.timestamp_field)
    if row_groups is not None:
        return _stream_row_groups(row_groups, source, columns, chunk_rows)
    batches = (valid_columns(batch, source, columns)
               for batch in dataset.to_batches(columns=columns, use_threads=True))
    return external_sort(batches, source.timestamp_field, chunk_rows, spill_dir)


def _sorted_row_groups(dataset, ts_field):
    """The dataset's row groups in file order if their time ranges follow each
    other (each min >= the previous max), else None."""
    pieces, previous_max = [], None
    for fragment in dataset.get_fragments():
        try:
            groups = fragment.split_by_row_group()
        except (AttributeError, pa.ArrowInvalid, OSError):
            return None
        for group in groups:
            info = group.row_groups[0]
            stats = (info.statistics or {}).get(ts_field)
            if not stats or stats.get("min") is None or stats.get("max") is None:
                if info.num_rows == 0:
                    continue
                return None
            low, high = _stat_ms(stats["min"]), _stat_ms(stats["max"])
            if previous_max is not None and low < previous_max:
                return None
            previous_max = high
            pieces.append(group)
    return pieces


def _stat_ms(value):
    if hasattr(value, "timestamp"):           # a datetime from timestamp statistics
        return int(value.timestamp() * 1000)
    return int(value)


def _stream_row_groups(row_groups, source, columns, chunk_rows):
    ts_field = source.timestamp_field

    def read(group):
        return sort_columns(valid_columns(group.to_table(columns=columns), source,
                                                columns), ts_field)

    with concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:
        pending, parts, size = [], [], 0
        groups = iter(row_groups)
        for group in groups:
            pending.append(pool.submit(read, group))
            if len(pending) >= READ_AHEAD:
                break
        while pending:
            columns_read = pending.pop(0).result()
            following = next(groups, None)
            if following is not None:
                pending.append(pool.submit(read, following))
            parts.append(columns_read)
            size += n_events(columns_read)
            if size >= chunk_rows:
                yield concat_columns(parts)
                parts, size = [], 0
        if parts:
            yield concat_columns(parts)


# --------------------------------------------------------------------------
# Archive and topic together


class TimeSlice:
    """The events of ``spec`` (anything ``open_events`` reads) with event time
    in [start_ms, end_ms): how an archive and its topic meet without overlap."""

    def __init__(self, spec, start_ms=None, end_ms=None):
        self.spec, self.start_ms, self.end_ms = spec, start_ms, end_ms

    def __repr__(self):
        return f"TimeSlice({self.spec!r}, {self.start_ms}, {self.end_ms})"

    def sorted_chunks(self, source, columns, chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None):
        ts_field = source.timestamp_field
        for chunk in open_events(self.spec, source, columns, chunk_rows, spill_dir):
            ts = chunk[ts_field]
            keep = np.ones(len(ts), dtype=bool)
            if self.start_ms is not None:
                keep &= ts >= self.start_ms
            if self.end_ms is not None:
                keep &= ts < self.end_ms
            if keep.any():
                yield chunk if keep.all() else {k: v[keep] for k, v in chunk.items()}


def archive_and_topic(archive, topic, source):
    """The archive's events before its declared boundary, then the topic's
    (an event source) from it on: the bootstrap's rule (``tally.core.archive``)."""
    boundary = archive_boundary(archive, source.timestamp_field)
    return [TimeSlice(archive, end_ms=boundary), TimeSlice(topic, start_ms=boundary)]
