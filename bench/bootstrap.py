"""Bootstrap from history: offloaded ledgers read through the broker and
straight from object storage, with 1 and 2 reader processes, side by side.

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
    parser.add_argument("--events", type=int, default=600_000 if quick else 3_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1 if quick else 3)
    parser.add_argument("--entries-per-ledger", type=int, default=100)
    parser.add_argument("--columnar-events", type=int,
                        default=1_000_000 if quick else 10_000_000)
    args = parser.parse_args(argv)
    with LocalPulsar(max_entries_per_ledger=args.entries_per_ledger,
                     tiered_storage="s3") as broker:
        client = connect(broker.service_url)
        try:
            history = write_history(broker, client, args)
            figures = measure(broker, args)
            figures["training_topic_read_events_per_s"] = training_reads(broker, args.events)
            figures["columnar"] = columnar(broker, client, args)
        finally:
            client.close()
    return {"benchmark": "bootstrap", **history, **figures}


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


WAYS = {"broker_1": (False, 1), "broker_2": (False, 2), "direct_1": (True, 1),
        "direct_2": (True, 2)}


def measure(broker, args):
    runs = {name: [] for name in WAYS}
    cpu = {name: [] for name in WAYS}
    per_reader = {"offloaded": [], "direct": [], "bookkeeper": []}
    reads = {}
    for attempt in range(args.repeat):
        for name, (direct, readers) in WAYS.items():
            before = cpu_seconds(broker)
            report, reads[name] = parallel(broker, view_named(f"{name}_{attempt}"), readers,
                                           direct)
            cpu[name].append(cpu_per_million(before, cpu_seconds(broker), report["events"]))
            runs[name].append(report["events"] / report["read_seconds"])
            if direct and report["direct_fallbacks"]:
                raise AssertionError(f"direct reads fell back: {report['direct_fallbacks']}")
            for tier in per_reader:
                done = report[tier]
                if done["events"]:
                    per_reader[tier].append(done["events"] / done["reader_seconds"])
    if not all(np.array_equal(reads["broker_1"], other) for other in reads.values()):
        raise AssertionError("the ways built different states")
    rates = {name: spread(values) for name, values in runs.items()}
    tiers = {tier: spread(values) for tier, values in per_reader.items() if values}
    median = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "events_per_s": rates,
        "ratio_direct_2_vs_1": round(median["direct_2"] / median["direct_1"], 2),
        "ratio_broker_2_vs_1": round(median["broker_2"] / median["broker_1"], 2),
        "ratio_direct_vs_broker_per_reader": round(
            statistics.median(per_reader["direct"]) / statistics.median(per_reader["offloaded"]),
            2),
        "ratio_direct_2_vs_broker_2": round(median["direct_2"] / median["broker_2"], 2),
        "events_per_reader_second": tiers,
        "cpu_seconds_per_million_events": {
            name: {side: round(statistics.median(r[side] for r in runs_), 2)
                   for side in ("broker", "s3", "tally")} for name, runs_ in cpu.items()},
        "goals": {"ratio_direct_2_vs_1": 1.8, "ratio_direct_vs_broker_per_reader": 10},
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
        report, _ = parallel(broker, dataclasses.replace(view, name=f"col_{attempt}"), 2, True)
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


def parallel(broker, view, readers, direct=True):
    cluster = broker.cluster
    cluster = cluster.replace(tiered_storage=dataclasses.replace(cluster.tiered_storage,
                                                                 direct=direct))
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
