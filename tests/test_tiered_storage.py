"""The local broker's tiers, and offloaded ledgers read straight from them.

The launcher: s3proxy on loopback, Pulsar's S3 offloader (tiered-storage-jcloud,
driver aws-s3) writing to it, and the filesystem offloader, checked against the
bucket's own listing and against what was produced.

The direct reader (tally.service.history.tiered) against what the broker gives
for the same messages: a Pulsar Reader reads the same partitions through the
broker after BookKeeper dropped its copies. Every partition of the topic has
its own producer: batched and unbatched, with every compression type, keys,
properties and event times."""
import dataclasses
import os
import re
import time
import types

import msgpack
import pandas as pd
import pulsar
import pyarrow.fs as pafs
import pytest

from tally.core.definitions import Entity, Feature, FeatureView, Source
from tally.core.entries import NEED_MORE, Messages, decode_entries, parse_block_header, parse_index
from tally.service.history import tiered as direct_reads
from tally.service.history.bootstrap import Bootstrap
from tally.service.history.readers import fold_unit, plan_units
from tally.service.ingest.checkpoint import CheckpointStore
from tally.service.ingest.service import StreamingService
from tally.service.metrics import OnScrape, exposition, scrape_registry
from tally.service.pulsar.admin import Admin
from tally.service.pulsar.client import connect
from tally.service.pulsar.cluster import TieredStorage
from tally.service.pulsar.local import LocalPulsar, LocalS3
from tally.service.pulsar.topics import partition_topic, position, subscription_for
from tally.service.store.lmdb import LmdbStore

N_PARTITIONS = 2
N_MESSAGES = 400
ENTRIES_PER_LEDGER = 20
# The first bytes of the offloader's objects (Pulsar 4.0's OffloadIndexBlockImpl,
# the V1 index that a ledger's offload writes, and DataBlockHeaderImpl).
INDEX_V1_MAGIC = bytes.fromhex("de47de47")
DATA_BLOCK_MAGIC = bytes.fromhex("fbdbabcb")
SCHEMA = {"user": "int64", "article": "int64", "readtime": "float64", "ts": "int64"}  # payload()


@pytest.fixture(scope="module", autouse=True)
def checksums_s3proxy_knows():
    # pyarrow's AWS SDK asks for request and response checksums by default;
    # s3proxy 2.6 answers those requests with 400 and 501.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        patch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        yield


def bucket_filesystem(store, secret_key=None):
    return pafs.S3FileSystem(endpoint_override=store.endpoint.removeprefix("http://"),
                             scheme="http", region=store.region, access_key=store.access_key,
                             secret_key=secret_key or store.secret_key)


@pytest.mark.pulsar
def test_local_s3_serves_its_bucket_to_its_credentials_only():
    with LocalS3() as s3:
        store = s3.location
        (s3.blob_dir / store.bucket / "probe").write_bytes(b"through S3")
        bucket = bucket_filesystem(store)
        assert [i.base_name for i in bucket.get_file_info(pafs.FileSelector(store.bucket))] \
            == ["probe"]
        with bucket.open_input_stream(f"{store.bucket}/probe") as stream:
            assert stream.read() == b"through S3"
        with pytest.raises(OSError, match="SIGNATURE_DOES_NOT_MATCH"):
            bucket_filesystem(store, secret_key="wrong").get_file_info(
                pafs.FileSelector(store.bucket))
        data_dir, pid = s3.data_dir, s3._process.pid
    assert not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_tiered_storage_names():
    assert LocalPulsar(tiered_storage=True).tiered_storage == "s3"
    assert LocalPulsar(tiered_storage="filesystem").tiered_storage == "filesystem"
    assert LocalPulsar().tiered_storage is None
    with pytest.raises(ValueError, match="gcs"):
        LocalPulsar(tiered_storage="gcs")


# --------------------------------------------------------------------------
# A broker on each tier, and a partitioned topic whose history was offloaded


@pytest.fixture(scope="module", params=["s3", "filesystem"])
def tiered(request, tmp_path_factory):
    """(broker, topic, the payloads sent, offloaded ledger ids by partition)."""
    broker = LocalPulsar(data_dir=tmp_path_factory.mktemp(request.param),
                         max_entries_per_ledger=ENTRIES_PER_LEDGER,
                         tiered_storage=request.param)
    broker.start(timeout=180)
    try:
        topic = f"offloaded-{request.param}"
        broker.create_partitioned_topic(topic, N_PARTITIONS)
        sent = produce(broker, topic)
        offloaded = {}
        for partition in range(N_PARTITIONS):
            name = partition_topic(topic, partition)
            ledgers = broker.internal_stats(name)["ledgers"]
            assert len(ledgers) >= 4, "the history should span several small ledgers"
            broker.offload(name, ledgers[-1]["ledgerId"])
            offloaded[partition] = [ledger["ledgerId"] for ledger
                                    in broker.internal_stats(name)["ledgers"]
                                    if ledger["offloaded"]]
        every = {ledger for ids in offloaded.values() for ledger in ids}
        deadline = time.monotonic() + 60
        while not every <= broker.bookkeeper_deleted_ledgers():
            assert time.monotonic() < deadline, "BookKeeper copies were not deleted"
            time.sleep(0.5)
        yield broker, topic, sent, offloaded
    finally:
        broker.stop()


