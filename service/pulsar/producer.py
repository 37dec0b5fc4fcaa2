"""Producing events to a source topic, keyed by entity.

Two producers write a source topic:

* :class:`EventProducer` sends one event per message (a msgpack map; or any
  payload via ``send_payload``);
* :class:`ColumnarProducer` sends many events per message, as columnar
  batches (``arrow`` or ``msgpack-columnar``, see :mod:`tally.core.formats`):
  ``send_columns({"user": [...], "readtime": [...], "ts": [...]})``.

The partitioning invariant
--------------------------
State is sharded by topic partition: the worker that owns partition *p* holds
the whole state of every entity routed to *p*. So **an entity's events must
always land on the same partition, whichever producer wrote them**, and the
service checks every event (``tally.service.ingest.fold.RoutingCheck``). Both
producers route a key by the scheme its source declares (``Source.routing``,
:mod:`tally.core.routing`), over the partition key ``str(key)`` (the decimal
form of an integer key)::

    murmur3 (default):    (murmur3_x86_32(utf8(key)) & 0x7fffffff) % n_partitions
    java_string_hash:     (String.hashCode(key) & 0x7fffffff) % n_partitions

which are Pulsar's ``Murmur3_32Hash`` and ``JavaStringHash`` schemes: a Java,
Go or C++ producer configured with that ``hashingScheme`` and
``partition_key=str(key)`` routes the same way (the Java client's default is
``JavaStringHash``). Each producer opens one producer per partition topic
(``<topic>-partition-<i>``) and sends each message to the partition it
computed; every message still carries a partition key (the event's key, or
for a columnar message the key of its first event).

Why not the client's own routing: pulsar-client for Python (3.13) exposes no
``hashing_scheme``; its keyed routing uses the C++ client's default,
``BoostHash`` (boost::hash of the key, which depends on the Boost version the
wheel was built with, and no other client implements), and a columnar message
holds many keys, so its partition has to be computed by the producer anyway.
A Python ``message_router`` callback was measured ~3x slower per message
than routing ourselves (a GIL hand-off per message), so we route ourselves.
``ColumnarProducer`` hashes a whole column at once (:func:`partitions_of`).

The partition count is read when a producer opens. Changing a topic's
partition count moves keys between partitions, i.e. re-shards the state: it
needs a re-bootstrap of the views on that topic, and producers restarted.
"""
import _pulsar
import msgpack
import numpy as np
import pulsar
import pyarrow as pa

from tally.core.errors import TallyError
from tally.core.formats import ARROW, COLUMNAR_FORMATS, encode_columns
from tally.core.routing import partition_of, partitions_of, routing_code
from tally.service.pulsar.client import partition_topics, raw

# A Python callback per message costs a GIL hand-off from the client's I/O
# thread: it cut the send rate ~5x here (25k/s against 128k/s without). The
# client fails every pending message when a send fails (timeout, closed
# producer), so a callback on every CALLBACK_EVERY-th message of each
# partition's producer still observes any failure, and flush() surfaces one in
# the tail.
CALLBACK_EVERY = 256


class ProduceError(TallyError, RuntimeError):
    """The broker did not persist some events."""


# --------------------------------------------------------------------------
# One producer per partition


class PartitionProducers:
    """One Pulsar producer per partition of ``topic`` (the topic itself if it
    is not partitioned), indexed by partition."""

    def __init__(self, client, topic, **options):
        self.topic = topic
        names = partition_topics(client, topic)
        self.producers = [client.create_producer(name, **options) for name in names]
        self.raw = [raw(p) for p in self.producers]
        self.sent = [0] * len(names)
        self.failure = None

    def __len__(self):
        return len(self.producers)

    def send(self, partition, payload, key, event_time=None):
        builder = _pulsar.MessageBuilder()
        builder.content(payload)
        builder.partition_key(key)
        if event_time is not None:
            builder.event_timestamp(event_time)
        self.sent[partition] += 1
        callback = self._on_result if self.sent[partition] % CALLBACK_EVERY == 0 else None
        self.raw[partition].send_async(builder.build(), callback)

    def _on_result(self, result, _message_id):
        if result != pulsar.Result.Ok and self.failure is None:
            self.failure = result

    def flush(self):
        """Wait until every message sent so far is persisted; raise if any was not."""
        for producer in self.producers:
            producer.flush()
        if self.failure is not None:
            raise ProduceError(f"publishing to {self.topic!r} failed: {self.failure}")

    def close(self):
        try:
            self.flush()
        finally:
            for producer in self.producers:
                producer.close()


