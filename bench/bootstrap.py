"""Bootstrap from history: offloaded ledgers read through the broker and
straight from object storage, with 1 and 2 reader processes, side by side; and read as files from the
bucket's directory (``tiered_storage.mount``), which takes the S3 server's
CPU off the two cores the readers share with it.

A 4-partition topic in small ledgers holds the quick start's reading events,
one event a message; every closed ledger is offloaded by Pulsar's S3
offloader to s3proxy on loopback and deleted from BookKeeper, so most of the
history lies in the tier. Each way builds the same state (checked: equal
reads per user) from a fresh start; figures are medians of ``--repeat`` runs
with their spread. ``events_per_reader_second`` is each tier's events per
second of the reader processes that read it: the direct reader against the
broker path, per reader. The broker shares the two cores with the readers,
so CPU seconds per million events are reported for each side.

A second topic holds columnar messages (10,000 events each): the direct
bootstrap's events/s beside the stream's columnar ingest (``tally serve``'s
partition workers over the same backlog, through the broker).
"""
import argparse
import dataclasses
import os
import resource
import statistics
import tempfile
import time

import numpy as np

from tally.core.definitions import Entity, Feature, FeatureView, Source
from tally.core.view import ViewState
from tally.service.history.bootstrap import Bootstrap
from tally.service.ingest.checkpoint import CheckpointStore
from tally.service.pulsar.client import connect
from tally.service.store.lmdb import LmdbStore
from tally.service.pulsar.producer import EventProducer
from tally.service.pulsar.local import LocalPulsar
from tally.service.quickstart import generate_events
from tally.service.pulsar.topics import subscription_for

TOPIC = "bench_bootstrap"
PARTITIONS = 4


def view_named(name):
    source = Source("reads", TOPIC, schema={"user": "int64", "article": "int64",
                                            "readtime": "float64", "ts": "int64"})
    return FeatureView(name, Entity("user"), source, [
        Feature("reads", "count"), Feature("total_readtime", "sum", "readtime"),
        Feature("last_article", "last", "article")])


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench bootstrap")
    parser.add_argument("--events", type=int, default=600_000 if quick else 6_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1 if quick else 3)
    # ~300 events an entry: ledgers of ~300k events, objects of ~18 MB (Pulsar's
    # default rolls ledgers at 50,000 entries; far smaller objects make each
    # GET's latency on s3proxy, not the reading, what is measured)
    parser.add_argument("--entries-per-ledger", type=int, default=1000)
    parser.add_argument("--columnar-events", type=int,
                        default=1_000_000 if quick else 10_000_000)
    args = parser.parse_args(argv)
    warm_memory()
    # Blocks of 5 MB (the offloader's least; its default is 64 MB): the bench's
    # ledgers of ~18 MB then hold several blocks, as production's ledgers of
    # up to 50,000 entries (2 GB) hold many 64 MB ones. A block is the least
    # a direct reader can be given; one per ledger would leave a reader idle.
    with LocalPulsar(max_entries_per_ledger=args.entries_per_ledger, tiered_storage="s3",
                     extra_config={"managedLedgerOffloadMaxBlockSizeInBytes": 5 << 20}) \
            as broker:
        client = connect(broker.service_url)
        try:
            history = write_history(broker, client, args)
            figures = measure(broker, args)
            figures["training_topic_read_events_per_s"] = training_reads(broker, args.events)
            figures["columnar"] = columnar(broker, client, args)
        finally:
            client.close()
    return {"benchmark": "bootstrap", **history, **figures}


