"""Faults an operator or a producer can cause, each reproduced first: lost
and corrupt checkpoints, a partition that cannot go on, restarts in a quiet
period, floods of malformed and oversized events, stores that refuse records.
Every test ends with the online values compared with a pandas recomputation,
or with the failure shown loudly (exit status, log, /health)."""
import asyncio
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import pulsar
import pytest

from tally.core.definitions import Entity, Feature, FeatureView, Source, Window
from tally.core.enrich import DimensionTable
from tally.core.errors import SnapshotError
from tally.core.materialize import online_schema
from tally.core.view import ViewState
from tally.service.ingest.checkpoint import CheckpointStore
from tally.service.ingest.dead_letters import DeadLetterError, DeadLetters, dead_letter_topic
from tally.service.ingest.dimensions import DimensionFeed
from tally.service.ingest.fold import IngestStats
from tally.service.ingest.writer import RecordWriter
from tally.service.quickstart import START_MS, generate_events
from tally.service.store import RecordRefused
from tally.service.store.lmdb import LmdbStore
from test_service import WINDOWED, deployment, stop, wait_for  # noqa: F401 (a fixture)

NOW = int(time.time() * 1000)


# --------------------------------------------------------------------------
# Without a broker


def _state_with(view, keys):
    state = ViewState(view)
    n = len(keys)
    state.apply({"user": np.asarray(keys, np.int64), "readtime": np.ones(n),
                 "ts": np.full(n, START_MS, np.int64)})
    return state


VIEW = FeatureView("faulty", Entity("user"), Source(
    "reads", "reads", {"user": "int64", "readtime": "float64", "ts": "int64"}),
    [Feature("n", "count"), Feature("total", "sum", "readtime")])


class RefusingStore:
    """An LmdbStore that refuses, for good, any write holding key 13."""

    def __init__(self, store):
        self.store = store

    def write(self, view, keys, records, version=None):
        if 13 in list(keys):
            raise RecordRefused("record of key 13 is too large")
        self.store.write(view, keys, records, version=version)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_permanently_refused_record_is_reported_and_never_retried(tmp_path):
    """Once, a permanent store error (a record too large, a refused TTL) was
    retried for ever and stalled the partition."""
    with LmdbStore(tmp_path / "store") as lmdb:
        refused, stats = [], IngestStats()
        writer = RecordWriter(VIEW, RefusingStore(lmdb), online_schema(VIEW), True,
                              lambda: NOW, stats, on_refused=lambda k, e: refused.append(k))
        state = _state_with(VIEW, [11, 12, 13, 14])
        asyncio.run(writer.write(state, np.arange(len(state))))
        assert refused == [13] and stats.store_refused == 1 and stats.store_retries == 0
        assert [r and r["n"] for r in lmdb.get_many("faulty", [11, 12, 13, 14])] == \
            [1, 1, None, 1]


class FailingProducer:
    """A producer whose first ``failures`` sends report an error."""

    def __init__(self, failures):
        self.failures, self.persisted = failures, []

    def send_async(self, payload, callback, properties=None):
        if self.failures:
            self.failures -= 1
            callback(pulsar.Result.Timeout, None)
        else:
            self.persisted.append((payload, properties))
            callback(pulsar.Result.Ok, None)

    def flush(self):
        pass


class FakeMessage:
    def __init__(self, i):
        self.i = i

    def topic_name(self):
        return "persistent://public/default/reads-partition-0"

    def message_id(self):
        return f"(1,{self.i},-1,0)"


class FakeClient:
    def __init__(self, producer):
        self.producer = producer

    def create_producer(self, topic, **options):
        return self.producer


def _dead_letters(producer):
    return DeadLetters(FakeClient(producer), "reads", "faulty")


def test_failed_dead_letters_are_sent_again_and_a_lasting_failure_is_raised():
    """Once, more than 1,000 dead letters between two checkpoints overflowed
    the producer silently while their sources were acknowledged."""
    producer = FailingProducer(failures=3)
    letters = _dead_letters(producer)
    messages = [FakeMessage(i) for i in range(5)]
    payloads = [b"\xc1 bad %d" % i for i in range(4)] + [b"x" * (3 << 20)]
    letters.send(messages, payloads, [(i, f"reason {i}") for i in range(5)])
    letters.flush()                             # the three failed ones are sent again
    assert sorted(p[1]["message_id"] for p in producer.persisted) == \
        sorted(str(m.message_id()) for m in messages)
    big = next(props for payload, props in producer.persisted if len(payload) == 1 << 20)
    assert big["truncated_from"] == str(3 << 20) and big["reason"] == "reason 4"
    assert {p[1]["view"] for p in producer.persisted} == {"faulty"}
    stuck = _dead_letters(FailingProducer(failures=1000))
    stuck.send(messages[:1], payloads[:1], [(0, "bad")])
    with pytest.raises(DeadLetterError):
        stuck.flush()


