"""The fault suite: a randomized, seeded schedule of faults over a live
deployment, so the next hole is found by the project, not by a user.

Two ``tally serve`` processes share the partitions of a stream with 1%
malformed events while the schedule SIGKILLs and restarts them, restarts the
broker, deletes or corrupts newest checkpoints, makes the online store fail
for a while (as a full volume), and sends poisoned events (infinite values,
times far ahead or in seconds, a 2 MB payload). At the end:

* every entity's served values equal a pandas recomputation over the good
  events (and the checkpointed state does too);
* the dead-letter topic holds every refused payload at least once (the
  documented delivery), each with its reason and view;
* no process is wedged: each stops on SIGTERM with status 0;
* /health told the truth: while the store failed, a process that owned
  partitions said so (503), and at the end both say ok.

The seed and each fault are printed (``TALLY_FAULT_SEED`` replays a
schedule, ``TALLY_FAULT_KINDS=kill,store_outage`` narrows it); the CI run
lasts about a minute of faults, ``tox -e faults`` (``TALLY_FAULT_SECONDS``)
runs longer. The summary line is what bench/RESULTS.md reports.
"""
import json
import os
import random
import signal
import textwrap
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pulsar
import pytest

from tally.core.definitions import FeatureView, state_hash
from tally.service.ingest.checkpoint import CheckpointStore
from tally.service.ingest.dead_letters import dead_letter_topic
from tally.service.pulsar.producer import EventProducer
from tally.service.quickstart import START_MS
from tally.service.registry import load_file
from test_service import DEFINITIONS, Deployment, free_port

pytestmark = pytest.mark.pulsar

FAULT_SECONDS = float(os.environ.get("TALLY_FAULT_SECONDS", "50"))
# Broker restarts join the schedule only in the long run (tox -e faults): after
# one, the Pulsar client sometimes leaves a dead-letter producer reconnecting
# for minutes, and the suite then waits out its deadline (see bench/RESULTS.md).
DEFAULT_KINDS = ("kill,delete_checkpoint,corrupt_checkpoint,store_outage,poison"
                 + (",broker_restart" if os.environ.get("TALLY_FAULT_SECONDS") else ""))