class EventProducer:
    """Sends events (dicts) to a topic, one msgpack map per message, each keyed
    by its entity and routed by ``routing`` (the source's, see the module
    docstring), so that one entity's events land on one partition, in order."""

    # Keys seen recently -> partition: routing one key costs ~1 us from Python.
    CACHE_SIZE = 1 << 20

    def __init__(self, client, topic, key_field, routing="murmur3"):
        routing_code(routing)                  # an unknown scheme fails here, not per event
        self.key_field, self.routing = key_field, routing
        self.topic = topic
        self.producer = PartitionProducers(
            client, topic, batching_enabled=True, batching_max_messages=1000,
            batching_max_publish_delay_ms=5, block_if_queue_full=True,
            max_pending_messages=50_000)
        self.n_partitions = len(self.producer)
        self._partitions = {}

    def send(self, event):
        self.send_payload(msgpack.packb(event), event[self.key_field])

    def send_payload(self, payload, key, event_time=None):
        """Send raw bytes (also for deliberately malformed test events);
        ``event_time`` (epoch ms) sets the message's event timestamp, the
        event time of a source with ``timestamp_field="@event_time"``."""
        key = str(key)
        partition = self._partitions.get(key)
        if partition is None:
            if len(self._partitions) >= self.CACHE_SIZE:
                self._partitions.clear()
            partition = self._partitions[key] = \
                partition_of(key, self.n_partitions, self.routing)
        self.producer.send(partition, payload, key, event_time)

    def flush(self):
        """Wait until every event sent so far is persisted; raise if any was not."""
        self.producer.flush()

    def close(self):
        self.producer.close()


class ColumnarProducer:
    """Sends events as columnar batches: ``send_columns`` splits the rows by
    partition (:func:`partitions_of` of the key column) and sends, for each
    partition, its rows in order in messages of at most
    ``max_events_per_message`` events, encoded as ``format`` (``arrow`` or
    ``msgpack-columnar``, see :mod:`tally.core.formats`), routed by
    ``routing`` (the source's)."""

    def __init__(self, client, topic, key_field, format=ARROW, max_events_per_message=10_000,
                 routing="murmur3"):
        routing_code(routing)
        if format not in COLUMNAR_FORMATS:
            raise ValueError(f"format {format!r} is not columnar; use one of "
                             f"{', '.join(COLUMNAR_FORMATS)}")
        if not isinstance(max_events_per_message, int) or max_events_per_message < 1:
            raise ValueError("max_events_per_message must be a positive integer")
        self.topic = topic
        self.key_field, self.routing = key_field, routing
        self.format = format
        self.max_events_per_message = max_events_per_message
        # Messages are batches already: no client batching; a small queue of
        # large messages bounds the memory held in flight.
        self.producer = PartitionProducers(
            client, topic, batching_enabled=False, block_if_queue_full=True,
            max_pending_messages=64)
        self.n_partitions = len(self.producer)
        self.messages = 0
        self.events = 0

    def send_columns(self, columns):
        """Send the events of ``columns`` (name -> 1-D array, all the same
        length, including the key field); returns the number of messages."""
        columns = {name: values if isinstance(values, pa.Array) else np.asarray(values)
                   for name, values in columns.items()}
        if self.key_field not in columns:
            raise ValueError(f"columns lack the key field {self.key_field!r}")
        lengths = {len(values) for values in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different lengths: "
                             f"{ {name: len(v) for name, v in columns.items()} }")
        n = lengths.pop()
        if n == 0:
            return 0
        keys = columns[self.key_field]
        partitions = partitions_of(keys, self.n_partitions, self.routing)
        order = np.argsort(partitions, kind="stable")     # keeps each key's order
        bounds = np.searchsorted(partitions[order], np.arange(self.n_partitions + 1))
        sent = 0
        for partition in range(self.n_partitions):
            rows = order[bounds[partition]:bounds[partition + 1]]
            for start in range(0, len(rows), self.max_events_per_message):
                chunk = rows[start:start + self.max_events_per_message]
                if len(chunk) == len(rows) == n:
                    part = columns                   # one partition, one message: no copy
                else:
                    part = {name: (values.take(pa.array(chunk)) if isinstance(values, pa.Array)
                                   else values[chunk]) for name, values in columns.items()}
                payload = encode_columns(part, self.format)
                first = keys[int(chunk[0])]
                self.producer.send(partition, payload,
                                   str(first.as_py() if isinstance(first, pa.Scalar) else first))
                sent += 1
        self.messages += sent
        self.events += n
        return sent

    def flush(self):
        """Wait until every event sent so far is persisted; raise if any was not."""
        self.producer.flush()

    def close(self):
        self.producer.close()
