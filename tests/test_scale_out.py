"""The scale-out topology against a real broker: two ``tally serve``
processes share a topic's 4 partitions and write one online store, a lookup
server in a third process (no registry, no state of its own) answers a
feature service over two views, one of them list- and string-valued; one
serve process is killed mid-stream and the other takes its partitions over.
Every user's served vector must equal a pandas recomputation over all the
events produced.

The store is LMDB, or with ``TALLY_AEROSPIKE=host:port`` an Aerospike
server (namespace ``test``) -- then nothing of the serving path is local.
"""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import msgpack
import numpy as np
import pandas as pd
import pytest

from tally.core.definitions import FeatureView
from tally.service.lookup.client import LookupClient
from tally.service.pulsar.producer import EventProducer
from tally.service.pulsar.topics import subscription_for
from tally.service.registry import load_file

pytestmark = pytest.mark.pulsar

N_EVENTS, N_USERS = 60_000, 2_000
CATEGORIES = ["politics", "sport", "culture", "économie"]     # k=1 keeps 4 counters: exact
DEFINITIONS = """
from tally.core.definitions import Entity, Feature, FeatureService, FeatureView, Source

user = Entity("user")
reads = Source("reads", {topic!r}, schema={{"user": "int64", "article": "int64",
               "category": "string", "readtime": "float64", "ts": "int64"}})
user_totals = FeatureView("so_totals", user, reads, features=[
    Feature("total_readtime", "sum", "readtime"), Feature("reads", "count")])
user_recent = FeatureView("so_recent", user, reads, features=[
    Feature("last_5_articles", "last_n", "article", n=5),
    Feature("top_category", "top_k", "category", k=1),
    Feature("last_category", "last", "category")])
recommend = FeatureService("so_recommend", [
    "so_totals:total_readtime", "so_totals:reads", "so_recent:last_5_articles",
    "so_recent:top_category", "so_recent:last_category as current_category"])
"""


def make_events(seed=21):
    """Reads with distinct, increasing times (so "last" has one answer)."""
    rng = np.random.default_rng(seed)
    n = N_EVENTS
    events = pd.DataFrame({
        "user": (rng.zipf(1.4, n) - 1) % N_USERS,
        "article": rng.integers(0, 2**40, n),
        "category": np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), n)],
        "readtime": np.round(rng.lognormal(3.0, 1.0, n), 3),
        "ts": 1_700_000_000_000 + np.arange(n) * 7})
    payloads = [msgpack.packb({k: (v.item() if hasattr(v, "item") else v)
                               for k, v in row.items()})
                for row in events.to_dict("records")]
    return events, payloads


def expected_vectors(events):
    """The service's vector per user, by pandas."""
    expected = {}
    for user, rows in events.groupby("user", sort=False):
        counts = rows["category"].value_counts()
        expected[int(user)] = {
            "total_readtime": rows["readtime"].sum(), "reads": len(rows),
            "last_5_articles": rows["article"].iloc[::-1][:5].tolist(),
            # ties between strings break by their 64-bit hash: any of the tied
            "top_category": {(value, int(count)) for value, count in counts.items()
                             if count == counts.max()},
            "current_category": rows["category"].iloc[-1]}
    return expected