def test_a_corrupt_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path):
    store = CheckpointStore(tmp_path)
    for sequence in (1, 2, 3):
        state = _state_with(VIEW, list(range(sequence)))
        store.save("faulty", "h", 0, sequence, state.export_arrays(),
                   {"params": state.describe(), "position": [sequence, 0, 0]})
    newest = os.path.join(store.directory("faulty", "h", 0), f"{3:012d}.ckpt")
    os.truncate(newest, 100)
    with pytest.raises(SnapshotError):
        store.load("faulty", "h", 0, 3)
    restored = store.restore("faulty", "h", 0)
    assert restored.sequence == 2 and restored.meta["position"] == [2, 0, 0]
    assert [s for s, _ in restored.corrupt] == [3] and os.path.exists(newest + ".corrupt")
    assert store.latest_sequence("faulty", "h", 0) == 2


# --------------------------------------------------------------------------
# Against a real broker


def _produce(deployment, n_events, seed):
    from tally.service.pulsar.producer import EventProducer
    payloads, keys, events = generate_events(n_events, 50, seed=seed)
    producer = EventProducer(deployment.client, deployment.topic, "user")
    for payload, key in zip(payloads, keys):
        producer.send_payload(payload, key)
    producer.close()
    return events


def _concat(*parts):
    """The events of several batches in event-time order (as 'last' sees them)."""
    events = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(events["ts"], kind="stable")
    return {name: values[order] for name, values in events.items()}


@pytest.mark.pulsar
def test_a_lost_checkpoint_directory_loses_nothing(deployment):
    """Once: 1,000 events, SIGTERM, checkpoints deleted, restart, 100 more:
    240 of 1,100 counted, nothing logged (the subscription resumed from its
    acknowledgements while the state started empty)."""
    first = _produce(deployment, 1000, seed=21)
    process = deployment.start("a")
    deployment.wait_until_serving()
    deployment.wait_until_caught_up()
    stop(process)
    shutil.rmtree(deployment.checkpoints)
    process = deployment.start("a")
    deployment.wait_until_serving()
    second = _produce(deployment, 100, seed=22)
    deployment.wait_until_caught_up()
    stop(process)
    deployment.assert_exact(_concat(first, second))


@pytest.mark.pulsar
def test_a_corrupt_latest_checkpoint_falls_back_and_loses_nothing(deployment):
    """Once: a truncated newest checkpoint killed its partition's worker with
    no sign (/health ok, nothing logged) while the others went on."""
    first = _produce(deployment, 1000, seed=23)
    process = deployment.start("a")
    deployment.wait_until_serving()
    deployment.wait_until_caught_up()
    stop(process)
    from tally.core.definitions import state_hash
    store = CheckpointStore(deployment.checkpoints)
    for partition in range(4):
        latest = store.latest_sequence(deployment.view.name, state_hash(deployment.view),
                                       partition)
        os.truncate(os.path.join(store.directory(deployment.view.name,
                                                 state_hash(deployment.view), partition),
                                 f"{latest:012d}.ckpt"), 100)
    process = deployment.start("a")
    deployment.wait_until_serving()
    second = _produce(deployment, 100, seed=24)
    deployment.wait_until_caught_up()
    stop(process)
    deployment.assert_exact(_concat(first, second))
    log = open(deployment.log.name).read()
    assert log.count("is corrupt") >= 4, log[-3000:]


@pytest.mark.pulsar
def test_a_worker_that_cannot_go_on_fails_the_process(deployment):
    _produce(deployment, 200, seed=25)
    process = deployment.start("a")
    deployment.wait_until_serving()
    deployment.wait_until_caught_up()
    stop(process)
    from tally.core.definitions import state_hash
    directory = CheckpointStore(deployment.checkpoints).directory(
        deployment.view.name, state_hash(deployment.view), 0)
    shutil.rmtree(directory)
    open(directory, "w").close()               # a file where the directory should be
    process = deployment.start("a")
    assert process.wait(timeout=60) == 1
    log = open(deployment.log.name).read()
    assert "partition 0 failed" in log and "stopping the service" in log, log[-3000:]


