"""The streaming service against a real broker: exactly-once state through
SIGKILLs (also inside checkpoints), and scale-out with failover.

Each test runs ``tally serve`` as real processes, kills them the hard way, and
at the end compares every entity's online record and checkpointed state with a
pandas recomputation over all events produced."""
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pytest

from tally.core.definitions import FeatureView
from tally.core.view import ViewState
from tally.service.ingest.checkpoint import CheckpointStore
from tally.service.store.lmdb import LmdbStore
from tally.service.pulsar.producer import EventProducer
from tally.service.quickstart import generate_events
from tally.service.registry import load_file
from tally.service.pulsar.topics import subscription_for

pytestmark = pytest.mark.pulsar

LARGE = os.environ.get("TALLY_LARGE_TESTS") == "1"
N_EVENTS = 1_000_000 if LARGE else 150_000
N_USERS = 20_000 if LARGE else 5_000

DEFINITIONS = """
from tally.core.definitions import Entity, Feature, FeatureView, Source

reads = Source("reads", {topic!r},
               schema={{"user": "int64", "article": "int64", "readtime": "float64", "ts": "int64"}})
view = FeatureView("svc_reading", Entity("user"), reads, features=[
    Feature("total_readtime", "sum", "readtime"),
    Feature("reads", "count"),
    Feature("longest", "max", "readtime"),
    Feature("last_article", "last", "article"),
])
"""


@pytest.fixture
def deployment(pulsar_broker, pulsar_client, topic_name, tmp_path):
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    definitions = tmp_path / "defs.py"
    definitions.write_text(textwrap.dedent(DEFINITIONS.format(topic=topic_name)))
    view = next(d for d in load_file(str(definitions)) if isinstance(d, FeatureView))
    deployment = Deployment(pulsar_broker, pulsar_client, topic_name, tmp_path, definitions,
                            view)
    yield deployment
    for process in deployment.processes:      # a failed test leaves no service behind
        if process.poll() is None:
            process.kill()
            process.wait()


class Deployment:
    def __init__(self, broker, client, topic, tmp_path, definitions, view):
        self.broker, self.client, self.topic = broker, client, topic
        self.store = tmp_path / "store"
        self.checkpoints = tmp_path / "checkpoints"
        self.definitions, self.view = definitions, view
        self.log = open(tmp_path / "serve.log", "ab")
        self.processes = []

    def start(self, name, crash_in_checkpoint=0.0, metrics="off"):
        env = dict(os.environ, TALLY_CRASH_IN_CHECKPOINT=str(crash_in_checkpoint))
        self.log.flush()
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "tally", "serve", str(self.definitions),
             "--pulsar", self.broker.service_url, "--store", str(self.store),
             "--checkpoints", str(self.checkpoints), "--name", name,
             "--checkpoint-interval", "0.5", "--metrics", metrics],
            stdout=self.log, stderr=subprocess.STDOUT, env=env))
        return self.processes[-1]

    def wait_until_serving(self, timeout_s=60):
        """Until every running process has logged that it serves (a SIGTERM
        before Python has even started would kill it the default way)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = [p.pid for p in self.processes if p.poll() is None]
            with open(self.log.name, "rb") as log:
                served = set(int(pid) for pid in re.findall(
                    rb"tally\.serve serving .* \(pid (\d+)\)", log.read()))
            if running and served >= set(running):
                return
            time.sleep(0.1)
        raise AssertionError(f"tally serve did not start; see {self.log.name}")

    def produce_in_background(self, payloads, keys, duration_s):
        def produce():
            producer = EventProducer(self.client, self.topic, "user")
            pause_every = max(1, len(payloads) // (duration_s * 20))
            for i, (payload, key) in enumerate(zip(payloads, keys)):
                producer.send_payload(payload, key)
                if i % pause_every == 0:
                    time.sleep(0.05)
            producer.close()
        thread = threading.Thread(target=produce)
        thread.start()
        return thread

    def backlog(self):
        stats = self.broker.admin(
            "GET", f"/admin/v2/persistent/public/default/{self.topic}/partitioned-stats")
        subscription = stats["subscriptions"].get(subscription_for(self.view))
        return None if subscription is None else subscription["msgBacklog"]

    def active_consumers(self):
        """partition -> the consumer name Pulsar made active for it."""
        owners = {}
        for partition in range(4):
            stats = self.broker.admin(
                "GET", f"/admin/v2/persistent/public/default/{self.topic}-partition-"
                       f"{partition}/stats")
            subscription = stats["subscriptions"][subscription_for(self.view)]
            owners[partition] = subscription.get("activeConsumerName")
        return owners

    def wait_until_caught_up(self, timeout_s=240):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.backlog() == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"backlog still {self.backlog()} after {timeout_s} s "
                             f"(per partition: {self.partition_backlogs()}); "
                             f"see {self.log.name}")

    def partition_backlogs(self):
        """partition -> (backlog, active consumer, unacked) of the view's subscription."""
        found = {}
        for partition in range(4):
            stats = self.broker.admin(
                "GET", f"/admin/v2/persistent/public/default/{self.topic}-partition-"
                       f"{partition}/stats")
            subscription = stats["subscriptions"].get(subscription_for(self.view), {})
            found[partition] = (subscription.get("msgBacklog"),
                                subscription.get("activeConsumerName"),
                                subscription.get("unackedMessages"))
        return found

    def assert_exact(self, events):
        expected = expected_features(events)
        with LmdbStore(self.store) as store:
            records = store.get_many(self.view.name, expected.index.to_numpy())
        assert all(r is not None for r in records)
        got = pd.DataFrame([{k: r[k] for k in expected.columns} for r in records],
                           index=expected.index)
        np.testing.assert_array_equal(got["reads"], expected["reads"])
        np.testing.assert_allclose(got["total_readtime"], expected["total_readtime"], rtol=1e-9)
        np.testing.assert_array_equal(got["longest"], expected["longest"])
        np.testing.assert_array_equal(got["last_article"], expected["last_article"])
        self.assert_checkpoints_exact(expected)

    def assert_checkpoints_exact(self, expected):
        """The checkpointed state of all partitions, merged, equals the oracle."""
        from tally.core.definitions import state_hash
        checkpoints = CheckpointStore(self.checkpoints)
        merged = ViewState(self.view)
        for partition in range(4):
            sequence = checkpoints.latest_sequence(self.view.name, state_hash(self.view),
                                                   partition)
            arrays, meta = checkpoints.load(self.view.name, state_hash(self.view),
                                            partition, sequence)
            merged.merge(ViewState.from_arrays(self.view, meta["params"], arrays))
        values = merged.read_keys(expected.index.to_numpy(), 0)
        np.testing.assert_array_equal(values["reads"][0], expected["reads"])
        np.testing.assert_allclose(values["total_readtime"][0], expected["total_readtime"],
                                   rtol=1e-9)