def produce(broker, topic):
    """N_MESSAGES msgpack maps, unbatched so that ledgers roll every few entries."""
    client = connect(broker.service_url, operation_timeout_seconds=30)
    try:
        producer = client.create_producer(f"persistent://public/default/{topic}",
                                          batching_enabled=False)
        sent = [msgpack.packb({"i": i, "user": i % 11, "readtime": i * 0.25})
                for i in range(N_MESSAGES)]
        for i, payload in enumerate(sent):
            producer.send_async(payload, None, partition_key=f"user-{i % 11}")
        producer.flush()
        producer.close()
        return sent
    finally:
        client.close()


@pytest.mark.pulsar
def test_every_message_reads_back_from_the_tier(tiered):
    broker, topic, sent, offloaded = tiered
    assert all(offloaded.values())
    client = connect(broker.service_url, operation_timeout_seconds=30)
    try:
        consumer = client.subscribe(f"persistent://public/default/{topic}", "read-back",
                                    initial_position=pulsar.InitialPosition.Earliest)
        received = []
        while len(received) < len(sent):
            message = consumer.receive(timeout_millis=30_000)
            received.append(message.data())
            consumer.acknowledge(message)
        with pytest.raises(pulsar.Timeout):
            consumer.receive(timeout_millis=500)
        consumer.close()
    finally:
        client.close()
    assert sorted(received) == sorted(sent)


@pytest.mark.pulsar
@pytest.mark.parametrize("tiered", ["s3"], indirect=True)
def test_s3_offload_writes_one_object_pair_per_ledger_admin_names(tiered):
    broker, topic, _, offloaded = tiered
    admin, store = broker.admin_client, broker.object_store
    bucket = bucket_filesystem(store)
    listed = {info.base_name: info.size
              for info in bucket.get_file_info(pafs.FileSelector(store.bucket))}
    expected = set()
    for partition, ledger_ids in offloaded.items():
        ledgers = admin.offloaded_ledgers(partition_topic(topic, partition))
        assert [ledger.ledger_id for ledger in ledgers] == ledger_ids
        assert all(ledger.entries == ENTRIES_PER_LEDGER and ledger.size > 0
                   for ledger in ledgers)
        for ledger in ledgers:
            data_key = f"{ledger.uuid}-ledger-{ledger.ledger_id}"
            expected |= {data_key, f"{data_key}-index"}
            # the data object holds at least the ledger's entries
            assert listed[data_key] > ledger.size
            with bucket.open_input_stream(f"{store.bucket}/{data_key}") as stream:
                assert stream.read(4) == DATA_BLOCK_MAGIC
            with bucket.open_input_stream(f"{store.bucket}/{data_key}-index") as stream:
                assert stream.read(4) == INDEX_V1_MAGIC
    assert set(listed) == expected


@pytest.mark.pulsar
def test_applied_offload_policies_name_the_bucket(tiered):
    broker, topic, _, _ = tiered
    admin = broker.admin_client
    policies = admin.offload_policies(topic)
    # a partition has its topic's policies
    assert admin.offload_policies(partition_topic(topic, 1)) == policies
    if broker.tiered_storage == "filesystem":
        assert policies["managedLedgerOffloadDriver"] == "filesystem"
        return
    store = broker.object_store
    assert (policies["managedLedgerOffloadDriver"], policies["s3ManagedLedgerOffloadBucket"],
            policies["s3ManagedLedgerOffloadRegion"],
            policies["s3ManagedLedgerOffloadServiceEndpoint"]) \
        == ("aws-s3", store.bucket, store.region, store.endpoint)


@pytest.mark.pulsar
def test_a_ledger_whose_offload_is_unfinished_is_not_named_offloaded(tmp_path):
    with LocalPulsar(data_dir=tmp_path, max_entries_per_ledger=ENTRIES_PER_LEDGER,
                     tiered_storage="s3") as broker:
        topic = "unfinished-offload"
        produce(broker, topic)
        broker.s3.stop()                  # the upload now retries, never done
        admin = broker.admin_client
        with pytest.raises(TimeoutError):
            admin.offload(topic, broker.internal_stats(topic)["ledgers"][-1]["ledgerId"],
                          timeout=3)
        # the offload has begun (the ledger has an offload context), not ended
        started = [ledger["ledgerId"] for ledger in admin.internal_info(topic)["ledgers"]
                   if ledger["isOffloaded"]]
        assert started and admin.offloaded_ledgers(topic) == []
        broker.s3.start()                 # back on its port: the retries get through
        deadline = time.monotonic() + 60
        while not admin.offloaded_ledgers(topic):
            assert time.monotonic() < deadline, "the offload did not resume"
            time.sleep(0.2)
        assert admin.offloaded_ledgers(topic)[0].ledger_id == min(started)


