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
always land on the same partition, whichever producer wrote them**. Both
producers route a key with the same function, :func:`partition_of`::

    partition = (murmur3_32(str(key).encode("utf-8")) & 0x7fffffff) % n_partitions

(MurmurHash3 x86 32-bit, seed 0; ``str(key)`` is the decimal form of an
integer key). This is exactly Pulsar's ``Murmur3_32Hash`` hashing scheme, so
a Java, Go or C++ producer configured with ``hashingScheme=Murmur3_32Hash``
and ``partition_key=str(key)`` routes the same way. Each producer opens one
producer per partition topic (``<topic>-partition-<i>``) and sends each message
to the partition it computed; every message still carries a partition key
(the event's key, or for a columnar message the key of its first event).

Why not the client's own routing: pulsar-client for Python (3.13) exposes no
``hashing_scheme``; its keyed routing uses the C++ client's default,
``BoostHash`` (boost::hash of the key, which depends on the Boost version the
wheel was built with, and no other client implements), and a columnar message
holds many keys, so its partition has to be computed by the producer anyway.
A Python ``message_router`` callback was measured ~3x slower per message
than routing ourselves (a GIL hand-off per message), so we route ourselves.
``ColumnarProducer`` hashes a whole column at once (:func:`partitions_of`,
vectorised with numpy over the keys' UTF-8 bytes).

The partition count is read when a producer opens. Changing a topic's
partition count moves keys between partitions, i.e. re-shards the state: it
needs a re-bootstrap of the views on that topic, and producers restarted.
"""
import struct

import _pulsar
import msgpack
import numpy as np
import pulsar
import pyarrow as pa
import pyarrow.compute as pc

from tally.core.errors import TallyError
from tally.core.formats import ARROW, COLUMNAR_FORMATS, encode_columns
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
# Routing: Pulsar's Murmur3_32Hash scheme

_C1, _C2, _M32 = 0xcc9e2d51, 0x1b873593, 0xffffffff


def murmur3_32(data, seed=0):
    """MurmurHash3 (x86, 32-bit) of ``data`` (bytes), as an unsigned int."""
    h = seed
    n = len(data)
    end = n - n % 4
    for (k,) in struct.iter_unpack("<I", data[:end]):
        k = (k * _C1) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        h ^= (k * _C2) & _M32
        h = ((h << 13) | (h >> 19)) & _M32
        h = (h * 5 + 0xe6546b64) & _M32
    k = int.from_bytes(data[end:], "little")
    if k:
        k = (k * _C1) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        h ^= (k * _C2) & _M32
    h ^= n
    h ^= h >> 16
    h = (h * 0x85ebca6b) & _M32
    h ^= h >> 13
    h = (h * 0xc2b2ae35) & _M32
    return h ^ (h >> 16)


def partition_of(key, n_partitions):
    """The partition of an entity key (see the module docstring)."""
    return (murmur3_32(str(key).encode("utf-8")) & 0x7fffffff) % n_partitions


def _mix_k1(k):
    k = k * np.uint32(_C1)
    k = (k << np.uint32(15)) | (k >> np.uint32(17))
    return k * np.uint32(_C2)


def murmur3_32_many(strings):
    """:func:`murmur3_32` of the UTF-8 bytes of each string (a pyarrow string
    array, no nulls), vectorised: uint32 array."""
    strings = strings.cast(pa.large_string())
    n = len(strings)
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, n + 1, strings.offset * 8)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    data = np.concatenate([data[offsets[0]:offsets[-1]], np.zeros(4, np.uint8)])
    # words[i]: the 4 bytes from byte i on, little-endian (an unaligned view)
    words = np.ndarray((len(data) - 3,), dtype="<u4", buffer=data, strides=(1,))
    starts = offsets[:-1] - offsets[0]
    lengths = offsets[1:] - offsets[:-1]
    nblocks = lengths // 4
    h = np.zeros(n, np.uint32)
    with np.errstate(over="ignore"):
        for block in range(int(nblocks.max()) if n else 0):
            rows = np.flatnonzero(nblocks > block)
            x = h[rows] ^ _mix_k1(words[starts[rows] + 4 * block].astype(np.uint32))
            x = (x << np.uint32(13)) | (x >> np.uint32(19))
            h[rows] = x * np.uint32(5) + np.uint32(0xe6546b64)
        # the tail: the last length % 4 bytes, the rest of the word masked off
        tail_bits = (8 * (lengths % 4)).astype(np.uint64)
        k = (words[starts + 4 * nblocks].astype(np.uint64)
             & ((np.uint64(1) << tail_bits) - np.uint64(1))).astype(np.uint32)
        h ^= _mix_k1(k)
        h ^= lengths.astype(np.uint32)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85ebca6b)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xc2b2ae35)
        h ^= h >> np.uint32(16)
    return h


def key_strings(keys):
    """The partition keys (``str(key)``) of a column of int or str keys, as a
    pyarrow string array."""
    array = keys if isinstance(keys, pa.Array) else pa.array(
        keys.tolist() if isinstance(keys, np.ndarray) and keys.dtype == object else keys)
    if len(array) == 0:
        return pa.array([], pa.string())
    if array.null_count:
        raise ValueError("the key column has nulls; every event needs an entity key")
    if pa.types.is_integer(array.type):
        return pc.cast(array, pa.string())
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array
    raise TypeError(f"entity keys must be integers or strings, got {array.type}")


def partitions_of(keys, n_partitions):
    """:func:`partition_of` of every key of a column, vectorised: int64 array."""
    hashes = murmur3_32_many(key_strings(keys)) & np.uint32(0x7fffffff)
    return (hashes % np.uint32(n_partitions)).astype(np.int64)


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

    def send(self, partition, payload, key):
        builder = _pulsar.MessageBuilder()
        builder.content(payload)
        builder.partition_key(key)
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
    by its entity and routed by :func:`partition_of`, so that one entity's
    events land on one partition, in order."""

    # Keys seen recently -> partition: hashing in Python costs ~1-2 us a key.
    CACHE_SIZE = 1 << 20

    def __init__(self, client, topic, key_field):
        self.key_field = key_field
        self.topic = topic
        self.producer = PartitionProducers(
            client, topic, batching_enabled=True, batching_max_messages=1000,
            batching_max_publish_delay_ms=5, block_if_queue_full=True,
            max_pending_messages=50_000)
        self.n_partitions = len(self.producer)
        self._partitions = {}

    def send(self, event):
        self.send_payload(msgpack.packb(event), event[self.key_field])

    def send_payload(self, payload, key):
        """Send raw bytes (also for deliberately malformed test events)."""
        key = str(key)
        partition = self._partitions.get(key)
        if partition is None:
            if len(self._partitions) >= self.CACHE_SIZE:
                self._partitions.clear()
            partition = self._partitions[key] = \
                (murmur3_32(key.encode("utf-8")) & 0x7fffffff) % self.n_partitions
        self.producer.send(partition, payload, key)

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
    ``msgpack-columnar``, see :mod:`tally.core.formats`)."""

    def __init__(self, client, topic, key_field, format=ARROW, max_events_per_message=10_000):
        if format not in COLUMNAR_FORMATS:
            raise ValueError(f"format {format!r} is not columnar; use one of "
                             f"{', '.join(COLUMNAR_FORMATS)}")
        if not isinstance(max_events_per_message, int) or max_events_per_message < 1:
            raise ValueError("max_events_per_message must be a positive integer")
        self.topic = topic
        self.key_field = key_field
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
        keys = key_strings(columns[self.key_field])
        partitions = partitions_of(keys, self.n_partitions)
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
                self.producer.send(partition, payload, keys[int(chunk[0])].as_py())
                sent += 1
        self.messages += sent
        self.events += n
        return sent

    def flush(self):
        """Wait until every event sent so far is persisted; raise if any was not."""
        self.producer.flush()

    def close(self):
        self.producer.close()
