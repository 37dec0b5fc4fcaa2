"""A Pulsar topic as an event source for training sets (``tally.core.event_sources``).

Every partition is read from the earliest message to the last one that
existed at call time; payloads are decoded and checked by the stream's own
rules (``tally.core.events``: bad payloads are left out, as the stream
dead-letters them). A partition is in log order, not time order, so its
events are sorted externally. With the broker's admin URL the topic is read
like a bootstrap: cut at its last entries, split into work units that reader
processes decode and sort in parallel, the sorted runs merged in log order.
"""
import os
import shutil
import tempfile

from tally.core import events as rules
from tally.core.event_sources import (DEFAULT_CHUNK_ROWS, concat_columns, external_sort,
                                      merge_sorted, n_events, read_run, sort_columns,
                                      spill_empty_run, spill_run)
from tally.service.history.readers import fold_unit, plan_topic_units, read_units
from tally.service.pulsar.cluster import Cluster, as_cluster
from tally.service.pulsar.client import connect, last_message_position, partition_topics, raw
from tally.service.pulsar.topics import message_position, message_times


class PulsarTopic:
    """A source's topic, read from the earliest message to the end at call time.

    ``pulsar`` is a ``Cluster``, a service URL (``pulsar://127.0.0.1:6650``)
    or a ``pulsar.Client``; ``topic`` overrides the source's topic. With an
    admin URL (the cluster's, or ``admin_url``) the topic is read in parallel
    by ``readers`` processes (default: the cores)."""

    def __init__(self, pulsar, topic=None, batch_messages=10_000, timeout_ms=30_000,
                 admin_url=None, readers=None):
        # a client is used as given; settings become one Cluster
        self.pulsar = pulsar if hasattr(pulsar, "subscribe") else as_cluster(pulsar, admin_url)
        self.topic = topic
        self.batch_messages = batch_messages
        self.timeout_ms = timeout_ms
        self.readers = readers
        self.messages = 0
        self.rejected = 0

    def __repr__(self):
        return f"PulsarTopic({self._cluster.service_url if self._cluster else 'client'!r})"

    @property
    def _cluster(self):
        return self.pulsar if isinstance(self.pulsar, Cluster) else None

    def sorted_chunks(self, source, columns, chunk_rows=DEFAULT_CHUNK_ROWS, spill_dir=None):
        if self._cluster and self._cluster.admin_url:
            return self._parallel_sorted_chunks(source, columns, chunk_rows, spill_dir)
        return external_sort(self.batches(source, columns), source.timestamp_field,
                             chunk_rows, spill_dir)

    def _parallel_sorted_chunks(self, source, columns, chunk_rows, spill_dir):
        topic = self.topic or source.topic
        directory = tempfile.mkdtemp(prefix="tally-topic-", dir=spill_dir)
        try:
            units, store = plan_topic_units(self._cluster, topic, self.readers)
            paths = [os.path.join(directory, f"unit-{i}.arrow") for i in range(len(units))]
            tasks = [(sorted_unit_run, source, columns, self._cluster, topic, unit, path, store)
                     for unit, path in zip(units, paths)]
            for counts in read_units(tasks, self.readers).values():
                self.messages += counts["messages"]
                self.rejected += counts["rejected"]
            # log order among equal times: units of a partition are in log order
            yield from merge_sorted([read_run(path) for path in paths],
                                    source.timestamp_field, chunk_rows)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def batches(self, source, columns):
        """Decoded batches (dicts of numpy columns) in log order, partition by
        partition."""
        client, own = self.pulsar, False
        if self._cluster:
            client, own = connect(self._cluster), True
        try:
            for partition in partition_topics(client, self.topic or source.topic):
                yield from self._read_partition(client, partition, source, columns)
        finally:
            if own:
                client.close()

    def _read_partition(self, client, topic, source, columns):
        import pulsar
        end = last_message_position(client, topic)
        if end is None:
            return
        reader = client.create_reader(topic, pulsar.MessageId.earliest,
                                      receiver_queue_size=min(self.batch_messages, 10_000))
        receiver = raw(reader)
        try:
            messages, done = [], False
            while not done:
                message = receiver.read_next(self.timeout_ms)
                messages.append(message)
                done = message_position(message) >= end
                if len(messages) >= self.batch_messages or done:
                    yield self._decode([m.data() for m in messages],
                                       message_times(messages, source), source, columns)
                    messages = []
        finally:
            reader.close()

    def _decode(self, payloads, times, source, columns):
        self.messages += len(payloads)
        decoded, rejected = decode_valid(payloads, times, source, columns)
        self.rejected += rejected
        return decoded


def sorted_unit_run(source, columns, cluster, topic, unit, path, store=None):
    """In a reader process: decode one work unit's messages, sort them by
    time (stably: log order among equal times) and spill them as a run.
    Malformed entries of offloaded ledgers count as refused payloads."""
    def fold(batches):
        counts, parts = {"messages": 0, "rejected": 0}, []
        for payloads, times, malformed in batches:
            counts["rejected"] += sum(malformed.values())
            if payloads:
                decoded, rejected = decode_valid(payloads, times, source, columns)
                counts["messages"] += len(payloads)
                counts["rejected"] += rejected
                parts.append(decoded)
        return counts, [p for p in parts if n_events(p)]
    (counts, parts), _ = fold_unit(cluster, topic, unit, source, store, fold)
    if parts:
        spill_run(sort_columns(concat_columns(parts), source.timestamp_field), path)
    else:
        spill_empty_run(source, columns, path)
    return counts


def decode_valid(payloads, times, source, columns):
    """``(columns, refused)``: the named columns of the payloads' valid events,
    and how many payloads were refused, by the stream's rules; ``times``: the
    messages' own times the source takes (the stream's, so a training set
    sees the times the service folded)."""
    events = rules.decode_payloads(payloads, source, message_times=times)
    return {name: events.columns[name] for name in columns}, len(events.rejects)