# --------------------------------------------------------------------------
# Reading the S3 tier directly

COMPRESSIONS = [pulsar.CompressionType.NONE, pulsar.CompressionType.LZ4,
                pulsar.CompressionType.ZLib, pulsar.CompressionType.ZSTD,
                pulsar.CompressionType.SNAPPY]
# (batched, compression) of each partition
PRODUCERS = [(batched, compression) for batched in (False, True) for compression in COMPRESSIONS]
MESSAGES = 200                      # per partition: 10 ledgers of 20 entries unbatched


@pytest.fixture(scope="module")
def broker(tiered):
    """The S3 tier's broker (tests using it run with tiered="s3" only)."""
    return tiered[0]


S3_ONLY = pytest.mark.parametrize("tiered", ["s3"], indirect=True)


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
            if batched and i % 4 == 3:
                producer.flush()         # batches of 4: 50 entries, so 3 ledgers
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
            for payloads, times, refused in direct_reads.unit_messages(store, one):
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
    store, blocks, fallbacks = direct_reads.plan_direct_reads(cluster, topic, stats)
    return store, plan_units(stats, readers=2, min_unit_bytes=1, blocks=blocks), fallbacks


@pytest.fixture(scope="module")
def offloaded_topic(broker, client):
    topic = "tiered-every-producer"
    write_partitions(broker, client, topic, PRODUCERS)
    offloaded = offload_all_but_the_last_ledger(broker, topic, len(PRODUCERS))
    return topic, offloaded


@pytest.mark.pulsar
@S3_ONLY
def test_direct_reads_equal_the_broker_path_for_every_producer(broker, client,
                                                               offloaded_topic):
    topic, offloaded = offloaded_topic
    store, units, fallbacks = planned(broker, topic, len(PRODUCERS))
    assert fallbacks == [] and store.bucket == broker.object_store.bucket
    assert store.endpoint == broker.object_store.endpoint      # from the offload policies
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
        # read in ranges far smaller than a block: entries straddle the ranges
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(direct_reads, "READ_BYTES", 301)
            assert directly(store, mine) == (expected, {})


@pytest.mark.pulsar
@S3_ONLY
def test_a_mounted_bucket_reads_as_the_object_store_does(broker, client, offloaded_topic):
    """tiered_storage.mount: the bucket's objects read as files (here
    s3proxy's own filesystem backend), no object store API and no
    credentials: the same plan, the same messages as the broker gives."""
    topic, offloaded = offloaded_topic
    cluster = broker.cluster.replace(tiered_storage=TieredStorage(mount=str(broker.s3.blob_dir)))
    store, units, fallbacks = planned(broker, topic, len(PRODUCERS), cluster)
    assert fallbacks == [] and store.mount == str(broker.s3.blob_dir)
    assert isinstance(direct_reads.filesystem_for(store), pafs.SubTreeFileSystem)
    assert {b[0] for u in units for b in u.blocks} == offloaded
    for partition in (0, len(PRODUCERS) - 1):           # unbatched and batched
        mine = [u for u in units if u.partition == partition and u.blocks]
        expected = [m for m in through_the_broker(client, topic, partition)
                    if m[0][0] in offloaded]
        assert directly(store, mine) == (expected, {}) and expected


@pytest.mark.pulsar
@S3_ONLY
def test_a_corrupted_object_byte_is_caught_by_the_checksum(broker, client, tmp_path):
    topic = "tiered-corrupted"
    write_partitions(broker, client, topic, [(False, pulsar.CompressionType.NONE)], 100)
    offload_all_but_the_last_ledger(broker, topic, 1)
    produced = through_the_broker(client, topic, 0)          # before the corruption
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
    kept = [m[1] for m in produced if m[0][:2] != (ledger, first)]
    assert_bootstrap_says_what_it_left_out(broker, topic, kept, tmp_path)


