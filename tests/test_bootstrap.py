"""Bootstrap from history: parallel reads of BookKeeper and offloaded ledgers
(and a Parquet archive), merged, then an exact handover to the stream —
against a real broker offloading to a real S3 endpoint (s3proxy)."""
import asyncio
import dataclasses
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tally.core.definitions import Entity, Feature, FeatureView, Source, Window
from tally.core.view import ViewState
from tally.service.history.bootstrap import Bootstrap, BootstrapCancelled
from tally.service.ingest.checkpoint import CheckpointStore
from tally.service.pulsar.client import connect
from tally.core.archive import write_archive
from tally.service.history.plan import ledger_ranges, partition_cut, plan_partition
from tally.service.pulsar.topics import END_OF_ENTRY
from tally.service.store.lmdb import LmdbStore
from tally.service.ingest.partition import PartitionWorker
from tally.service.pulsar.producer import EventProducer, partitions_of
from tally.service.quickstart import generate_events
from tally.service.pulsar.topics import subscription_for

N_PARTITIONS = 4
SCHEMA = {"user": "int64", "article": "int64", "readtime": "float64", "ts": "int64"}


# --------------------------------------------------------------------------
# Planning (no broker)


def stats_of(ledgers, last_confirmed):
    """Internal stats as the broker reports them: the open ledger shows 0 entries."""
    return {"lastConfirmedEntry": last_confirmed,
            "ledgers": [{"ledgerId": lid, "entries": n, "size": n * 100, "offloaded": off}
                        for lid, n, off in ledgers]}


def expand(units, ledger_sizes):
    """Every (ledger, entry) the units cover, in order."""
    order = list(ledger_sizes)
    entries = []
    for unit in units:
        (l0, e0), (l1, e1) = unit.first, unit.last
        for ledger in order[order.index(l0):order.index(l1) + 1]:
            start = e0 if ledger == l0 else 0
            stop = e1 if ledger == l1 else ledger_sizes[ledger] - 1
            entries += [(ledger, e) for e in range(start, stop + 1)]
    return entries


@pytest.mark.parametrize("target_entries", [1, 3, 7, 50, 1000])
def test_plan_covers_every_entry_up_to_the_cut_once_in_order(target_entries):
    ledgers = [(3, 10, True), (4, 0, True), (7, 25, True), (9, 5, False), (12, 0, False)]
    stats = stats_of(ledgers, "12:6")          # the open ledger 12 holds entries 0..6
    stats.update(currentLedgerEntries=7, currentLedgerSize=700)
    units = plan_partition(2, stats, target_entries * 100)     # 100 bytes an entry
    sizes = {3: 10, 7: 25, 9: 5, 12: 7}
    expected = [(ledger, e) for ledger, n in sizes.items() for e in range(n)]
    assert expand(units, sizes) == expected
    assert all(u.partition == 2 for u in units)
    assert all(u.entries <= target_entries for u in units)
    assert sum(u.entries for u in units) == len(expected)
    assert sum(u.bytes for u in units) == 100 * len(expected)
    # a unit never mixes the tiers: the offloaded ledgers come first, whole
    offloaded = [u for u in units if u.offloaded]
    assert sum(u.entries for u in offloaded) == 35
    assert all(u.first[0] in (3, 7) and u.last[0] in (3, 7) for u in offloaded)


def test_plan_of_an_empty_open_ledger_and_of_an_empty_topic():
    stats = stats_of([(5, 4, False), (6, 0, False)], "6:-1")
    stats.update(currentLedgerEntries=0, currentLedgerSize=0)
    assert ledger_ranges(stats) == [(5, 4, 400, False)]
    assert [u.last for u in plan_partition(0, stats, 10**6)] == [(5, 3)]
    assert plan_partition(0, stats_of([(8, 0, False)], "8:-1"), 10**6) == []


def test_entries_written_after_the_cut_are_not_planned():
    # the broker closed ledger 5 with 9 entries after the stats said 5:3
    stats = stats_of([(5, 9, False)], "5:3")
    assert [(u.first, u.last) for u in plan_partition(0, stats, 10**6)] == [((5, 0), (5, 3))]


# --------------------------------------------------------------------------
# A broker with tiered storage, and a topic with offloaded history