def warm_memory(gigabytes=2):
    """Touch and free memory once: this VM's host backs a guest page at its
    first touch at ~120 MB/s (a fresh 400 MB array: 3.3 s, then 0.03 s), a
    cost that would land on whichever way ran first."""
    np.ones((gigabytes << 30) // 8)


def write_history(broker, client, args):
    broker.create_partitioned_topic(TOPIC, PARTITIONS)
    payloads, keys, _ = generate_events(args.events, args.users, seed=3)
    producer = EventProducer(client, TOPIC, "user")
    for payload, key in zip(payloads, keys):
        producer.send_payload(payload, key)
    producer.close()
    ledgers, offloaded = offload_closed_ledgers(broker, TOPIC)
    return {"events": args.events, "ledgers": ledgers, "offloaded_ledgers": offloaded}


def offload_closed_ledgers(broker, topic):
    """Close each partition's open ledger (an unload), offload every ledger
    and wait until BookKeeper dropped them: (ledgers, offloaded ledgers)."""
    ledgers, offloaded = 0, set()
    for partition in range(PARTITIONS):
        name = f"{topic}-partition-{partition}"
        broker.admin_client.unload(name)
        listed = broker.internal_stats(name)["ledgers"]
        ledgers += len(listed)
        broker.offload(name, listed[-1]["ledgerId"], timeout=600)
        offloaded |= {e["ledgerId"] for e in broker.internal_stats(name)["ledgers"]
                      if e["offloaded"]}
    deadline = time.monotonic() + 300
    while not offloaded <= broker.bookkeeper_deleted_ledgers():
        if time.monotonic() > deadline:
            raise RuntimeError("offloaded ledgers were not deleted from BookKeeper")
        time.sleep(0.5)
    return ledgers, len(offloaded)


# name: (tier read how, readers). "mount": the same objects read as files
# from s3proxy's filesystem backend (tiered_storage.mount), as a bucket
# mounted by Mountpoint for S3 is: the object store's CPU off these 2 cores,
# as it is in production.
WAYS = {"broker_1": ("broker", 1), "broker_2": ("broker", 2), "direct_1": ("s3", 1),
        "direct_2": ("s3", 2), "mount_1": ("mount", 1), "mount_2": ("mount", 2)}


def measure(broker, args):
    runs = {name: [] for name in WAYS}          # events/s end to end (plan included)
    reading = {name: [] for name in WAYS}       # events/s once planned and readers started
    cpu = {name: [] for name in WAYS}
    per_reader = {way: [] for way in ("broker", "s3", "mount")}
    plans, ready, reads = [], [], {}
    for attempt in range(args.repeat):
        for name, (way, readers) in WAYS.items():
            before = cpu_seconds(broker)
            report, reads[name] = parallel(broker, view_named(f"{name}_{attempt}"), readers,
                                           way)
            cpu[name].append(cpu_per_million(before, cpu_seconds(broker), report["events"]))
            runs[name].append(report["events"] / report["read_seconds"])
            reading[name].append(report["events"] /
                                 (report["read_seconds"] - report["readers_ready_seconds"]))
            plans.append(report["plan_seconds"])
            ready.append(report["readers_ready_seconds"])
            if way != "broker" and report["direct_fallbacks"]:
                raise AssertionError(f"direct reads fell back: {report['direct_fallbacks']}")
            tier = report["offloaded" if way == "broker" else "direct"]
            per_reader[way].append(tier["events"] / tier["reader_seconds"])
    if not all(np.array_equal(reads["broker_1"], other) for other in reads.values()):
        raise AssertionError("the ways built different states")
    median = {name: statistics.median(values) for name, values in runs.items()}
    read_median = {name: statistics.median(values) for name, values in reading.items()}
    per_reader_median = {way: statistics.median(values) for way, values in per_reader.items()}
    return {
        "events_per_s": {name: spread(values) for name, values in runs.items()},
        "read_phase_events_per_s": {name: spread(values) for name, values in reading.items()},
        "ratio_2_vs_1_readers": {
            way: {"end_to_end": round(median[f"{way}_2"] / median[f"{way}_1"], 2),
                  "read_phase": round(read_median[f"{way}_2"] / read_median[f"{way}_1"], 2)}
            for way in ("broker", "direct", "mount")},
        "ratio_per_reader_vs_broker": {
            way: round(per_reader_median[way] / per_reader_median["broker"], 2)
            for way in ("s3", "mount")},
        "ratio_direct_2_vs_broker_2": round(median["direct_2"] / median["broker_2"], 2),
        "events_per_reader_second": {way: spread(v) for way, v in per_reader.items()},
        "plan_seconds": f"{statistics.median(plans):.3f} [{min(plans):.3f}, {max(plans):.3f}]",
        "readers_ready_seconds": f"{statistics.median(ready):.3f} [{min(ready):.3f}, "
                                 f"{max(ready):.3f}]",
        "cpu_seconds_per_million_events": {
            name: {side: round(statistics.median(r[side] for r in runs_), 2)
                   for side in ("broker", "s3", "tally")} for name, runs_ in cpu.items()},
        "goals": {"ratio_2_vs_1_readers (direct)": 1.8, "ratio_per_reader_vs_broker": 10},
        "repeat": args.repeat, "cores": os.cpu_count()}


def spread(values):
    """median [min, max], rounded."""
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}, {max(values):,.0f}]"


