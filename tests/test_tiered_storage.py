"""Offloaded ledgers read straight from object storage (tally.service.history.tiered)
against what the broker gives for the same messages.

A real broker offloads with Pulsar's S3 offloader (tiered-storage-jcloud)
into a real S3 endpoint on loopback (s3proxy); the oracle is a Pulsar Reader
reading the same partitions through the broker after BookKeeper dropped its
copies. Every partition of the topic has its own producer: batched and
unbatched, with every compression type, keys, properties and event times."""
import dataclasses
import time

import msgpack
import pulsar
import pytest

from tally.core.entries import NEED_MORE, decode_entries, parse_block_header, parse_index
from tally.service.history import tiered
from tally.service.history.readers import fold_unit, plan_units
from tally.service.pulsar.admin import Admin
from tally.service.pulsar.client import connect
from tally.service.pulsar.cluster import TieredStorage
from tally.service.pulsar.local import LocalPulsar
from tally.service.pulsar.topics import partition_topic, position

pytestmark = pytest.mark.pulsar

COMPRESSIONS = [pulsar.CompressionType.NONE, pulsar.CompressionType.LZ4,
                pulsar.CompressionType.ZLib, pulsar.CompressionType.ZSTD,
                pulsar.CompressionType.SNAPPY]
# (batched, compression) of each partition
PRODUCERS = [(batched, compression) for batched in (False, True) for compression in COMPRESSIONS]
MESSAGES = 600                      # per partition: 30+ ledgers of 20 entries unbatched


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    broker = LocalPulsar(data_dir=tmp_path_factory.mktemp("s3tier"), max_entries_per_ledger=20,
                         tiered_storage="s3")
    broker.start(timeout=180)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def client(broker):
    client = connect(broker.service_url, operation_timeout_seconds=30)
    yield client
    client.close()


def payload(partition, i):
    return msgpack.packb({"user": partition * 10_000 + i, "article": i % 17,
                          "readtime": i / 8, "ts": 1_700_000_000_000 + i})


def write_partitions(broker, client, topic, producers, messages=MESSAGES):
    broker.create_partitioned_topic(topic, len(producers))
    for partition, (batched, compression) in enumerate(producers):
        producer = client.create_producer(
            partition_topic(topic, partition), compression_type=compression,
            batching_enabled=batched, batching_max_messages=37,
            batching_max_publish_delay_ms=5)
        for i in range(messages):
            producer.send_async(payload(partition, i), None, partition_key=f"k{i}",
                                properties={"n": str(i)}, event_timestamp=1000 + i)
            if batched and i % 100 == 99:
                producer.flush()         # several entries, so several ledgers
        producer.flush()
        producer.close()


def offload_all_but_the_last_ledger(broker, topic, partitions):
    offloaded = set()
    for partition in range(partitions):
        name = partition_topic(topic, partition)
        ledgers = broker.internal_stats(name)["ledgers"]
        assert len(ledgers) >= 3
        broker.offload(name, ledgers[-1]["ledgerId"])
        offloaded |= {e["ledgerId"] for e in broker.internal_stats(name)["ledgers"]
                      if e["offloaded"]}
    deadline = time.monotonic() + 60
    while not offloaded <= broker.bookkeeper_deleted_ledgers():
        assert time.monotonic() < deadline, "offloaded ledgers were not deleted from BookKeeper"
        time.sleep(0.5)
    return offloaded


def through_the_broker(client, topic, partition):
    """Every message of the partition as the broker gives them: (position,
    payload, event time, publish time)."""
    name = partition_topic(topic, partition)
    reader = client.create_reader(name, pulsar.MessageId.earliest)
    messages = []
    try:
        while reader.has_message_available():
            m = reader.read_next(10_000)
            messages.append((position(m.message_id()), m.data(), m.event_timestamp(),
                             m.publish_timestamp()))
    finally:
        reader.close()
    return messages


def directly(store, units):
    """The units' messages read from object storage, in the same shape (a
    block at a time, so each message's ledger is known)."""
    messages, malformed = [], {}
    for unit in units:
        for block in unit.blocks:
            ledger, _, first, last = block[:4]
            one = dataclasses.replace(unit, first=(ledger, first), last=(ledger, last),
                                      entries=last - first + 1, blocks=(block,))
            for payloads, times, refused in tiered.unit_messages(store, one):
                for reason, count in refused.items():
                    malformed[reason] = malformed.get(reason, 0) + count
                messages += [((ledger, e, b), p, et, pt) for p, e, b, et, pt in zip(
                    payloads, times["entry"].tolist(), times["batch_index"].tolist(),
                    times["event_time"].tolist(), times["publish_time"].tolist())]
    return messages, malformed


def cluster_of(broker, **settings):
    s3 = broker.object_store
    return broker.cluster.replace(tiered_storage=TieredStorage(
        access_key=s3.access_key, secret_key=s3.secret_key, **settings))


def planned(broker, topic, partitions, cluster=None):
    cluster = cluster or cluster_of(broker)
    stats = Admin(cluster).partition_stats(topic, range(partitions))
    store, blocks, fallbacks = tiered.plan_direct_reads(cluster, topic, stats)
    return store, plan_units(stats, readers=2, min_unit_bytes=1, blocks=blocks), fallbacks