def store_url(tmp_path):
    address = os.environ.get("TALLY_AEROSPIKE")
    if address:
        return f"aerospike://{address}/test?set_prefix=so{uuid.uuid4().hex[:6]}_"
    return f"lmdb://{tmp_path / 'store'}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Topology:
    def __init__(self, broker, topic, tmp_path):
        self.broker, self.topic = broker, topic
        self.definitions = tmp_path / "defs.py"
        self.definitions.write_text(textwrap.dedent(DEFINITIONS.format(topic=topic)))
        self.views = [d for d in load_file(str(self.definitions)) if isinstance(d, FeatureView)]
        self.store = store_url(tmp_path)
        self.checkpoints = tmp_path / "checkpoints"
        self.log = open(tmp_path / "topology.log", "ab")
        self.processes = {}

    def start_serve(self, name):
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "tally", "serve", str(self.definitions),
             "--pulsar", self.broker.service_url, "--store", self.store,
             "--checkpoints", str(self.checkpoints), "--name", name,
             "--checkpoint-interval", "0.5", "--metrics", "off"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def start_lookup_server(self):
        self.port = free_port()
        self.processes["lookup"] = subprocess.Popen(
            [sys.executable, "-m", "tally", "lookup-server", "--store", self.store,
             "--port", str(self.port), "--http-port", "0"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def consumers(self, view):
        """partition -> the consumer Pulsar made active for ``view``."""
        owners = {}
        for partition in range(4):
            stats = self.broker.admin(
                "GET", f"/admin/v2/persistent/public/default/{self.topic}-partition-"
                       f"{partition}/stats")
            subscription = stats["subscriptions"].get(subscription_for(view), {})
            owners[partition] = subscription.get("activeConsumerName")
        return owners

    def backlog(self):
        stats = self.broker.admin(
            "GET", f"/admin/v2/persistent/public/default/{self.topic}/partitioned-stats")
        return sum(stats["subscriptions"].get(subscription_for(v), {"msgBacklog": 1})
                   ["msgBacklog"] for v in self.views)

    def close(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"{what}: not after {timeout_s} s")


def produce(client, topic, events, payloads, duration_s):
    producer = EventProducer(client, topic, "user")
    pause_every = max(1, len(payloads) // (duration_s * 20))
    for i, (payload, user) in enumerate(zip(payloads, events["user"].tolist())):
        producer.send_payload(payload, user)
        if i % pause_every == 0:
            time.sleep(0.05)
    producer.close()


@pytest.fixture
def topology(pulsar_broker, topic_name, tmp_path):
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    running = Topology(pulsar_broker, topic_name, tmp_path)
    yield running
    running.close()


def test_two_serves_one_store_a_stateless_lookup_server_and_a_failover(
        topology, pulsar_client):
    events, payloads = make_events()
    producing = threading.Thread(target=produce, args=(pulsar_client, topology.topic, events,
                                                       payloads, 10))
    producing.start()
    topology.start_serve("a")
    topology.start_serve("b")
    wait_for(lambda: all(sorted(map(str, topology.consumers(v).values())) == ["a", "a", "b", "b"]
                         for v in topology.views), 60, "a and b sharing the partitions")
    topology.start_lookup_server()                     # once the store exists
    time.sleep(2)
    topology.processes["b"].kill()                     # mid-stream, the hard way
    topology.processes["b"].wait()
    producing.join()
    wait_for(lambda: topology.backlog() == 0, 180, "the backlog drained by a alone")
    assert all(set(topology.consumers(v).values()) == {"a"} for v in topology.views)

    expected = expected_vectors(events)
    users = sorted(expected)
    with LookupClient(port=topology.port) as client:
        wait_for(lambda: client.service("so_recommend", [{"user": users[0]}])[0]["reads"]
                 is not None, 30, "the service served")
        vectors = client.service("so_recommend", [{"user": u} for u in users[:1000]])
        vectors += client.service("so_recommend", [{"user": u} for u in users[1000:]])
        absent = client.service("so_recommend", [{"user": N_USERS + 1}])[0]
    assert absent == dict.fromkeys(expected[users[0]])
    for user, vector in zip(users, vectors):
        want = expected[user]
        assert list(vector) == list(want)
        assert vector["total_readtime"] == pytest.approx(want["total_readtime"], rel=1e-9)
        (top,) = vector["top_category"]
        assert tuple(top) in want["top_category"], user
        exact = ("reads", "last_5_articles", "current_category")
        assert {k: vector[k] for k in exact} == {k: want[k] for k in exact}, user
    topology.processes["a"].send_signal(signal.SIGTERM)
    assert topology.processes["a"].wait(timeout=60) == 0
