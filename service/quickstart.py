"""The quick start: the news-reading example end to end on a local broker.

Users read articles; each read is an event ``{"user", "article", "readtime",
"ts"}`` on the partitioned topic ``read_events``, keyed by user. The view
``user_reading`` keeps, per user, the lifetime total read time and read count.
"""
import time

import msgpack
import numpy as np

# The definitions live in the shipped example (also in SQL: reading.sql).
from tally.service.examples.reading import read_events, user_reading

START_MS = 1_732_780_800_000       # 2024-11-28T08:00:00Z


def generate_events(n_events, n_users, seed=0, malformed_fraction=0.0, span_ms=86_400_000):
    """Reads by Zipf-distributed users over ``span_ms`` from START_MS (a day);
    returns (payloads, keys, events).

    ``events`` holds the good events as numpy columns (the oracle's input);
    a ``malformed_fraction`` of the payloads are broken in one of four ways
    (not msgpack, a missing field, a wrong type, an impossible event time)
    and are not in ``events``."""
    rng = np.random.default_rng(seed)
    users = (rng.zipf(1.3, n_events) - 1) % n_users
    articles = rng.integers(0, 50_000, n_events)
    readtimes = np.round(rng.lognormal(3.0, 1.0, n_events), 3)
    timestamps = START_MS + np.sort(rng.integers(0, span_ms, n_events))
    bad = rng.random(n_events) < malformed_fraction
    payloads, keys = [], []
    for i in range(n_events):
        event = {"user": int(users[i]), "article": int(articles[i]),
                 "readtime": float(readtimes[i]), "ts": int(timestamps[i])}
        payloads.append(_malformed(event, i) if bad[i] else msgpack.packb(event))
        keys.append(int(users[i]))
    good = ~bad
    events = {"user": users[good], "article": articles[good],
              "readtime": readtimes[good], "ts": timestamps[good]}
    return payloads, keys, events


def _malformed(event, i):
    kind = i % 4
    if kind == 0:
        return b"\xc1 not msgpack"
    if kind == 1:
        return msgpack.packb({k: v for k, v in event.items() if k != "readtime"})
    if kind == 2:
        return msgpack.packb({**event, "readtime": "long"})
    return msgpack.packb({**event, "ts": (1 << 63) - 1})


def run(n_events=500_000, n_users=10_000, n_partitions=4, store_path=None):
    """Start a broker, produce reads, compute the features, print lookups."""
    import tempfile

    from tally.service.ingest.run import Ingestion
    from tally.service.progress import progress_bar, until_read
    from tally.service.pulsar.client import connect
    from tally.service.pulsar.local import LocalPulsar
    from tally.service.pulsar.producer import EventProducer
    from tally.service.store.lmdb import LmdbStore

    store_path = store_path or tempfile.mkdtemp(prefix="tally-store-")
    print("Starting a local Apache Pulsar broker (first run downloads it from Maven Central)...")
    with LocalPulsar() as broker:
        print(f"  broker ready in {broker.startup_seconds:.1f} s at {broker.service_url}")
        broker.create_partitioned_topic(read_events.topic, n_partitions)
        client = connect(broker.service_url)
        payloads, keys, events = generate_events(n_events, n_users, seed=7)
        t0 = time.monotonic()
        producer = EventProducer(client, read_events.topic, "user", routing=read_events.routing)
        for payload, key in progress_bar("events", zip(payloads, keys), total=n_events,
                                         desc="produce"):
            producer.send_payload(payload, key)
        producer.close()
        print(f"Produced {n_events:,} reading events in {time.monotonic() - t0:.1f} s")

        store = LmdbStore(store_path)
        # the partition workers tally serve runs, checkpoints and all
        with Ingestion(user_reading, client, store) as reader, \
                progress_bar("events", desc="compute") as bar:
            reader.run(until=until_read(bar, n_events), idle_timeout_s=30)
            summary, users = reader.stats.summary(), reader.entities
        client.close()
    print(f"Computed {[f.name for f in user_reading.features]} for "
          f"{users:,} users: {summary['events']:,} events in "
          f"{summary['seconds']} s = {summary['events_per_s']:,} events/s")
    for key in (0, 1, 2, 42):
        print(f"  tally get user_reading {key} --store {store_path} ->",
              _short(store.get("user_reading", key)))
    store.close()


def _short(record):
    if record is None:
        return None
    return {k: v for k, v in record.items() if not k.startswith("_") or k == "_event_time"}
