"""Freshness: an event produced -> visible in a lookup, under background load.

A ``tally serve`` process consumes a 4-partition topic while this process
produces reading events at a fixed rate (half the end-to-end maximum by
default) and, every few milliseconds, a probe event for one of a set of probe
users whose ``last_article`` carries a fresh marker. A reader in this process
(the embedded C reader, as a model server would) polls the probe's record
until the marker shows; the time from producing to seeing it is the freshness
of that event. The service checkpoints on its default interval meanwhile.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import msgpack
import numpy as np

from tally.service.pulsar.client import connect
from tally.service.store.embedded import EmbeddedReader
from tally.service.pulsar.producer import EventProducer
from tally.service.pulsar.local import LocalPulsar

TOPIC = "bench_freshness"
PROBE_USERS = 1_000_000_000 + np.arange(100)
DEFINITIONS = f"""
from tally.core.definitions import Entity, Feature, FeatureView, Source

reads = Source("reads", {TOPIC!r},
               schema={{"user": "int64", "article": "int64", "readtime": "float64", "ts": "int64"}})
view = FeatureView("fresh", Entity("user"), reads, features=[
    Feature("reads", "count"), Feature("total_readtime", "sum", "readtime"),
    Feature("last_article", "last", "article")])
"""


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench freshness")
    parser.add_argument("--rate", type=int, default=50_000, help="background events/s")
    parser.add_argument("--seconds", type=float, default=10 if quick else 30)
    parser.add_argument("--probes-per-s", type=int, default=50)
    args = parser.parse_args(argv)
    with LocalPulsar() as broker, tempfile.TemporaryDirectory() as work:
        broker.create_partitioned_topic(TOPIC, 4)
        definitions = os.path.join(work, "defs.py")
        with open(definitions, "w") as f:
            f.write(textwrap.dedent(DEFINITIONS))
        store = os.path.join(work, "store")
        service = subprocess.Popen(
            [sys.executable, "-m", "tally", "serve", definitions, "--pulsar",
             broker.service_url, "--store", store, "--checkpoints",
             os.path.join(work, "ckpt"), "--metrics", "off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = connect(broker.service_url)
        try:
            latencies, achieved = measure(client, store, args)
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)
            client.close()
    latencies_ms = np.array(latencies) * 1000
    return {"benchmark": "freshness", "background_events_per_s_target": args.rate,
            "background_events_per_s_achieved": round(achieved),
            "probes": len(latencies_ms),
            "freshness_ms_p50": round(float(np.percentile(latencies_ms, 50)), 2),
            "freshness_ms_p99": round(float(np.percentile(latencies_ms, 99)), 2),
            "freshness_ms_max": round(float(latencies_ms.max()), 2),
            "goal_p99_ms": 100}


def measure(client, store, args):
    producer = EventProducer(client, TOPIC, "user")
    rng = np.random.default_rng(0)
    # warm up: the service must have subscribed and created the store
    producer.send({"user": int(PROBE_USERS[0]), "article": -1, "readtime": 0.0,
                   "ts": int(time.time() * 1000)})
    producer.flush()
    reader = wait_for_store(store)
    background = [msgpack.packb({"user": int(u), "article": int(a), "readtime": 30.0,
                                 "ts": int(time.time() * 1000)})
                  for u, a in zip(rng.integers(0, 100_000, 100_000),
                                  rng.integers(0, 50_000, 100_000))]
    latencies, sent, marker = [], 0, 0
    start = time.perf_counter()
    next_probe = start
    while time.perf_counter() - start < args.seconds:
        # background load, paced to the target rate
        due = int((time.perf_counter() - start) * args.rate)
        while sent < due:
            producer.send_payload(background[sent % len(background)], sent % 100_000)
            sent += 1
        if time.perf_counter() >= next_probe:
            marker += 1
            latencies.append(probe(producer, reader, marker))
            next_probe += 1 / args.probes_per_s
    producer.close()
    return latencies, sent / (time.perf_counter() - start)


def probe(producer, reader, marker):
    user = int(PROBE_USERS[marker % len(PROBE_USERS)])
    produced = time.perf_counter()
    producer.send({"user": user, "article": marker, "readtime": 1.0,
                   "ts": int(time.time() * 1000)})
    producer.producer.flush()       # a probe must not wait for a batch to fill
    while True:
        record = reader.get("fresh", user)
        if record is not None and record["last_article"] == marker:
            return time.perf_counter() - produced
        if time.perf_counter() - produced > 30:
            raise RuntimeError(f"probe {marker} not visible after 30 s")
        time.sleep(0.0005)


def wait_for_store(store):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            reader = EmbeddedReader(store)
            if reader.get("fresh", int(PROBE_USERS[0])) is not None:
                return reader
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError("the service wrote nothing within 60 s")