N_USERS = 400
PARTITIONS = 4


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own: the schedule restarts it."""
    from tally.service.pulsar.local import LocalPulsar
    broker = LocalPulsar(data_dir=tmp_path / "pulsar")
    broker.start(timeout=180)
    yield broker
    broker.stop()


class Stream:
    """Produces reading events (1% malformed, some poisoned) at a steady
    rate, pausing while the broker restarts; keeps the good events (the
    oracle's input) and every refused payload (what the dead-letter topic
    must hold)."""

    def __init__(self, broker, topic, rng):
        self.broker, self.topic, self.rng = broker, topic, rng
        self.good = {"user": [], "article": [], "readtime": [], "ts": []}
        self.refused = []                  # payloads every view must dead-letter
        self.paused, self.stopped = threading.Event(), threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from tally.service.pulsar.client import connect
        client = connect(self.broker.service_url, operation_timeout_seconds=60)
        producer = EventProducer(client, self.topic, "user")
        i = 0
        while not self.stopped.is_set():
            if self.paused.is_set():
                producer.flush()
                self.idle = True
                time.sleep(0.05)
                continue
            self.idle = False
            for _ in range(40):
                self._send_one(producer, i)
                i += 1
            time.sleep(0.02)
        producer.close()
        client.close()

    def _send_one(self, producer, i):
        user = int(self.rng.integers(0, N_USERS))
        if self.rng.random() < 0.01:
            payload = b"\xc1 malformed %d" % i
            self.refused.append(payload)
        else:
            event = {"user": user, "article": i, "readtime": float(self.rng.integers(1, 500)),
                     "ts": START_MS + i}
            payload = msgpack.packb(event)
            for name, value in event.items():
                self.good[name].append(value)
        producer.send_payload(payload, user)
        self.sent += 1

    def poison(self, i):
        """Events the rules refuse: an infinite value, a time a year ahead, a
        time in seconds, and a 2 MB payload."""
        from tally.service.pulsar.client import connect
        client = connect(self.broker.service_url)
        producer = EventProducer(client, self.topic, "user")
        now = int(time.time() * 1000)
        for event in ({"user": 1, "article": -i, "readtime": float("inf"), "ts": START_MS},
                      {"user": 2, "article": -i, "readtime": 1.0, "ts": now + 365 * 86_400_000},
                      {"user": 3, "article": -i, "readtime": 1.0, "ts": now // 1000}):
            payload = msgpack.packb(event)
            self.refused.append(payload)
            producer.send_payload(payload, event["user"])
        big = b"\xc1" + b"%d" % i + b"x" * 2_000_000
        self.refused.append(big[:1 << 20])            # dead-lettered cut to 1 MiB
        producer.send_payload(big, 4)
        producer.close()
        client.close()


class HealthSampler(threading.Thread):
    """GET /health of each process every 0.3 s: (time, name, status)."""

    def __init__(self, ports):
        super().__init__(daemon=True)
        self.ports, self.samples, self.stopped = ports, [], threading.Event()

    def run(self):
        while not self.stopped.wait(0.3):
            for name, port in self.ports.items():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                                timeout=2) as reply:
                        status = reply.status
                except urllib.error.HTTPError as error:
                    status = error.code
                except OSError:
                    status = None                 # the process is down (killed)
                self.samples.append((time.monotonic(), name, status))


def test_a_random_schedule_of_faults_loses_and_poisons_nothing(own_broker, tmp_path):
    seed = int(os.environ.get("TALLY_FAULT_SEED", time.time()))
    print(f"\nfault suite: TALLY_FAULT_SEED={seed}, {FAULT_SECONDS:.0f} s of faults")
    rng_schedule, rng_events = random.Random(seed), np.random.default_rng(seed)
    broker, topic = own_broker, "fault_suite_reads"
    broker.create_partitioned_topic(topic, PARTITIONS)
    definitions = tmp_path / "defs.py"
    definitions.write_text(textwrap.dedent(DEFINITIONS.format(topic=topic)))
    view = next(d for d in load_file(str(definitions)) if isinstance(d, FeatureView))
    from tally.service.pulsar.client import connect
    client = connect(broker.service_url, operation_timeout_seconds=60)
    deployment = Deployment(broker, client, topic, tmp_path, definitions, view)
    store_flag = tmp_path / "store-fails"
    ports = {"a": free_port(), "b": free_port()}
    processes = {}

    def start(name):
        environment = {"TALLY_FAIL_STORE_WHILE": str(store_flag)}
        os.environ.update(environment)
        processes[name] = deployment.start(name, metrics=f"127.0.0.1:{ports[name]}")
        for key in environment:
            del os.environ[key]

    stream = Stream(broker, topic, rng_events)
    sampler = HealthSampler(ports)
    faults = {"kill": 0, "broker_restart": 0, "delete_checkpoint": 0, "corrupt_checkpoint": 0,
              "store_outage": 0, "poison": 0}
    outages = []                                   # (start, end) of store failures
    try:
        start("a")
        start("b")
        deployment.wait_until_serving()
        stream.thread.start()
        sampler.start()
        deadline = time.monotonic() + FAULT_SECONDS
        kinds = os.environ.get("TALLY_FAULT_KINDS", DEFAULT_KINDS).split(",")
        while time.monotonic() < deadline:
            time.sleep(rng_schedule.uniform(1.5, 4.0))
            kind = rng_schedule.choice(kinds)
            faults[kind] += 1
            print(f"fault suite: {time.monotonic() - deadline + FAULT_SECONDS:5.1f} s {kind}",
                  flush=True)
            if kind == "kill":
                name = rng_schedule.choice(["a", "b"])
                processes[name].kill()
                processes[name].wait()
                time.sleep(rng_schedule.uniform(0.2, 2.0))
                start(name)
            elif kind == "broker_restart":
                stream.paused.set()
                while not getattr(stream, "idle", False):
                    time.sleep(0.05)
                broker.stop()
                broker.start(timeout=180)
                stream.paused.clear()
            elif kind in ("delete_checkpoint", "corrupt_checkpoint"):
                _damage_newest_checkpoint(deployment, view, rng_schedule, kind)
            elif kind == "store_outage":
                store_flag.touch()
                began = time.monotonic()
                time.sleep(rng_schedule.uniform(2.0, 4.0))
                store_flag.unlink()
                outages.append((began, time.monotonic()))
            else:
                stream.poison(faults["poison"])
        stream.stopped.set()
        stream.thread.join(timeout=120)
        for name in ("a", "b"):                    # both alive for the end
            if processes[name].poll() is not None:
                start(name)
        deployment.wait_until_caught_up(timeout_s=300)
        time.sleep(2)                              # a last checkpoint and health sample
        sampler.stopped.set()
        sampler.join()
        final = {name: _health(port, wait_s=60) for name, port in ports.items()}
        for name in ("a", "b"):
            processes[name].send_signal(signal.SIGTERM)
        statuses = {name: processes[name].wait(timeout=60) for name in ("a", "b")}
    finally:
        stream.stopped.set()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    events = {name: np.asarray(values) for name, values in stream.good.items()}
    deployment.assert_exact(events)
    letters = _dead_letters(client, topic, view.name)
    missing = [p for p in stream.refused if p not in letters]
    client.close()
    told_truth = _health_told_truth(sampler.samples, outages)
    summary = {"seed": seed, "faults": faults, "events_sent": stream.sent,
               "good_events": len(events["user"]), "refused": len(stream.refused),
               "dead_letters": sum(letters.values()), "missing_dead_letters": len(missing),
               "health_samples": len(sampler.samples), "final_health": final,
               "exit_statuses": statuses, "mismatches": 0}
    print("fault suite summary: " + json.dumps(summary, sort_keys=True))
    assert missing == [], f"{len(missing)} refused payloads never dead-lettered"
    assert statuses == {"a": 0, "b": 0}, "a process was wedged or failed"
    assert final == {"a": 200, "b": 200}
    assert told_truth, "no 503 while the store failed"


def _damage_newest_checkpoint(deployment, view, rng, kind):
    store = CheckpointStore(deployment.checkpoints)
    partition = rng.randrange(PARTITIONS)
    latest = store.latest_sequence(view.name, state_hash(view), partition)
    if not latest:
        return
    path = os.path.join(store.directory(view.name, state_hash(view), partition),
                        f"{latest:012d}.ckpt")
    try:
        if kind == "delete_checkpoint":
            os.unlink(path)
        else:
            os.truncate(path, 100)
    except FileNotFoundError:                    # pruned or set aside meanwhile
        pass


def _health(port, wait_s=0):
    """/health's status; ``wait_s`` for a process just restarted to listen."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                return reply.status
        except urllib.error.HTTPError as error:
            return error.code
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _health_told_truth(samples, outages):
    """During each store outage long enough to see, some process said 503."""
    for began, ended in outages:
        during = [s for t, _, s in samples if began + 0.5 <= t <= ended + 0.5]
        if during and 503 not in during:
            return False
    return True


def _dead_letters(client, topic, view_name):
    """payload -> how many dead letters hold it (this view's)."""
    consumer = client.subscribe(dead_letter_topic(topic), "fault-suite-check",
                                initial_position=pulsar.InitialPosition.Earliest)
    counts = {}
    try:
        while True:
            try:
                message = consumer.receive(timeout_millis=5000)
            except pulsar.Timeout:
                return counts
            if message.properties().get("view") == view_name:
                counts[message.data()] = counts.get(message.data(), 0) + 1
    finally:
        consumer.close()
