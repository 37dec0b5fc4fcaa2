"""The local broker's tiers: s3proxy on loopback, Pulsar's S3 offloader writing
to it (and the filesystem offloader), checked against the bucket's own listing
and against what was produced."""
import os
import time

import msgpack
import pulsar
import pyarrow.fs as pafs
import pytest

from tally.service.pulsar.client import connect
from tally.service.pulsar.local import LocalPulsar, LocalS3
from tally.service.pulsar.topics import partition_topic

N_PARTITIONS = 2
N_MESSAGES = 400
ENTRIES_PER_LEDGER = 20
# The first bytes of the offloader's objects (Pulsar 4.0's OffloadIndexBlockImpl,
# the V1 index that a ledger's offload writes, and DataBlockHeaderImpl).
INDEX_V1_MAGIC = bytes.fromhex("de47de47")
DATA_BLOCK_MAGIC = bytes.fromhex("fbdbabcb")


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
