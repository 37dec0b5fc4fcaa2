"""End-to-end ingest rate: Pulsar -> decode -> core -> LMDB, side by side with
the bare Python pulsar-client receiving the same messages from the same broker,
and the same pipeline reading columnar batches (many events per message).

1. One event per message: a backlog of msgpack reading events on a
   4-partition topic, read by the bare client (batch-receive, take each
   payload's bytes, acknowledge: the ceiling for any Python consumer) and by
   Tally's pipeline, each through its own subscription, one after the other.
2. Columnar batches (``--format arrow|msgpack-columnar|both``): the same kind of
   events, written by ``ColumnarProducer`` (up to ``--events-per-message``
   events a message) to their own 4-partition topic, read by the pipeline of a
   view whose source has that format. Reported as a ratio to the pipeline's
   one-event-per-message rate of step 1, measured the same way in the same run.

Rates: ``end_to_end`` counts from starting the pipeline to the last event
folded (as issue 2 did); ``steady`` counts from the end of the first batch on,
so it leaves out the ~1 s a Failover subscription waits before the broker
dispatches to a new consumer and the first read from the bookie, which weigh a
lot in a short columnar run. ``events_per_cpu_s`` is events per CPU-second of
the whole Tally process (pipeline thread plus the client's I/O threads):
events/s per core, whatever the broker (on the same cores) leaves over.
"""
import argparse
import dataclasses
import tempfile
import time

import numpy as np
import pulsar

from tally.core.events import decode_payloads
from tally.core.formats import encode_columns
from tally.service.ingest.run import Ingestion
from tally.service.pulsar.client import connect, raw
from tally.service.store.lmdb import LmdbStore
from tally.service.pulsar.producer import ColumnarProducer, EventProducer
from tally.service.pulsar.local import LocalPulsar
from tally.service.quickstart import START_MS, generate_events, read_events, user_reading

TOPIC = "bench_ingest"
COLUMNAR_FORMATS = ("arrow", "msgpack-columnar")
# The local broker's bookie read-ahead cache is 32 MB by default (sized for CI);
# one read-ahead of 100 columnar entries (~330 kB each) overflows it, and the
# bookie then re-reads from disk: ~30 MB/s instead of ~100 MB/s here. Any real
# bookie has far more; both halves of the run use the same broker.
BROKER_CONFIG = {"dbStorage_readAheadCacheMaxSizeMb": 256}


def bare_client_rate(client, n_messages, subscription, topic=TOPIC):
    consumer = client.subscribe(
        topic, subscription, consumer_type=pulsar.ConsumerType.Failover,
        initial_position=pulsar.InitialPosition.Earliest, receiver_queue_size=1000,
        # the settings that received fastest here, and the pipeline's defaults
        batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(1000, 64 << 20, 10))
    receiver = raw(consumer)
    received = 0
    start = time.perf_counter()
    while received < n_messages:
        messages = receiver.batch_receive()
        for message in messages:
            message.data()
        last = {}
        for message in messages:
            last[message.topic_name()] = message
        for message in last.values():
            receiver.acknowledge_cumulative(message)
        received += len(messages)
    elapsed = time.perf_counter() - start
    consumer.close()
    return received / elapsed


def reading_view(topic=TOPIC, fmt="msgpack"):
    """The quick start's view over ``topic`` in format ``fmt``."""
    return dataclasses.replace(user_reading, source=dataclasses.replace(
        read_events, topic=topic, format=fmt))


def tally_rates(client, n_messages, store_dir, view, subscription=None, **worker_options):
    """{end_to_end, steady, events_per_cpu_s} of the production partition
    workers (``Ingestion``: the path ``tally serve`` runs, checkpoints and
    dimension feeds included) over a backlog; ``worker_options`` go to each
    ``PartitionWorker`` (``clock``, say)."""
    first = {}

    def until(ingestion):
        stats = ingestion.stats
        if "at" not in first and stats.events:       # the end of the first batch
            first["at"], first["events"] = time.perf_counter(), stats.events
        return stats.messages >= n_messages

    with LmdbStore(store_dir) as store, \
            Ingestion(view, client, store, subscription=subscription or "tally-bench",
                      **worker_options) as reader:
        start, cpu = time.perf_counter(), time.process_time()
        reader.run(until=until)
        end, cpu = time.perf_counter(), time.process_time() - cpu
        stats = reader.stats
    events = stats.events
    steady_events = events - first.get("events", 0)
    steady_time = end - first.get("at", start)
    return {"events": events, "rejected": stats.rejected,
            "end_to_end": events / (end - start),
            "steady": steady_events / steady_time if steady_events else 0.0,
            "events_per_cpu_s": events / cpu, "batches": stats.batches,
            "join_misses": stats.join_misses}