@pytest.fixture(scope="module")
def tiered_broker(tmp_path_factory):
    from tally.service.pulsar.local import LocalPulsar
    broker = LocalPulsar(data_dir=tmp_path_factory.mktemp("tiered"), max_entries_per_ledger=20,
                         tiered_storage="s3")
    broker.start(timeout=180)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def client(tiered_broker):
    client = connect(tiered_broker.service_url, operation_timeout_seconds=30)
    yield client
    client.close()


def reading_view(topic, name):
    source = Source("reads", topic, schema=SCHEMA)
    hourly = Window.sliding("1h", "10m")
    return FeatureView(name, Entity("user"), source, [
        Feature("total", "sum", "readtime"), Feature("reads", "count"),
        Feature("last_article", "last", "article"),
        Feature("hour_reads", "count", window=hourly, lateness_ms="5m")])


class History:
    """A topic, what was written to it (in send order), and a producer."""

    def __init__(self, client, topic):
        self.topic, self.events = topic, []
        self.producer = EventProducer(client, topic, "user")

    def write(self, payloads, keys, events, pause_every=0):
        for i, (payload, key) in enumerate(zip(payloads, keys)):
            self.producer.send_payload(payload, key)
            if pause_every and i % pause_every == pause_every - 1:
                time.sleep(0.01)       # a producer still writing during the bootstrap
        self.producer.flush()
        self.events.append(pd.DataFrame(events))

    def frame(self):
        return pd.concat(self.events, ignore_index=True)