def columnar(broker, client, args):
    """Columnar messages: the direct bootstrap with 2 readers against the
    stream's columnar ingest of the same backlog."""
    from tally.bench.ingest import generate_columns, reading_view, tally_rates
    from tally.service.pulsar.producer import ColumnarProducer
    topic, fmt = f"{TOPIC}_columnar", "msgpack-columnar"
    broker.create_partitioned_topic(topic, PARTITIONS)
    producer = ColumnarProducer(client, topic, "user", format=fmt,
                                max_events_per_message=10_000)
    columns = generate_columns(args.columnar_events, args.users, seed=5)
    for at in range(0, args.columnar_events, 2_000_000):
        producer.send_columns({k: v[at:at + 2_000_000] for k, v in columns.items()})
    producer.close()
    offload_closed_ledgers(broker, topic)
    view = reading_view(topic, fmt)
    direct = []
    for attempt in range(args.repeat):
        report, _ = parallel(broker, dataclasses.replace(view, name=f"col_{attempt}"), 2)
        if report["events"] != args.columnar_events or report["direct"]["units"] == 0:
            raise AssertionError(f"the columnar bootstrap read {report['events']} events")
        direct.append(report["events"] / report["read_seconds"])
    with tempfile.TemporaryDirectory() as work:
        ingest = tally_rates(client, producer.messages, f"{work}/store", view)
    return {"events": args.columnar_events, "messages": producer.messages,
            "direct_2_readers_events_per_s": spread(direct),
            "stream_ingest_events_per_s": round(ingest["end_to_end"]),
            "ratio_direct_vs_stream_ingest": round(statistics.median(direct)
                                                   / ingest["end_to_end"], 2)}


def cpu_seconds(broker):
    """CPU seconds so far of the broker (JVM and watchdog), of the S3
    endpoint (s3proxy: in production the object store is elsewhere) and of
    Tally: this process plus its finished children (the reader processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"broker": _tree_cpu(broker.pid), "s3": _tree_cpu(broker.s3.pid),
            "tally": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime}


def _tree_cpu(pid):
    """A running process's CPU seconds with its children's (RUSAGE_CHILDREN
    counts a child only once it has exited)."""
    import psutil
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root] + root.children(recursive=True))


def cpu_per_million(before, after, events):
    return {side: (after[side] - before[side]) * 1e6 / events for side in before}


def training_reads(broker, events):
    """Training sets read a topic into time-sorted chunks: one Reader per
    partition in turn vs the bootstrap's reader processes."""
    from tally.service.history.topic import PulsarTopic
    source, columns = view_named("t").source, ["user", "readtime", "ts"]
    rates = {}
    for name, topic in (("sequential", PulsarTopic(broker.service_url)),
                        ("readers_2", PulsarTopic(broker.cluster, readers=2))):
        started = time.monotonic()
        rows = sum(len(chunk["ts"]) for chunk in topic.sorted_chunks(source, columns))
        rates[name] = round(rows / (time.monotonic() - started))
        if rows != events:
            raise AssertionError(f"{name} read {rows} events of {events}")
    rates["ratio"] = round(rates["readers_2"] / rates["sequential"], 2)
    return rates


def parallel(broker, view, readers, way="s3"):
    """Bootstrap ``view`` with ``readers``, its offloaded ledgers read
    through the broker, from S3, or from the bucket's files ("mount")."""
    cluster = broker.cluster
    tier = dataclasses.replace(cluster.tiered_storage, direct=way != "broker",
                               mount=str(broker.s3.blob_dir) if way == "mount" else None)
    cluster = cluster.replace(tiered_storage=tier)
    with tempfile.TemporaryDirectory() as work:
        store = LmdbStore(f"{work}/store")
        checkpoints = CheckpointStore(f"{work}/ckpt")
        try:
            report = Bootstrap(view, cluster, store, checkpoints,
                               subscription_for(view), readers=readers).run()
            state_reads = reads_from_checkpoints(view, checkpoints)
        finally:
            store.close()
    return report, state_reads


def reads_from_checkpoints(view, checkpoints):
    from tally.core.definitions import state_hash
    parts = []
    for partition in range(PARTITIONS):
        arrays, meta = checkpoints.load(view.name, state_hash(view), partition, 1)
        parts.append(ViewState.from_arrays(view, meta["params"], arrays))
    merged = ViewState(view)
    for part in parts:                     # partitions hold disjoint users
        merged.merge(part)
    return reads_by_user(merged)


def reads_by_user(state):
    keys = np.sort(state.index.all_keys())
    values, _ = state.read_keys(keys, int(time.time() * 1000))["reads"]
    return np.stack([keys, values.astype(np.int64)])