@pytest.fixture(scope="module")
def offloaded_topic(broker, client):
    topic = "tiered-every-producer"
    write_partitions(broker, client, topic, PRODUCERS)
    offloaded = offload_all_but_the_last_ledger(broker, topic, len(PRODUCERS))
    return topic, offloaded


def test_direct_reads_equal_the_broker_path_for_every_producer(broker, client,
                                                               offloaded_topic):
    topic, offloaded = offloaded_topic
    store, units, fallbacks = planned(broker, topic, len(PRODUCERS))
    assert fallbacks == [] and store.bucket == broker.object_store.bucket
    direct_ledgers = {b[0] for u in units for b in u.blocks}
    assert direct_ledgers == offloaded                   # every offloaded ledger, directly
    for partition, (batched, compression) in enumerate(PRODUCERS):
        mine = [u for u in units if u.partition == partition and u.blocks]
        expected = [m for m in through_the_broker(client, topic, partition)
                    if m[0][0] in direct_ledgers]
        got, malformed = directly(store, mine)
        assert malformed == {}
        assert len(got) == len(expected) > 0, (batched, compression)
        assert got == expected, (batched, compression)   # order, positions, bytes, times
        if batched:
            assert any(m[0][2] > 0 for m in got)        # real batches were read


def test_a_corrupted_object_byte_is_caught_by_the_checksum(broker, client):
    topic = "tiered-corrupted"
    write_partitions(broker, client, topic, [(False, pulsar.CompressionType.NONE)], 100)
    offload_all_but_the_last_ledger(broker, topic, 1)
    store, units, _ = planned(broker, topic, 1)
    unit = next(u for u in units if u.blocks)
    ledger, uuid, first, _, offset, _ = unit.blocks[0]
    path = broker.s3.blob_dir / store.bucket / f"{uuid}-ledger-{ledger}"
    data = bytearray(path.read_bytes())
    header_length, _, _ = parse_block_header(data, offset)
    entry_length = int.from_bytes(data[offset + header_length:offset + header_length + 4], "big")
    data[offset + header_length + 12 + entry_length - 1] ^= 0x40    # the payload's last byte
    path.write_bytes(bytes(data))
    got, malformed = directly(store, [unit])
    assert malformed == {"checksum mismatch": 1}
    assert len(got) == unit.entries - 1                 # one message an entry: one lost
    assert all(m[0][1] != first for m in got)


def test_unreadable_objects_fall_back_to_the_broker_with_the_reason(broker, client,
                                                                    offloaded_topic):
    topic, offloaded = offloaded_topic
    # wrong credentials at plan time: every ledger is planned for the broker
    wrong = cluster_of(broker).replace(tiered_storage=TieredStorage(access_key="tally",
                                                                    secret_key="wrong"))
    store, units, fallbacks = planned(broker, topic, len(PRODUCERS), wrong)
    assert not any(u.blocks for u in units)
    assert len(fallbacks) == len(offloaded)
    # planned directly, read with wrong credentials: the unit is read again
    # through the broker, from nothing, and gives the same messages
    store, units, _ = planned(broker, topic, 1)
    unit = next(u for u in units if u.blocks)
    bad_store = tiered.ObjectStore(store.driver, store.bucket, store.region, store.endpoint,
                                   "tally", "wrong")

    def collect(batches):
        return [p for payloads, _, _ in batches for p in payloads]
    via_broker, fallback = fold_unit(broker.cluster, topic, unit, _Source(), bad_store, collect)
    assert fallback and "DirectReadError" in fallback
    direct, none = fold_unit(broker.cluster, topic, unit, _Source(), store, collect)
    assert none is None and direct == via_broker and len(direct) == unit.entries


def test_direct_reads_turned_off_read_everything_through_the_broker(broker, offloaded_topic):
    topic, _ = offloaded_topic
    store, units, fallbacks = planned(broker, topic, len(PRODUCERS),
                                      cluster_of(broker, direct=False))
    assert store is None and not any(u.blocks for u in units)
    assert fallbacks and "turned off" in fallbacks[0]


class _Source:
    message_time_fields = ()


def test_the_index_object_matches_the_data_object(broker, offloaded_topic):
    """The layout the reader relies on, checked on the real objects: each
    block starts with its header at the offset the index gives, and its
    entries run up to the next block's first entry."""
    topic, _ = offloaded_topic
    store, units, _ = planned(broker, topic, 1)
    ledger, uuid = units[0].blocks[0][:2]
    base = broker.s3.blob_dir / store.bucket / f"{uuid}-ledger-{ledger}"
    blocks, data_length, last_entry = parse_index((base.parent / f"{base.name}-index")
                                                  .read_bytes())
    data = base.read_bytes()
    assert data_length == len(data)
    for first, offset in blocks:
        header_length, block_length, block_first = parse_block_header(data, offset)
        assert (header_length, block_first) == (128, first)
    assert last_entry == blocks[-1][0] + _entries_in_last_block(data, blocks[-1][1]) - 1


def _entries_in_last_block(data, offset):
    from tally.core.entries import Messages
    out = Messages()
    _, block_length, _ = parse_block_header(data, offset)
    at, stop = decode_entries(data[offset:offset + block_length], 128, block_length, 0,
                              2**62, out)
    assert stop != NEED_MORE
    return out.entries
