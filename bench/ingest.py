"""End-to-end ingest rate: Pulsar -> decode -> core -> LMDB, side by side with
the bare Python pulsar-client receiving the same messages from the same broker.

Both read one backlog of msgpack reading events (one event per message) on a
4-partition topic, each through its own subscription, one after the other on
the same machine. The bare client does nothing but batch-receive, take each
payload's bytes and acknowledge: the ceiling for any Python consumer.
"""
import argparse
import tempfile
import time

import pulsar

from tally.service import pipeline
from tally.service.client import connect
from tally.service.lmdb_store import LmdbStore
from tally.service.producer import EventProducer
from tally.service.pulsar_local import LocalPulsar
from tally.service.quickstart import generate_events, read_events, user_reading

TOPIC = "bench_ingest"


def bare_client_rate(client, n_messages, subscription):
    consumer = client.subscribe(
        TOPIC, subscription, consumer_type=pulsar.ConsumerType.Failover,
        initial_position=pulsar.InitialPosition.Earliest, receiver_queue_size=1000,
        # the settings that received fastest here, and the pipeline's defaults
        batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(1000, 64 << 20, 10))
    raw = consumer._consumer
    received = 0
    start = time.perf_counter()
    while received < n_messages:
        messages = raw.batch_receive()
        for message in messages:
            message.data()
        last = {}
        for message in messages:
            last[message.topic_name()] = message
        for message in last.values():
            raw.acknowledge_cumulative(message)
        received += len(messages)
    elapsed = time.perf_counter() - start
    consumer.close()
    return received / elapsed


def tally_rate(client, n_messages, store_dir):
    import dataclasses
    view = dataclasses.replace(user_reading,
                               source=dataclasses.replace(read_events, topic=TOPIC))
    with LmdbStore(store_dir) as store:
        reader = pipeline.ViewPipeline(view, client, store, subscription="tally-bench")
        start = time.perf_counter()
        pipeline.run([reader], until=lambda ps: ps[0].stats.messages >= n_messages)
        elapsed = time.perf_counter() - start
        reader.close()
    return reader.stats.events / elapsed


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench ingest")
    parser.add_argument("--events", type=int, default=200_000 if quick else 2_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args(argv)

    with LocalPulsar() as broker, tempfile.TemporaryDirectory() as store_dir:
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
        tally = tally_rate(client, args.events, store_dir)
        client.close()
    return {"benchmark": "ingest", "events": args.events, "users": args.users,
            "bare_client_events_per_s": round(bare),
            "tally_end_to_end_events_per_s": round(tally),
            "ratio_tally_to_bare": round(tally / bare, 3)}