def assert_bootstrap_says_what_it_left_out(broker, topic, kept, tmp_path):
    """A bootstrap over the corrupted object folds every other message (a
    pandas oracle over what was produced, less the lost message), and its
    report, /health and /metrics name the entry it left out."""
    source = Source("reads", topic, schema=SCHEMA)
    view = FeatureView("corrupted_reads", Entity("user"), source, [
        Feature("total", "sum", "readtime"), Feature("reads", "count")])
    produced = pd.DataFrame([msgpack.unpackb(payload(0, i)) for i in range(100)])
    kept = pd.DataFrame([msgpack.unpackb(p) for p in kept])
    assert len(kept) == 99
    with LmdbStore(str(tmp_path / "store")) as store:
        job = Bootstrap(view, cluster_of(broker), store, CheckpointStore(tmp_path / "ckpt"),
                        subscription_for(view), readers=1)
        report = job.run()
        got = store.get_many(view.name, produced["user"].to_numpy())
    assert report["entries_left_out"] == {"checksum mismatch": 1}, report
    assert report["events"] == 99 and report["direct"]["events"] > 0
    expected = kept.groupby("user").agg(total=("readtime", "sum"), reads=("ts", "size"))
    served = {u: r for u, r in zip(produced["user"], got) if r is not None}
    assert sorted(served) == sorted(expected.index)
    assert all(served[u]["total"] == expected.loc[u, "total"] and
               served[u]["reads"] == expected.loc[u, "reads"] for u in served)
    # /health: degraded (still serving), naming the view and the reason
    service = object.__new__(StreamingService)
    service.failures, service.dimensions, service.checkpoint_interval_s = [], {}, 1.0
    service.runners = {(view.name, 1): types.SimpleNamespace(
        view=view, version=1, workers=[], bootstrap=job, bootstrap_progress=(1, 1, 99))}
    healthy, details = service.health()
    assert healthy and details["status"] == "degraded", details
    assert details["warnings"] == [
        "bootstrap of corrupted_reads@v1: 1 offloaded entries left out (1 checksum "
        "mismatch); their events are missing from its state"]
    text = exposition(scrape_registry(OnScrape(service.current_metrics)))[0].decode()
    assert re.search(r'^tally_bootstrap_entries_left_out_total\{reason="checksum mismatch",'
                     r'version="1",view="corrupted_reads"\} 1(\.0)?$', text, re.M), text


@pytest.mark.pulsar
@S3_ONLY
def test_unreadable_objects_fall_back_to_the_broker_with_the_reason(broker, client,
                                                                    offloaded_topic, tmp_path):
    topic, offloaded = offloaded_topic
    # wrong credentials at plan time: every ledger is planned for the broker
    wrong = cluster_of(broker).replace(tiered_storage=TieredStorage(access_key="tally",
                                                                    secret_key="wrong"))
    store, units, fallbacks = planned(broker, topic, len(PRODUCERS), wrong)
    assert not any(u.blocks for u in units)
    assert len(fallbacks) == len(offloaded)
    # a bootstrap so planned says so in its report and on /health
    view = FeatureView("fallen_back", Entity("user"), Source("reads", topic, schema=SCHEMA),
                       [Feature("reads", "count")])
    with LmdbStore(str(tmp_path / "store")) as online:
        job = Bootstrap(view, wrong, online, CheckpointStore(tmp_path / "ckpt"),
                        subscription_for(view), readers=1)
        report = job.run()
    assert len(report["direct_fallbacks"]) == len(offloaded) and report["direct"]["units"] == 0
    assert report["events"] + report["rejected"] == len(PRODUCERS) * MESSAGES   # all read
    assert job.warnings() == [f"bootstrap of fallen_back@v1: {len(offloaded)} offloaded "
                              "ledgers or units read through the broker, not directly "
                              "(the log says why)"]
    # planned directly, read with wrong credentials: the unit is read again
    # through the broker, from nothing, and gives the same messages
    store, units, _ = planned(broker, topic, 1)
    unit = next(u for u in units if u.blocks)
    bad_store = direct_reads.ObjectStore(store.driver, store.bucket, store.region, store.endpoint,
                                   "tally", "wrong")

    def collect(batches):
        return [p for payloads, _, _ in batches for p in payloads]
    via_broker, fallback = fold_unit(broker.cluster, topic, unit, _Source(), bad_store, collect)
    assert fallback and "DirectReadError" in fallback
    direct, none = fold_unit(broker.cluster, topic, unit, _Source(), store, collect)
    assert none is None and direct == via_broker and len(direct) == unit.entries


@pytest.mark.pulsar
@S3_ONLY
def test_direct_reads_turned_off_read_everything_through_the_broker(broker, offloaded_topic):
    topic, _ = offloaded_topic
    store, units, fallbacks = planned(broker, topic, len(PRODUCERS),
                                      cluster_of(broker, direct=False))
    assert store is None and not any(u.blocks for u in units)
    assert fallbacks == []                      # a choice, not a fallback


class _Source:
    message_time_fields = ()


@pytest.mark.pulsar
@S3_ONLY
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
    out = Messages()
    _, block_length, _ = parse_block_header(data, offset)
    at, stop = decode_entries(data[offset:offset + block_length], 128, block_length, 0,
                              2**62, out)
    assert stop != NEED_MORE
    return out.entries