def offload_half(broker, topic):
    """Offload the older half of every partition's ledgers and wait until their
    BookKeeper copies are deleted; returns the offloaded ledger ids."""
    offloaded = set()
    for partition in range(N_PARTITIONS):
        name = f"{topic}-partition-{partition}"
        ledgers = broker.internal_stats(name)["ledgers"]
        assert len(ledgers) >= 6, "the history should span many small ledgers"
        broker.offload(name, ledgers[len(ledgers) // 2]["ledgerId"])
        offloaded |= {entry["ledgerId"] for entry in broker.internal_stats(name)["ledgers"]
                      if entry["offloaded"]}
    deadline = time.monotonic() + 60
    while not offloaded <= broker.bookkeeper_deleted_ledgers():
        assert time.monotonic() < deadline, "offloaded ledgers were not deleted from BookKeeper"
        time.sleep(0.5)
    return offloaded


def stream_until_drained(broker, view, client, store, checkpoints, version=1):
    """Run the partition workers from the bootstrap's checkpoints until each
    has folded its partition's last message; returns them."""
    workers = [PartitionWorker(view, p, client, store, checkpoints, "test",
                               subscription=subscription_for(view), version=version,
                               checkpoint_interval_s=0.2, batch_size=5000)
               for p in range(N_PARTITIONS)]
    try:
        for worker in workers:
            worker.adopt_latest_checkpoint()
            name = f"{view.source.topic}-partition-{worker.partition}"
            last = partition_cut(broker.internal_stats(name))
            deadline = time.monotonic() + 60
            while worker.position[:2] < last:
                assert time.monotonic() < deadline, f"{name} not drained"
                asyncio.run(worker.process(worker.receive()))
            # a batch can end inside the last entry: drain until nothing is left
            while asyncio.run(worker.process(worker.receive())):
                assert time.monotonic() < deadline, f"{name} not drained"
            if worker.unacknowledged is not None:
                worker.checkpoint()
        return workers
    finally:
        for worker in workers:
            worker.close()


def bootstrap_and_stream(broker, client, view, tmp_path, readers=2):
    """Bootstrap ``view`` into ``tmp_path``'s store, then stream to the end."""
    store, checkpoints = LmdbStore(str(tmp_path / "store")), CheckpointStore(tmp_path / "ckpt")
    try:
        report = Bootstrap(view, broker.cluster, store, checkpoints,
                           subscription_for(view), readers=readers).run()
        stream_until_drained(broker, view, client, store, checkpoints)
    finally:
        store.close()
    return report


def expected_lifetime(frame):
    """pandas over every event; ``last`` is the newest event time's value, the
    later arrival among equal times (``frame`` is in arrival order)."""
    by_time = frame.sort_values("ts", kind="stable")
    return by_time.groupby("user").agg(total=("readtime", "sum"), reads=("readtime", "size"),
                                       last_article=("article", "last"))


def sequential_state(view, frame):
    """The oracle for windowed features: one state folding each partition's
    events in the order they were written, no parallelism, no merge."""
    state = ViewState(view)
    partitions = partitions_of(frame["user"].to_numpy(), N_PARTITIONS)
    for partition in range(N_PARTITIONS):
        mine = frame[partitions == partition]
        state.apply({name: mine[name].to_numpy() for name in SCHEMA})
    return state


def assert_served_equals_oracle(store_path, view, frame):
    expected = expected_lifetime(frame)
    users = expected.index.to_numpy()
    with LmdbStore(store_path) as store:
        got = store.get_many(view.name, users)
    assert all(r is not None for r in got)
    np.testing.assert_array_equal([r["reads"] for r in got], expected["reads"])
    np.testing.assert_allclose([r["total"] for r in got], expected["total"], rtol=1e-9)
    np.testing.assert_array_equal([r["last_article"] for r in got], expected["last_article"])


def assert_states_equal(worker_states, oracle, frame):
    as_of = int(frame["ts"].max())
    keys = np.unique(frame["user"].to_numpy())
    expected = oracle.read_keys(keys, as_of)
    got = {}
    for state in worker_states:
        present = state.index.lookup(keys) >= 0
        part = state.read_keys(keys[present], as_of)
        for name, (values, valid) in part.items():
            got.setdefault(name, (np.zeros(len(keys)), np.zeros(len(keys), bool)))
            got[name][0][present], got[name][1][present] = values, valid
    for name, (values, valid) in expected.items():
        np.testing.assert_array_equal(got[name][1], valid, err_msg=name)
        np.testing.assert_allclose(got[name][0][valid], values[valid], rtol=1e-9,
                                   err_msg=name)


@pytest.fixture(scope="module")
def offloaded_history(tiered_broker, client):
    """450,000 events over 4 partitions in small ledgers, half of them offloaded
    and deleted from BookKeeper; 50,000 more are written during the bootstraps."""
    topic = "bootstrap-history"
    tiered_broker.create_partitioned_topic(topic, N_PARTITIONS)
    history = History(client, topic)
    payloads, keys, events = generate_events(450_000, 30_000, seed=11,
                                             malformed_fraction=0.0005)
    history.write(payloads, keys, events)
    offloaded = offload_half(tiered_broker, topic)
    return history, offloaded


@pytest.mark.pulsar
@pytest.mark.parametrize("readers,direct", [(1, True), (2, True), (4, False)])
def test_bootstrap_with_producers_writing_equals_batch_recomputation(
        tiered_broker, client, offloaded_history, readers, direct, tmp_path):
    """Offloaded ledgers read straight from S3 (direct) or through the broker."""
    history, offloaded = offloaded_history
    view = reading_view(history.topic, f"reading_r{readers}")
    cluster = tiered_broker.cluster
    cluster = cluster.replace(tiered_storage=dataclasses.replace(cluster.tiered_storage,
                                                                 direct=direct))
    # 50,000 more events arrive while the bootstrap runs
    payloads, keys, events = generate_events(50_000, 30_000, seed=100 + readers)
    writer = threading.Thread(target=history.write, args=(payloads, keys, events, 500))
    store, checkpoints = LmdbStore(str(tmp_path / "store")), CheckpointStore(tmp_path / "ckpt")
    try:
        writer.start()
        # small units: several per partition and tier, some splitting ledgers
        job = Bootstrap(view, cluster, store, checkpoints, subscription_for(view),
                        readers=readers, units_per_reader=16, min_unit_bytes=256 << 10)
        report = job.run()
        writer.join()
        assert report["units"] >= 3 * N_PARTITIONS
        assert report["partitions"] == list(range(N_PARTITIONS))
        tier, other = ("direct", "offloaded") if direct else ("offloaded", "direct")
        assert report[tier]["events"] > 100_000 and report[other]["units"] == 0, report
        # direct reads turned off are a choice: no fallback, nothing on /health
        assert report["direct_fallbacks"] == [] and report["entries_left_out"] == {}, report
        assert job.warnings() == []
        assert report["bookkeeper"]["events"] > 100_000, report
        assert report["rejected"] > 0 and report["reject_reasons"]
        workers = stream_until_drained(tiered_broker, view, client, store, checkpoints)
    finally:
        writer.join()
        store.close()
    frame = history.frame()
    # the bootstrap and the stream together saw every event exactly once
    assert report["events"] + sum(w.stats.events for w in workers) == len(frame)
    assert_served_equals_oracle(tmp_path / "store", view, frame)
    assert_states_equal([w.state for w in workers], sequential_state(view, frame), frame)
    assert offloaded <= tiered_broker.bookkeeper_deleted_ledgers()


@pytest.mark.pulsar
def test_an_interrupted_bootstrap_resumes_from_completed_units(
        tiered_broker, client, offloaded_history, tmp_path):
    history, _ = offloaded_history
    view = reading_view(history.topic, "reading_resumed")
    store, checkpoints = LmdbStore(str(tmp_path / "store")), CheckpointStore(tmp_path / "ckpt")
    try:
        job = Bootstrap(view, tiered_broker.cluster, store,
                        checkpoints, subscription_for(view), readers=2,
                        progress=lambda done, total, events, eta: done >= 3 and job.cancel())
        with pytest.raises(BootstrapCancelled):
            job.run()
        assert checkpoints.latest_sequence(view.name, job.state_hash, 0) == 0
        report = Bootstrap(view, tiered_broker.cluster, store,
                           checkpoints, subscription_for(view), readers=2).run()
        assert report["units_resumed"] >= 3
        # a third run finds every partition bootstrapped
        again = Bootstrap(view, tiered_broker.cluster, store,
                          checkpoints, subscription_for(view)).run()
        assert again["partitions"] == []
        stream_until_drained(tiered_broker, view, client, store, checkpoints)
    finally:
        store.close()
    assert_served_equals_oracle(tmp_path / "store", view, history.frame())


@pytest.mark.pulsar
def test_tally_bootstrap_command_bootstraps_a_registry_view(
        tiered_broker, offloaded_history, tmp_path):
    import json
    import subprocess
    import sys

    from tally.service.registry import Registry
    history, _ = offloaded_history
    view = reading_view(history.topic, "reading_cli")
    registry = str(tmp_path / "registry.db")
    with Registry(registry) as handle:
        handle.apply([view])
    done = subprocess.run(
        [sys.executable, "-m", "tally", "bootstrap", "reading_cli", "--registry", registry,
         "--pulsar", tiered_broker.service_url, "--admin", tiered_broker.admin_url,
         "--store", str(tmp_path / "store"), "--checkpoints", str(tmp_path / "ckpt"),
         "--readers", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert "ETA" not in done.stderr     # no progress bar: stderr is not a terminal
    assert report["partitions"] == list(range(N_PARTITIONS))
    frame = history.frame()
    assert report["events"] == len(frame)       # no producer writes during this test
    assert_served_equals_oracle(tmp_path / "store", view, frame)


@pytest.mark.pulsar
def test_archive_and_topic_meet_at_the_boundary_without_overlap(
        tiered_broker, client, tmp_path):
    """The archive holds the events before T, the topic those from T on, and
    both also hold some of the other's (an export running late, a topic
    retained longer): every event counts once, also the ones at exactly T."""
    topic = "bootstrap-archive"
    tiered_broker.create_partitioned_topic(topic, N_PARTITIONS)
    _, _, events = generate_events(120_000, 5_000, seed=21)
    frame = pd.DataFrame(events).sort_values("ts", kind="stable").reset_index(drop=True)
    boundary = int(frame["ts"].iloc[70_000])
    frame.loc[69_990:70_010, "ts"] = boundary          # a crowd exactly at the boundary
    before, after = frame[frame["ts"] < boundary], frame[frame["ts"] >= boundary]
    overlap = frame[(frame["ts"] >= boundary - 1_800_000) & (frame["ts"] < boundary)]
    late_export = frame[(frame["ts"] >= boundary) & (frame["ts"] < boundary + 1_800_000)]
    assert len(overlap) > 1000 and len(late_export) > 1000
    archive = tmp_path / "archive"
    write_archive(pa.Table.from_pandas(pd.concat([before, late_export]), preserve_index=False),
                  str(archive), events_before_ms=boundary, row_group_size=10_000)
    on_topic = pd.concat([overlap, after])
    history = History(client, topic)
    producer_payloads = [_pack(row) for row in on_topic.itertuples(index=False)]
    history.write(producer_payloads, on_topic["user"].tolist(), on_topic.to_dict("list"))

    view = reading_view(topic, "reading_archived")
    view = dataclasses.replace(view, source=dataclasses.replace(view.source,
                                                                archive=str(archive)))
    report = bootstrap_and_stream(tiered_broker, client, view, tmp_path)
    assert report["events_before_ms"] == boundary
    assert report["archive"]["events"] == len(before)
    assert report["events"] == len(frame)
    assert report["outside_boundary"] == len(overlap) + len(late_export)
    assert_served_equals_oracle(tmp_path / "store", view, frame)

    # training data reads the same archive and topic by the same rule
    from tally.service.training import training_set
    expected = expected_lifetime(frame)
    spine = pd.DataFrame({"user": expected.index, "ts": int(frame["ts"].max()) + 1})
    from tally.service.training import PulsarTopic
    parallel = PulsarTopic(tiered_broker.service_url, admin_url=tiered_broker.admin_url,
                           readers=2)
    for pulsar in (tiered_broker.service_url, parallel):
        table = training_set(spine, [view], views=[view], pulsar=pulsar)
        trained = table.to_pandas().set_index("user").loc[expected.index]
        np.testing.assert_array_equal(trained["reads"], expected["reads"])
        np.testing.assert_allclose(trained["total"], expected["total"], rtol=1e-9)
        np.testing.assert_array_equal(trained["last_article"], expected["last_article"])
    assert parallel.messages == len(on_topic)


@pytest.mark.pulsar
def test_string_keys_and_an_archive_split_across_partitions(tiered_broker, client, tmp_path):
    """String entity keys: the archive's rows are routed to partitions by the
    producers' hash, so each partition's state meets its own topic events."""
    topic = "bootstrap-strings"
    tiered_broker.create_partitioned_topic(topic, N_PARTITIONS)
    rng = np.random.default_rng(4)
    n = 40_000
    frame = pd.DataFrame({"user": [f"reader-{k}" for k in rng.integers(0, 3_000, n)],
                          "article": rng.integers(0, 100, n),
                          "readtime": np.round(rng.random(n) * 60, 3),
                          "ts": np.sort(rng.integers(0, 10**9, n)) + 1_700_000_000_000})
    boundary = int(frame["ts"].iloc[n // 2])
    write_archive(pa.Table.from_pandas(frame[frame["ts"] < boundary], preserve_index=False),
                  str(tmp_path / "archive"), events_before_ms=boundary, row_group_size=4_000)
    on_topic = frame[frame["ts"] >= boundary]
    producer = EventProducer(client, topic, "user")
    for row in on_topic.itertuples(index=False):
        producer.send({"user": row.user, "article": int(row.article),
                       "readtime": float(row.readtime), "ts": int(row.ts)})
    producer.close()
    source = Source("reads", topic, schema={**SCHEMA, "user": "string"},
                    archive=str(tmp_path / "archive"))
    view = FeatureView("reading_strings", Entity("reader", key_type="string"), source, [
        Feature("total", "sum", "readtime"), Feature("reads", "count"),
        Feature("last_article", "last", "article")], key_column="user")
    report = bootstrap_and_stream(tiered_broker, client, view, tmp_path)
    assert report["events"] == n and report["archive"]["units"] > 1
    assert_served_equals_oracle(tmp_path / "store", view, frame)


@pytest.mark.pulsar
def test_a_view_with_a_join_bootstraps_in_parallel_and_hands_over_exactly(
        tiered_broker, client, tmp_path):
    """Reads joined with an articles changelog (re-categorisations included):
    readers fold units of history, each event joined with the article row
    valid at its time; the stream goes on from the cut, its dimension feed
    loading the changelog itself; the served histograms and means equal
    pandas' merge_asof over every read."""
    from tally.core.definitions import Join
    from tally.service.ingest.run import Ingestion
    reads_topic, articles_topic = "bootstrap-joined", "bootstrap-joined-articles"
    tiered_broker.create_partitioned_topic(reads_topic, N_PARTITIONS)
    tiered_broker.create_partitioned_topic(articles_topic, 2)
    articles = Source("articles", articles_topic, schema={
        "article": "int64", "category": "string", "content_length": "int64", "ts": "int64"})
    view = FeatureView("taste_joined", Entity("user"), Source("reads", reads_topic, SCHEMA), [
        Feature("categories", "histogram", "category", k=8),
        Feature("length", "mean", "content_length")], joins=[Join(articles, on="article")])
    rng = np.random.default_rng(8)
    start, span = 1_700_000_000_000, 10**8
    times = iter(start + rng.choice(span, 50_000, replace=False))    # unique times

    def article_rows(ids):
        return pd.DataFrame({"article": ids, "category": rng.choice(list("ABCDEF"), len(ids)),
                             "content_length": rng.integers(100, 5000, len(ids)),
                             "ts": [next(times) for _ in ids]})

    def read_rows(n):
        return pd.DataFrame({"user": rng.integers(0, 500, n), "article": rng.integers(0, 330, n),
                             "readtime": np.round(rng.random(n) * 60, 3),
                             "ts": [next(times) for _ in range(n)]})

    def send(topic, key, frame):
        producer = EventProducer(client, topic, key)
        for row in frame.to_dict("records"):
            producer.send({k: (v if isinstance(v, str) else int(v) if k != "readtime"
                               else float(v)) for k, v in row.items()})
        producer.close()

    # history: 300 articles and 60 re-categorisations among 30,000 reads;
    # articles 300-329 are never described (their reads join nothing)
    versions = [article_rows(np.arange(300)), article_rows(rng.integers(0, 300, 60))]
    reads = [read_rows(30_000)]
    send(articles_topic, "article", pd.concat(versions))
    send(reads_topic, "user", reads[0])
    store, checkpoints = LmdbStore(str(tmp_path / "store")), CheckpointStore(tmp_path / "ckpt")
    try:
        report = Bootstrap(view, tiered_broker.cluster, store, checkpoints,
                           subscription_for(view), readers=2, units_per_reader=6,
                           min_unit_bytes=32 << 10).run()
        assert report["events"] == 30_000 and report["units"] > N_PARTITIONS, report
        assert report["join_misses"] > 0
        # then the stream: more re-categorisations, then more reads
        versions.append(article_rows(rng.integers(0, 300, 20)))
        reads.append(read_rows(5_000))
        send(articles_topic, "article", versions[-1])
        send(reads_topic, "user", reads[-1])
        with Ingestion(view, client, store, checkpoint_dir=str(tmp_path / "ckpt"),
                       subscription=subscription_for(view)) as stream:
            stream.run(until=lambda s: s.stats.messages >= 5_000, idle_timeout_s=60)
            assert stream.stats.events == 5_000
        users = np.arange(500)
        got = store.get_many(view.name, users)
    finally:
        store.close()
    def as_of(events, known):        # each event with the newest known version at its time
        return pd.merge_asof(events.sort_values("ts"), pd.concat(known).sort_values("ts").rename(
            columns={"ts": "version_ts"}), left_on="ts", right_on="version_ts", by="article")
    # a version published after an event was folded does not change it (a late row)
    joined = pd.concat([as_of(reads[0], versions[:2]), as_of(reads[1], versions)])
    for user, record in zip(users, got):
        mine = joined[joined.user == user]
        if mine.empty:
            assert record is None
            continue
        counts = mine.category.dropna().value_counts().to_dict()
        assert dict(record["categories"]) == counts, user
        lengths = mine.content_length.dropna()
        if lengths.empty:
            assert record["length"] is None, user
        else:
            assert record["length"] == pytest.approx(lengths.mean(), rel=1e-12), user


def _pack(row):
    import msgpack
    return msgpack.packb({"user": int(row.user), "article": int(row.article),
                          "readtime": float(row.readtime), "ts": int(row.ts)})


def test_cut_position_covers_every_message_of_the_cut_entry():
    from tally.service.history.plan import cut_position
    cut = cut_position({"lastConfirmedEntry": "7:12", "ledgers": []})
    assert (7, 12, 999) <= cut and (7, 12, -1) <= cut and (7, 13, -1) > cut
    assert cut[2] == END_OF_ENTRY