@pytest.mark.pulsar
def test_windows_expire_after_a_restart_in_a_quiet_period(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    """Once, window rewrites ran only after a partition restored its
    checkpoint, which it did only when a message came: after a restart with
    no new message, every user kept serving the old window's values."""
    from tally.service.pulsar.producer import EventProducer
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    definitions = tmp_path / "defs.py"
    definitions.write_text(textwrap.dedent(WINDOWED.format(topic=topic_name)))
    command = [sys.executable, "-m", "tally", "serve", str(definitions), "--pulsar",
               pulsar_broker.service_url, "--store", str(tmp_path / "store"), "--checkpoints",
               str(tmp_path / "ckpt"), "--checkpoint-interval", "0.5", "--metrics", "off"]
    log = open(tmp_path / "serve.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def records():
        with LmdbStore(tmp_path / "store") as store:
            return store.get_many("svc_recent", list(range(20)))
    try:
        producer = EventProducer(pulsar_client, topic_name, "user")
        now = int(time.time() * 1000)
        for user in range(20):
            producer.send({"user": user, "article": 1, "readtime": 1.0, "ts": now})
        producer.close()
        wait_for(lambda: all(r is not None and r["reads"] == 1 for r in records()), 60)
    finally:
        stop(process)
    assert all(r["reads_8s"] == 1 for r in records())
    time.sleep(max(0.0, (now + 10_000 - time.time() * 1000) / 1000))   # the window has passed
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: all(r["reads_8s"] == 0 for r in records()), 30)
        assert all(r["reads"] == 1 for r in records())
    finally:
        stop(process)


@pytest.mark.pulsar
def test_floods_of_malformed_and_oversized_events_all_reach_the_dead_letter_topic(deployment):
    """Once: 1,500 malformed events between two checkpoints -> 1,000 dead
    letters (the producer's queue overflowed silently); a payload near 5 MiB
    got MessageTooBig from the dead-letter producer, unnoticed."""
    from tally.service.pulsar.producer import EventProducer
    dead = deployment.client.subscribe(dead_letter_topic(deployment.topic), "check",
                                       initial_position=pulsar.InitialPosition.Earliest)
    producer = EventProducer(deployment.client, deployment.topic, "user")
    for i in range(1500):
        producer.send_payload(b"\xc1 not msgpack %d" % i, i % 50)
    producer.send_payload(b"\xc1" + b"x" * (5_000_000), 7)          # near the 5 MiB limit
    good = {"user": 3, "article": 1, "readtime": 2.5, "ts": NOW}
    producer.send_payload(msgpack.packb(good), 3)
    producer.close()
    process = deployment.start("a")
    deployment.wait_until_serving()
    deployment.wait_until_caught_up()
    stop(process)
    letters = {}
    while True:
        try:
            message = dead.receive(timeout_millis=5000)
        except pulsar.Timeout:
            break
        letters[message.properties()["message_id"]] = message
    assert len(letters) == 1501
    big = [m for m in letters.values() if "truncated_from" in m.properties()]
    assert len(big) == 1 and big[0].properties()["truncated_from"] == "5000001"
    assert all(m.properties()["view"] == deployment.view.name for m in letters.values())
    with LmdbStore(deployment.store) as store:
        assert store.get(deployment.view.name, 3)["reads"] == 1


@pytest.mark.pulsar
def test_a_message_at_the_limit_is_stored_once_and_a_larger_one_refused(
        pulsar_broker, pulsar_client, topic_name):
    """Once, the bookie's frame limit was below the broker's message limit:
    one 5,242,722-byte message with three properties made the broker roll
    ledgers endlessly (9.3 GB of disk in 2 minutes). Now the limits agree: a
    message just under the broker's limit is stored once and read back, and
    one above it is refused to its producer."""
    consumer = pulsar_client.subscribe(topic_name, "check",
                                       initial_position=pulsar.InitialPosition.Earliest)
    producer = pulsar_client.create_producer(topic_name, batching_enabled=False)
    producer.send(b"x" * 5_242_722, properties={"a": "1", "b": "2", "c": "3"})
    assert len(consumer.receive(timeout_millis=30_000).data()) == 5_242_722
    with pytest.raises(Exception) as refused:
        producer.send(b"x" * 6_000_000)
    assert "TooBig" in type(refused.value).__name__ or "too big" in str(refused.value).lower()
    producer.send(b"small")                    # the broker serves on
    assert consumer.receive(timeout_millis=30_000).data() == b"small"
    time.sleep(3)
    data = pulsar_broker.data_dir / "bookkeeper"
    size = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    assert size < 1 << 30, f"the bookie holds {size / 1e9:.1f} GB"
    producer.close()
    consumer.close()


# --------------------------------------------------------------------------
# Corrupt files: refused with a clear message, never a crash or a lie


def test_a_truncated_store_is_refused_not_a_sigbus(tmp_path):
    """Once, a truncated data.mdb killed tally get, tally serve and the lookup
    server with SIGBUS."""
    from tally.core.record import INT64_MAX, Records, ViewSchema
    from tally.service.store import StoreError
    schema = ViewSchema("v", 1, "int64", (("n", "int64"),))
    with LmdbStore(tmp_path / "store") as store:
        store.register_view(schema)
        n = 200_000
        store.write("v", np.arange(n), Records({"n": (np.arange(n), np.ones(n, bool))},
                                                np.arange(n), 1, np.full(n, INT64_MAX)))
    data = tmp_path / "store" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(StoreError, match="is truncated"):
        LmdbStore(tmp_path / "store", readonly=True)
    done = subprocess.run([sys.executable, "-m", "tally", "get", "v", "5", "--store",
                           str(tmp_path / "store")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is truncated" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_corrupt_registry_is_refused_with_a_clear_message(tmp_path):
    """Once, a corrupt registry gave raw sqlite3.DatabaseError tracebacks, and
    a same-length edit changed a stored window while describe still showed
    the old content hash."""
    import sqlite3

    from tally.service.registry import Registry, RegistryError
    path = tmp_path / "registry.db"
    with Registry(str(path)) as registry:
        registry.apply([VIEW_WINDOWED])
    with sqlite3.connect(path) as db:
        body = db.execute("SELECT body FROM versions WHERE kind = 'view'").fetchone()[0]
        assert '"size_ms":3600000' in body
        db.execute("UPDATE versions SET body = ? WHERE kind = 'view'",
                   (body.replace('"size_ms":3600000', '"size_ms":7200000'),))
    with Registry(str(path)) as registry, pytest.raises(RegistryError, match="content hash"):
        registry.describe("windowed")
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="restore it from a backup"):
        Registry(str(path))
    done = subprocess.run([sys.executable, "-m", "tally", "list", "--registry", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


VIEW_WINDOWED = FeatureView("windowed", Entity("user"), VIEW.source, [
    Feature("n_1h", "count", window=Window.sliding("1h", "1m"))])


def test_a_stuck_worker_shows_in_health_and_metrics():
    """A worker whose receive or store call never returns begins no batch:
    /health says which partition and for how long (and the gauge shows the
    age); a worker waiting out a failing store is reported as that instead."""
    import types
    from tally.service.ingest import service as streaming
    from tally.service.metrics import OnScrape, exposition, scrape_registry

    def worker(partition, batch_age, failing=None):
        return types.SimpleNamespace(
            view=types.SimpleNamespace(name="v"), partition=partition, subscription="tally.v.0",
            schema=types.SimpleNamespace(version=1), last_batch=time.monotonic() - batch_age,
            last_checkpoint=time.monotonic(), unacknowledged=None,
            writer=types.SimpleNamespace(failing=failing), stats=IngestStats())

    workers = [worker(0, 1), worker(1, streaming.STALLED_WORKER_S + 30),
               worker(2, streaming.STALLED_WORKER_S + 30, failing=(time.monotonic(), "down"))]
    service = object.__new__(streaming.StreamingService)       # no broker, no store
    service.failures, service.checkpoint_interval_s = [], 1.0
    service.cluster = types.SimpleNamespace(admin_url=None)       # no standby watch
    service.runners = {("v", 1): types.SimpleNamespace(workers=workers, bootstrap=None,
                                                         bootstrap_progress=None)}
    articles = Source("articles", "articles", {"article": "int64", "category": "string",
                                               "ts": "int64"})
    feed = object.__new__(DimensionFeed)          # a changelog unreadable for a minute
    feed.dimension, feed.key, feed.table = articles, "article", DimensionTable(articles, "article")
    feed.rows = feed.rejected = feed.unsynced_batches = 0
    feed.synced_at, feed.error = None, (time.monotonic() - 60, "broker unreachable")
    service.dimensions = {("articles", "article"): feed}
    healthy, details = service.health()
    assert not healthy
    assert any(p.startswith("dimension 'articles': its changelog articles cannot be read for 6")
               for p in details["problems"])
    stuck = [p for p in details["problems"] if "no batch begun" in p]
    assert len(stuck) == 1 and stuck[0].startswith("v partition 1: no batch begun for 9")
    assert any(p.startswith("v partition 2: the online store has failed")
               for p in details["problems"])
    text = exposition(scrape_registry(OnScrape(service.current_metrics)))[0].decode()
    age = re.search(r'^tally_batch_age_seconds\{partition="1",version="1",view="v"\} (\S+)$',
                    text, re.M)
    assert age and float(age.group(1)) >= streaming.STALLED_WORKER_S, text
    workers[1].last_batch = time.monotonic()
    workers[2].writer.failing = None
    workers[2].last_batch = time.monotonic()
    feed.error = None
    assert service.health() == (True, {"status": "ok"})
