"""Where a training set's events come from: a Parquet archive, a Pulsar topic,
or both, delivered to the replay (``tally.core.training``) as time-sorted
chunks of numpy columns.

* **Archive** (``Source.archive``: a local path or any pyarrow filesystem URI,
  e.g. ``s3://bucket/read_events/``): read with ``pyarrow.dataset``, only the
  needed columns. If the row groups' time statistics show a time-sorted
  archive (each row group's [min, max] after the previous one's, in file
  order), row groups are streamed in order, several read ahead in parallel,
  each sorted locally: memory is a few row groups. Otherwise the dataset is
  scanned in parallel and sorted externally (below).
* **Topic**: every partition read with a Reader (a non-durable read: no
  subscription, nothing acknowledged) from the earliest message to the last
  message that existed at call time; payloads decoded by the online path's
  decoder, bad payloads and impossible times dropped as the pipeline drops
  them (it dead-letters them). A partition is in log order, not time order,
  so topic events are sorted externally.
* **External sort**: events are cut into runs of ``chunk_rows``, each sorted
  stably by time; a single run stays in memory, more are spilled to Arrow IPC
  files (``spill_dir``, default a temporary directory, removed afterwards) in
  blocks of ``BLOCK_ROWS`` and merged by blocks: memory is one run while
  reading, then about ``chunk_rows`` + one block per run while merging.

Among events with equal times, the order is log order: the archive before
the topic, and within the topic each partition's order (an entity's events
all live in one partition, which is all the arenas depend on).
"""
import concurrent.futures
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa

from tally.core.arena import MAX_EVENT_TIME, MIN_EVENT_TIME
from tally.core.training import (DEFAULT_CHUNK_ROWS, TrainingSetError,
                                 arrow_event_columns, concat_columns, in_memory_chunks,
                                 merge_sorted, n_events, sort_columns)

BLOCK_ROWS = 1 << 16          # rows per block of a spilled run
READ_AHEAD = 4                # archive row groups read in parallel ahead of the replay


# --------------------------------------------------------------------------
# Dispatch


def open_events(spec, source, columns, chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None):
    """Time-sorted chunks of ``source``'s ``columns`` from ``spec``: a Parquet
    path or URI, a ``PulsarTopic``, a ``pulsar://`` URL, or a list of these."""
    if isinstance(spec, (list, tuple)):
        return merge_sorted([open_events(s, source, columns, chunk_rows, spill_dir)
                             for s in spec], source.timestamp_field, chunk_rows)
    if isinstance(spec, (PulsarTopic, TimeSlice)):
        return spec.sorted_chunks(source, columns, chunk_rows=chunk_rows, spill_dir=spill_dir)
    if isinstance(spec, str) and spec.startswith(("pulsar://", "pulsar+ssl://")):
        return PulsarTopic(spec).sorted_chunks(source, columns, chunk_rows=chunk_rows,
                                               spill_dir=spill_dir)
    if isinstance(spec, (str, os.PathLike)):
        return archive_events(os.fspath(spec), source, columns, chunk_rows, spill_dir)
    raise TrainingSetError(f"source {source.name!r}: {spec!r} is not an events table, a "
                           "Parquet path or URI, or a PulsarTopic")


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
                runs.append(_spill(sort_columns(concat_columns(current), ts_field),
                                   os.path.join(directory, f"run-{len(runs)}.arrow")))
                current, size = [], 0
        tail = sort_columns(concat_columns(current), ts_field) if current else None
        if not runs:
            if tail is not None:
                yield from in_memory_chunks(tail, ts_field, chunk_rows)
            return
        streams = [_read_run(path) for path in runs]
        if tail is not None:
            streams.append(in_memory_chunks(tail, ts_field, BLOCK_ROWS))
        yield from merge_sorted(streams, ts_field, chunk_rows)
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def _spill(columns, path):
    table = _to_arrow(columns)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=BLOCK_ROWS)
    return path


def _to_arrow(columns):
    return pa.table({name: pa.array(values, from_pandas=True) if values.dtype == object
                     else values for name, values in columns.items()})


def _read_run(path):
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


# --------------------------------------------------------------------------
# Parquet archive


