"""Bootstrap from history: events/s with 1 and 2 reader processes, side by
side with the naive way (one Reader per partition, earliest to the head, one
after the other, folding in this process).

A 4-partition topic in small ledgers (the filesystem offloader on, as in
tests/test_bootstrap.py) holds the quick-start's reading events; the older
half of every partition's ledgers is offloaded and deleted from BookKeeper.
Each approach builds the same state (checked: equal reads per user) from a
fresh start; the figures are medians of ``--repeat`` runs, and the offloaded
and BookKeeper tiers are reported separately (events per reader-second of
the units read from each).

The broker runs on the same two cores as the readers, so the CPU each side
spends per million events is reported too: it bounds what more readers can
gain on this machine, and what they gain where the broker has its own.
"""
import argparse
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
    args = parser.parse_args(argv)
    with LocalPulsar(max_entries_per_ledger=args.entries_per_ledger,
                     tiered_storage="s3") as broker:
        client = connect(broker.service_url)
        try:
            history = write_history(broker, client, args)
            figures = measure(broker, client, args)
            figures["training_topic_read_events_per_s"] = training_reads(broker, args.events)
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
    ledgers, offloaded = 0, set()
    for partition in range(PARTITIONS):
        name = f"{TOPIC}-partition-{partition}"
        listed = broker.internal_stats(name)["ledgers"]
        ledgers += len(listed)
        broker.offload(name, listed[len(listed) // 2]["ledgerId"])
        offloaded |= {e["ledgerId"] for e in broker.internal_stats(name)["ledgers"]
                      if e["offloaded"]}
    deadline = time.monotonic() + 120
    while not offloaded <= broker.bookkeeper_deleted_ledgers():
        if time.monotonic() > deadline:
            raise RuntimeError("offloaded ledgers were not deleted from BookKeeper")
        time.sleep(0.5)
    return {"events": args.events, "ledgers": ledgers, "offloaded_ledgers": len(offloaded)}


def measure(broker, client, args):
    runs = {"naive": [], "readers_1": [], "readers_2": []}
    cpu = {name: [] for name in runs}
    tiers = {"offloaded": [], "bookkeeper": []}
    reads = {}
    for attempt in range(args.repeat):
        before = cpu_seconds(broker)
        seconds, reads["naive"] = naive(client, view_named("naive"))
        runs["naive"].append(args.events / seconds)
        cpu["naive"].append(cpu_per_million(before, cpu_seconds(broker), args.events))
        for readers in (1, 2):
            name = f"readers_{readers}"
            before = cpu_seconds(broker)
            report, reads[name] = parallel(broker, view_named(f"r{readers}_{attempt}"), readers)
            cpu[name].append(cpu_per_million(before, cpu_seconds(broker), report["events"]))
            runs[name].append(report["events"] / report["read_seconds"])
            for tier in tiers:
                done = report[tier]
                tiers[tier].append(done["events"] / done["reader_seconds"])
    if not all(np.array_equal(reads["naive"], other) for other in reads.values()):
        raise AssertionError("the approaches built different states")
    rates = {name: round(statistics.median(values)) for name, values in runs.items()}
    return {
        "events_per_s": rates,
        "ratio_2_readers_vs_1": round(rates["readers_2"] / rates["readers_1"], 2),
        "ratio_2_readers_vs_naive": round(rates["readers_2"] / rates["naive"], 2),
        "ratio_1_reader_vs_naive": round(rates["readers_1"] / rates["naive"], 2),
        "events_per_reader_second": {t: round(statistics.median(v)) for t, v in tiers.items()},
        "cpu_seconds_per_million_events": {
            name: {side: round(statistics.median(r[side] for r in runs_), 2)
                   for side in ("broker", "tally")} for name, runs_ in cpu.items()},
        "goal_ratio_2_readers_vs_1": 1.7, "repeat": args.repeat, "cores": os.cpu_count()}


def cpu_seconds(broker):
    """CPU seconds so far of the broker (JVM and watchdog) and of Tally: this
    process plus its finished children (the reader processes)."""
    import psutil
    watchdog = psutil.Process(broker.pid)
    broker_seconds = sum(sum(p.cpu_times()[:2])
                         for p in [watchdog] + watchdog.children(recursive=True))
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"broker": broker_seconds, "tally": own.ru_utime + own.ru_stime
            + children.ru_utime + children.ru_stime}


def cpu_per_million(before, after, events):
    return {side: (after[side] - before[side]) * 1e6 / events for side in before}


def training_reads(broker, events):
    """Training sets read a topic into time-sorted chunks: one Reader per
    partition in turn vs the bootstrap's reader processes."""
    from tally.service.history.topic import PulsarTopic
    source, columns = view_named("t").source, ["user", "readtime", "ts"]
    rates = {}
    for name, topic in (("sequential", PulsarTopic(broker.service_url)),
                        ("readers_2", PulsarTopic(broker.service_url,
                                                  admin_url=broker.admin_url, readers=2))):
        started = time.monotonic()
        rows = sum(len(chunk["ts"]) for chunk in topic.sorted_chunks(source, columns))
        rates[name] = round(rows / (time.monotonic() - started))
        if rows != events:
            raise AssertionError(f"{name} read {rows} events of {events}")
    rates["ratio"] = round(rates["readers_2"] / rates["sequential"], 2)
    return rates


def naive(client, view):
    """One Reader per partition from the earliest message to the last one at
    the start, partition after partition, folding in this process (the
    training sets' sequential topic read)."""
    from tally.service.history.topic import PulsarTopic
    state = ViewState(view)
    columns = [name for name, _ in view.source.schema]
    started = time.monotonic()
    for batch in PulsarTopic(client).batches(view.source, columns):
        state.apply(batch)
    return time.monotonic() - started, reads_by_user(state)


def parallel(broker, view, readers):
    with tempfile.TemporaryDirectory() as work:
        store = LmdbStore(f"{work}/store")
        checkpoints = CheckpointStore(f"{work}/ckpt")
        try:
            report = Bootstrap(view, broker.cluster, store, checkpoints,
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