def expected_features(events):
    df = pd.DataFrame(events)
    grouped = df.groupby("user")
    return pd.DataFrame({"total_readtime": grouped["readtime"].sum(),
                         "reads": grouped.size(),
                         "longest": grouped["readtime"].max(),
                         "last_article": grouped["article"].last().astype(float)})


def stop(process):
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_state_is_exact_after_repeated_sigkills(deployment):
    rng = random.Random(int(os.environ.get("TALLY_TEST_SEED", time.time())))
    payloads, keys, events = generate_events(N_EVENTS, N_USERS, seed=11)
    producing = deployment.produce_in_background(payloads, keys, duration_s=15)
    kills = 0
    while producing.is_alive() or kills < 6:
        # every third life may also die inside a checkpoint
        process = deployment.start("a", crash_in_checkpoint=0.2 if kills % 3 == 2 else 0.0)
        time.sleep(rng.uniform(1.5, 4.0))
        process.kill()
        process.wait()
        kills += 1
    producing.join()
    final = deployment.start("a")
    deployment.wait_until_serving()
    deployment.wait_until_caught_up()
    stop(final)
    assert kills >= 6
    deployment.assert_exact(events)


def test_two_processes_split_partitions_and_one_takes_over(deployment):
    payloads, keys, events = generate_events(N_EVENTS, N_USERS, seed=12)
    producing = deployment.produce_in_background(payloads, keys, duration_s=12)
    first, second = deployment.start("a"), deployment.start("b")
    time.sleep(6)
    split = deployment.active_consumers()
    second.kill()
    second.wait()
    producing.join()
    deployment.wait_until_caught_up()
    after = deployment.active_consumers()
    stop(first)
    deployment.assert_exact(events)
    assert sorted(split.values()).count("a") == 2 and sorted(split.values()).count("b") == 2, split
    assert set(after.values()) == {"a"}, after


WINDOWED = """
from tally.core.definitions import Entity, Feature, FeatureView, Source, Window

reads = Source("reads", {topic!r},
               schema={{"user": "int64", "article": "int64", "readtime": "float64", "ts": "int64"}})
view = FeatureView("svc_recent", Entity("user"), reads, features=[
    Feature("reads_8s", "count", window=Window.sliding("8s", "1s")),
    Feature("reads", "count"),
])
"""


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_idle_windows_expire_online_and_metrics_are_served(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    """Entities with no new events still have their windowed values rewritten
    when the window moves past their events; /metrics counts what was done."""
    import json
    import urllib.request
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    definitions = tmp_path / "defs.py"
    definitions.write_text(textwrap.dedent(WINDOWED.format(topic=topic_name)))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", str(definitions), "--pulsar",
         pulsar_broker.service_url, "--store", str(tmp_path / "store"), "--checkpoints",
         str(tmp_path / "ckpt"), "--checkpoint-interval", "0.5",
         "--metrics", f"127.0.0.1:{port}"],
        stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT)
    try:
        producer = EventProducer(pulsar_client, topic_name, "user")
        now = int(time.time() * 1000)
        for user in range(50):
            for i in range(3):
                producer.send({"user": user, "article": i, "readtime": 1.0, "ts": now + i})
        producer.close()

        def records():
            with LmdbStore(tmp_path / "store") as store:
                return store.get_many("svc_recent", list(range(50)))

        wait_for(lambda: all(r is not None and r["reads"] == 3 for r in records()), 60)
        if time.time() * 1000 < now + 6000:          # the window surely still holds them
            assert all(r["reads_8s"] == 3 for r in records())
        assert all(r["_valid_until"] <= r["_write_time"] + 1000 for r in records())
        # no more events: within a few hops the 8-second window is empty
        wait_for(lambda: all(r["reads_8s"] == 0 for r in records()), 30)
        assert all(r["reads"] == 3 for r in records())

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        events = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("tally_events_total{"))
        assert events == 150, text
        assert "tally_checkpoint_age_seconds{" in text and "tally_freshness_seconds{" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
            assert json.loads(reply.read()) == {"status": "ok"}
    finally:
        stop(process)


def wait_for(condition, timeout_s=90, what="condition"):
    """``condition()``'s first truthy value, polled; it may raise meanwhile
    (the store may not exist yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = condition()
            if found:
                return found
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not met within {timeout_s} s")