def archive_events(path, source, columns, chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None):
    """Time-sorted chunks of a Parquet dataset (path or filesystem URI)."""
    import pyarrow.dataset as ds
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
    batches = (arrow_event_columns(batch, source, columns)
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
        return sort_columns(arrow_event_columns(group.to_table(columns=columns), source,
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
    from it on (``tally.service.history.plan``: the same rule as the bootstrap)."""
    from tally.service.history.plan import archive_boundary
    boundary = archive_boundary(archive, source.timestamp_field)
    return [TimeSlice(archive, end_ms=boundary), TimeSlice(topic, start_ms=boundary)]


# --------------------------------------------------------------------------
# Pulsar topic


class PulsarTopic:
    """A source's topic, read from the earliest message to the end at call time.

    ``pulsar`` is a service URL (``pulsar://127.0.0.1:6650``) or a
    ``pulsar.Client``; ``topic`` overrides the source's topic. With
    ``admin_url`` (the broker's admin REST URL) and a service URL, the topic
    is read like a bootstrap: cut at its last entries, split into work units
    that ``readers`` processes (default: the cores) decode and sort in
    parallel, the sorted runs merged in log order."""

    def __init__(self, pulsar, topic=None, batch_messages=10_000, timeout_ms=30_000,
                 admin_url=None, readers=None):
        self.pulsar = pulsar
        self.topic = topic
        self.batch_messages = batch_messages
        self.timeout_ms = timeout_ms
        self.admin_url, self.readers = admin_url, readers
        self.messages = 0
        self.rejected = 0

    def __repr__(self):
        return f"PulsarTopic({self.pulsar if isinstance(self.pulsar, str) else 'client'!r})"

    def sorted_chunks(self, source, columns, chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None):
        if self.admin_url and isinstance(self.pulsar, str):
            return self._parallel_sorted_chunks(source, columns, chunk_rows, spill_dir)
        return external_sort(self.batches(source, columns), source.timestamp_field,
                             chunk_rows, spill_dir)

    def _parallel_sorted_chunks(self, source, columns, chunk_rows, spill_dir):
        from tally.service.history.readers import plan_topic_units, read_units
        topic = self.topic or source.topic
        directory = tempfile.mkdtemp(prefix="tally-topic-", dir=spill_dir)
        try:
            units = plan_topic_units(self.admin_url, topic, self.readers)
            paths = [os.path.join(directory, f"unit-{i}.arrow") for i in range(len(units))]
            tasks = [(sorted_unit_run, source, columns, self.pulsar, self.admin_url, topic,
                      unit, path) for unit, path in zip(units, paths)]
            for counts in read_units(tasks, self.readers).values():
                self.messages += counts["messages"]
                self.rejected += counts["rejected"]
            # log order among equal times: units of a partition are in log order
            yield from merge_sorted([_read_run(path) for path in paths],
                                    source.timestamp_field, chunk_rows)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def batches(self, source, columns):
        """Decoded batches (dicts of numpy columns) in log order, partition by
        partition."""
        client, own = self.pulsar, False
        if isinstance(client, str):
            from tally.service.pulsar.client import connect
            client, own = connect(client), True
        try:
            topic = self.topic or source.topic
            for partition in client.get_topic_partitions(topic):
                yield from self._read_partition(client, partition, source, columns)
        finally:
            if own:
                client.close()

    def _read_partition(self, client, topic, source, columns):
        import pulsar
        end = _last_message_position(client, topic)
        if end is None:
            return
        reader = client.create_reader(topic, pulsar.MessageId.earliest,
                                      receiver_queue_size=min(self.batch_messages, 10_000))
        raw = reader._reader
        try:
            payloads, done = [], False
            while not done:
                message = raw.read_next(self.timeout_ms)
                payloads.append(message.data())
                mid = message.message_id()
                done = (mid.ledger_id(), mid.entry_id(), mid.batch_index()) >= end
                if len(payloads) >= self.batch_messages or done:
                    yield self._decode(payloads, source, columns)
                    payloads = []
        finally:
            reader.close()

    def _decode(self, payloads, source, columns):
        self.messages += len(payloads)
        decoded, rejected = _decode_checked(payloads, source, columns)
        self.rejected += rejected
        return decoded


def sorted_unit_run(source, columns, pulsar_url, admin_url, topic, unit, path):
    """In a reader process: decode one work unit's messages, sort them by
    time (stably: log order among equal times) and spill them as a run."""
    from tally.service.history.readers import client_for, unit_payloads
    counts = {"messages": 0, "rejected": 0}
    parts = []
    for payloads in unit_payloads(client_for(pulsar_url), admin_url, topic, unit):
        if payloads:
            decoded, rejected = _decode_checked(payloads, source, columns)
            counts["messages"] += len(payloads)
            counts["rejected"] += rejected
            parts.append(decoded)
    parts = [p for p in parts if n_events(p)]
    if parts:
        _spill(sort_columns(concat_columns(parts), source.timestamp_field), path)
    else:
        _spill_empty(source, columns, path)
    return counts


def _decode_checked(payloads, source, columns):
    """Decoded columns of payloads without impossible times, and the number
    of payloads and events refused (as the pipeline refuses them)."""
    decoded, rejects = decode_payloads(payloads, source)
    ts = decoded[source.timestamp_field]
    bad = (ts < MIN_EVENT_TIME) | (ts > MAX_EVENT_TIME)
    if bad.any():
        decoded = {name: values[~bad] for name, values in decoded.items()}
    return {name: decoded[name] for name in columns}, rejects + int(bad.sum())


def _spill_empty(source, columns, path):
    types = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
             "string": pa.string()}
    schema = pa.schema([(c, types.get(source.field_type(c), pa.float64())) for c in columns])
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema):
        pass


def _last_message_position(client, topic):
    """(ledger, entry, batch index) of the partition's last message now, or
    None if it is empty: a reader started inclusively at ``latest`` is
    positioned on the last message."""
    import pulsar
    reader = client.create_reader(topic, pulsar.MessageId.latest,
                                  start_message_id_inclusive=True)
    try:
        if not reader.has_message_available():
            return None
        mid = reader._reader.read_next(30_000).message_id()
        return (mid.ledger_id(), mid.entry_id(), mid.batch_index())
    finally:
        reader.close()


def decode_payloads(payloads, source):
    """(columns, rejected count) of raw payloads in the source's format, with
    the online path's decoder: ``tally.core.formats.decode_payloads`` where it
    exists, else the msgpack decoder."""
    try:
        from tally.core import formats
    except ImportError:
        formats = None
    if formats is not None and hasattr(formats, "decode_payloads"):
        batch = formats.decode_payloads(payloads, source)
    else:
        if source.format != "msgpack":
            raise TrainingSetError(f"source {source.name!r}: format {source.format!r} "
                                   "cannot be decoded by this version; read its archive")
        from tally.core.decode import Schema, decode_msgpack_maps
        batch = decode_msgpack_maps(payloads, Schema(list(source.schema)))
    return batch.columns, len(batch.rejects)


__all__ = ["PulsarTopic", "TimeSlice", "archive_and_topic", "archive_events", "decode_payloads",
           "external_sort", "open_events"]