def generate_columns(n_events, n_users, seed=0):
    """Reads as numpy columns, distributed like ``generate_events``."""
    rng = np.random.default_rng(seed)
    return {"user": (rng.zipf(1.3, n_events) - 1) % n_users,
            "article": rng.integers(0, 50_000, n_events),
            "readtime": np.round(rng.lognormal(3.0, 1.0, n_events), 3),
            "ts": START_MS + np.sort(rng.integers(0, 86_400_000, n_events))}


def decode_rate(payloads, fmt):
    """Decoding alone (in memory), events/s: best of 3."""
    source = dataclasses.replace(read_events, format=fmt)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        events = decode_payloads(payloads, source)
        best = min(best, time.perf_counter() - start)
    return events.n_events / best


def columnar_run(client, broker, fmt, columns, events_per_message, store_dir, one_event):
    topic = f"{TOPIC}_{fmt.replace('-', '_')}"
    broker.create_partitioned_topic(topic, 4)
    n = len(columns["user"])
    producer = ColumnarProducer(client, topic, "user", format=fmt,
                                max_events_per_message=events_per_message)
    start = time.perf_counter()
    slice_rows = 2_000_000
    for at in range(0, n, slice_rows):
        producer.send_columns({k: v[at:at + slice_rows] for k, v in columns.items()})
    producer.close()
    produce = n / (time.perf_counter() - start)
    sample = [encode_columns({k: v[i:i + events_per_message] for k, v in columns.items()}, fmt)
              for i in range(0, min(n, 100 * events_per_message), events_per_message)]
    rates = tally_rates(client, producer.messages, store_dir, reading_view(topic, fmt))
    assert rates["events"] == n and rates["rejected"] == 0, rates
    return {"events": n, "messages": producer.messages,
            "events_per_message": events_per_message,
            "produce_events_per_s": round(produce),
            "decode_only_events_per_s": round(decode_rate(sample, fmt)),
            "end_to_end_events_per_s": round(rates["end_to_end"]),
            "steady_events_per_s": round(rates["steady"]),
            "events_per_cpu_s": round(rates["events_per_cpu_s"]),
            "batches": rates["batches"],
            "ratio_end_to_end_to_one_event_per_message":
                round(rates["end_to_end"] / one_event["end_to_end"], 2),
            "ratio_steady_to_one_event_per_message":
                round(rates["steady"] / one_event["steady"], 2)}


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench ingest")
    parser.add_argument("--events", type=int, default=200_000 if quick else 2_000_000,
                        help="events of the one-event-per-message part")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--format", choices=COLUMNAR_FORMATS + ("both", "none"),
                        default="both", help="columnar format(s) to measure")
    parser.add_argument("--columnar-events", type=int,
                        default=5_000_000 if quick else 20_000_000)
    parser.add_argument("--events-per-message", type=int, default=10_000)
    args = parser.parse_args(argv)
    formats = {"both": COLUMNAR_FORMATS, "none": ()}.get(args.format, (args.format,))

    with LocalPulsar(extra_config=BROKER_CONFIG) as broker, \
            tempfile.TemporaryDirectory() as store_dir:
        broker.create_partitioned_topic(TOPIC, 4)
        client = connect(broker.service_url)
        payloads, keys, _ = generate_events(args.events, args.users, seed=3)
        producer = EventProducer(client, TOPIC, "user")
        for payload, key in zip(payloads, keys):
            producer.send_payload(payload, key)
        producer.close()
        # Warm the broker's read path once so neither side pays for it alone.
        bare_client_rate(client, min(args.events, 50_000), "warm-up")
        bare = bare_client_rate(client, args.events, "bare")
        one = tally_rates(client, args.events, f"{store_dir}/one", reading_view())
        figures = {"benchmark": "ingest", "events": args.events, "users": args.users,
                   "bare_client_events_per_s": round(bare),
                   "tally_end_to_end_events_per_s": round(one["end_to_end"]),
                   "tally_steady_events_per_s": round(one["steady"]),
                   "tally_events_per_cpu_s": round(one["events_per_cpu_s"]),
                   "msgpack_decode_only_events_per_s": round(decode_rate(payloads[:100_000],
                                                                         "msgpack")),
                   "ratio_tally_to_bare": round(one["end_to_end"] / bare, 3)}
        if formats:
            columns = generate_columns(args.columnar_events, args.users, seed=3)
            figures["columnar"] = {
                fmt: columnar_run(client, broker, fmt, columns, args.events_per_message,
                                  f"{store_dir}/{fmt}", one) for fmt in formats}
        client.close()
    return figures
