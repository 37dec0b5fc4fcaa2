"""Load test (issue 9): the quick-start deployment under a steady, realistic load.

    python -m tally.bench load --events-per-s R --lookups-per-s Q --entities N \\
        --duration D [--pulsar URL] [--serve HOST:PORT] [--c-api] [--quick] [--out PATH]

What runs, each in its own process:

* **producer** -- reading events as in the quick start (``{"user", "article",
  "readtime", "ts"}``, Zipf-distributed users over ``--entities``, keyed by
  user) at ``--events-per-s`` on a fixed schedule (event *i* is due at
  ``start + i / R``; a producer that falls behind sends what is due at once
  and the lateness is recorded), plus a freshness **probe** every
  ``--probe-interval-ms``: one event for one of a few probe users that no
  other event touches, so that the probe user's ``reads`` count tells exactly
  which of its probes are applied.
* **lookups** -- ``LookupClient.get`` of Zipf-drawn users through the lookup
  server at ``--lookups-per-s``, open loop: request *i* is due at
  ``start + i / Q`` and its latency runs from that due time, not from when it
  was sent, so a slow answer is also charged to the requests it delayed (no
  coordinated omission). ``--c-api`` adds a second lookup process reading
  the store in process through libtally (``EmbeddedReader``).
* **prober** -- polls the users of the probes sent and not yet seen
  (``get_batch`` of their ``reads`` through the lookup server, every
  ``--probe-poll-ms``); a probe's freshness is the time from its send to the
  reply that first shows it, so its resolution is the poll interval. A
  process of its own, so that polls never delay the measured lookups.
* **the deployment** -- unless ``--pulsar``/``--serve`` name running ones: a
  ``LocalPulsar`` broker, ``tally serve`` of the example view
  ``user_reading`` (lifetime ``SUM(readtime)`` and ``COUNT(*)`` per user) on
  a 4-partition topic, and ``tally lookup-server`` on its store.
* **this process** samples once a second: CPU and RSS of ``tally serve`` (and
  of the lookup server and broker, when started here) with psutil, the
  subscription's backlog (admin API, topic stats), the service's event-time
  lag and events folded (its ``/metrics``), and the machine's CPU and PSI.
  Consumer lag is reported three ways: events produced but not yet folded
  (producer counts minus the service's ``tally_events_total``), the
  service's event-time lag (wall clock minus the newest event time folded),
  and the broker's backlog -- which also counts events already folded but
  not yet acknowledged, since the service acknowledges only at checkpoints
  (every 5 s by default).

All processes time with ``time.perf_counter`` (CLOCK_MONOTONIC on Linux,
one clock for every process of the machine), so a probe's send time in the
producer and its visibility in the prober compare directly. Run from a
script, ``run()`` needs the ``if __name__ == "__main__":`` guard, since the
load processes are spawned (a fork of a process holding threads is unsafe).

The result is one JSON document (``--out``, default
``bench/results/load-<UTC timestamp>.json``) with the per-second series and
the overall figures (over the run after ``--warmup``), the state and store
sizes measured after the service's final checkpoint, and the scale model
(``bench/scale_model.py``) built from them; PNG charts lie next to it
(``bench/load_charts.py``). The last line printed is a short JSON summary.
"""
import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import numpy as np

from tally.bench import scale_model
from tally.bench.lookup import cpu_stall_seconds, free_port, start_lookup_server, wait_until

VIEW = "user_reading"
PARTITIONS = 4
ZIPF_EXPONENT = 1.3             # as the quick start's generate_events
ARTICLES = 50_000
PROBE_USERS = 8
# Probe users live far above any --entities, and differ per run, so that a
# deployment reused across runs never shows an earlier run's probes.
PROBE_BASE = 1 << 40
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The example view, on a topic of our choosing (a shared broker runs other tests).
DEFINITIONS = """
import dataclasses
from tally.service.examples import reading as _example

user_reading = dataclasses.replace(
    _example.user_reading,
    source=dataclasses.replace(_example.read_events, topic={topic!r}))
"""


@dataclasses.dataclass
class Plan:
    """What every load process needs to know; sent to each at its start."""
    events_per_s: float
    lookups_per_s: float
    entities: int
    duration_s: float
    warmup_s: float
    topic: str
    probe_interval_s: float
    probe_poll_s: float
    probe_base: int
    seed: int = 0

    @property
    def seconds(self):
        return int(math.ceil(self.duration_s))

    @property
    def probes(self):
        return int(self.duration_s / self.probe_interval_s + 1e-9)   # 12 / 0.1 is 119.99...

    def probe_user(self, probe):
        return self.probe_base + probe % PROBE_USERS


def zipf_users(rng, count, entities):
    """Users drawn as the quick start draws them (most reads by few users)."""
    return (rng.zipf(ZIPF_EXPONENT, count) - 1) % entities


# ---- the producer process --------------------------------------------------------

# Events sent in one go before the loop looks at the probe schedule again: a
# producer that has fallen behind must not hold a probe back for long.
MAX_BURST = 2_000


def produce(plan, pulsar_url, probe_sent, conn):
    """The producer process: events and probes on their schedules."""
    from tally.service.pulsar.client import connect
    from tally.service.pulsar.producer import EventProducer

    client = connect(pulsar_url)
    producer = EventProducer(client, plan.topic, "user")
    conn.send("ready")
    schedule = ScheduledProducer(plan, producer, probe_sent, start=conn.recv())
    schedule.run()
    error = None
    try:
        producer.close()          # flushes: every event sent is persisted, or we say so
    except Exception as failure:  # noqa: BLE001 -- reported, not hidden
        error = repr(failure)
    client.close()
    conn.send(dict(schedule.report(), error=error))


class ScheduledProducer:
    """Event i is due at start + i / rate and probe j at start + j * interval;
    each is sent once due -- at once if the loop is late, which is recorded."""

    def __init__(self, plan, producer, probe_sent, start):
        self.plan, self.producer, self.probe_sent, self.start = plan, producer, probe_sent, start
        self.rng = np.random.default_rng(plan.seed)
        self.total = int(plan.events_per_s * plan.duration_s)
        self.sent = self.probes = 0
        self.sent_per_second = np.zeros(plan.seconds, np.int64)
        self.behind_per_second = np.zeros(plan.seconds)    # worst lateness of a due event, s
        self.events = iter(())

    def run(self):
        while (elapsed := time.perf_counter() - self.start) < self.plan.duration_s:
            if elapsed >= 0:
                self.send_due_events(elapsed)
                self.send_due_probe(elapsed)
            self.sleep_until_next_due()

    def send_due_events(self, elapsed):
        due = min(self.total, int(elapsed * self.plan.events_per_s) + 1)
        if self.sent >= due:
            return
        second = int(elapsed)
        self.behind_per_second[second] = max(self.behind_per_second[second],
                                             elapsed - self.sent / self.plan.events_per_s)
        n = min(due - self.sent, MAX_BURST)
        ts = int(time.time() * 1000)
        for _ in range(n):
            user, article, readtime = self.next_event()
            self.producer.send_payload(msgpack.packb(
                {"user": user, "article": article, "readtime": readtime, "ts": ts}), user)
        self.sent += n
        self.sent_per_second[second] += n

    def send_due_probe(self, elapsed):
        if self.probes < self.plan.probes and elapsed >= self.probes * self.plan.probe_interval_s:
            self.producer.send({"user": self.plan.probe_user(self.probes), "article": self.probes,
                                "readtime": 1.0, "ts": int(time.time() * 1000)})
            self.probe_sent[self.probes] = time.perf_counter()
            self.probes += 1

    def sleep_until_next_due(self):
        next_event = self.sent / self.plan.events_per_s if self.sent < self.total else math.inf
        next_due = self.start + min(next_event, self.probes * self.plan.probe_interval_s)
        pause = next_due - time.perf_counter()
        if pause > 0:
            time.sleep(min(pause, 0.002))     # wake often: a probe may fall due meanwhile

    def next_event(self):
        try:
            return next(self.events)
        except StopIteration:
            self.events = zip(*_event_chunk(self.rng, self.plan.entities))
            return next(self.events)

    def report(self):
        return {"sent": self.sent, "probes": self.probes, "sent_per_second": self.sent_per_second,
                "behind_per_second": self.behind_per_second}


def _event_chunk(rng, entities, size=1 << 16):
    """Python lists, since the send loop indexes them one event at a time."""
    return (zipf_users(rng, size, entities).tolist(),
            rng.integers(0, ARTICLES, size).tolist(),
            np.round(rng.lognormal(3.0, 1.0, size), 3).tolist())


# ---- the lookup processes --------------------------------------------------------

LOOKUP_ERRORS = (LookupError, ConnectionError, OSError, TimeoutError)
# After the schedule, how long the prober keeps looking for late probes.
PROBE_GRACE_S = 15.0


class ServiceReader:
    """Lookups through the service client (msgpack over TCP)."""

    def __init__(self, host, port):
        from tally.service.lookup.client import LookupClient
        self.address, self.connect = (host, port), LookupClient
        self.client = LookupClient(host, port)

    def get(self, key):
        return self.client.get(VIEW, key)

    def reads_of(self, keys):
        return [None if r is None else r["reads"]
                for r in self.client.get_batch(VIEW, keys, features=["reads"])]

    def reconnect(self):
        """A broken connection is counted as an error, then replaced."""
        try:
            self.client.close()
            self.client = self.connect(*self.address)
        except OSError:
            pass


class CApiReader:
    """Lookups in process through libtally (the embedded C API)."""

    def __init__(self, store):
        from tally.service.store.embedded import EmbeddedReader
        self.reader = EmbeddedReader(store)

    def get(self, key):
        return self.reader.get(VIEW, key)

    def reconnect(self):
        pass


def issue_lookups(plan, kind, target, conn):
    """Open-loop lookups at plan.lookups_per_s; sends back one latency (from
    the due time) per lookup."""
    reader = ServiceReader(*target) if kind == "service" else CApiReader(target)
    keys = zipf_users(np.random.default_rng(plan.seed + 1),
                      int(plan.lookups_per_s * plan.duration_s), plan.entities).tolist()
    latency = np.full(len(keys), np.nan)
    failed = np.zeros(len(keys), bool)
    found = np.zeros(len(keys), bool)
    errors = {}
    conn.send("ready")
    start = conn.recv()
    interval = 1.0 / plan.lookups_per_s
    for i, key in enumerate(keys):
        due = start + i * interval
        wait_until(due)
        try:
            found[i] = reader.get(key) is not None
        except LOOKUP_ERRORS as error:
            failed[i] = True
            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
            reader.reconnect()
        latency[i] = time.perf_counter() - due
    conn.send({"kind": kind, "latency_s": latency, "failed": failed, "found": found,
               "errors": errors})


def watch_probes(plan, target, probe_sent, conn):
    """Poll the probe users until every probe is seen (or the grace time is
    over); a process of its own, so that polls never delay the lookups."""
    prober = Prober(plan, ServiceReader(*target), probe_sent)
    conn.send("ready")
    start = conn.recv()
    prober.poll_until(start + plan.duration_s)
    prober.poll_until(time.perf_counter() + PROBE_GRACE_S, stop_when_all_seen=True)
    conn.send(prober.results())


class Prober:
    """Finds out when each probe becomes visible, by polling the users of the
    probes sent and not yet seen. Probe j is user j % PROBE_USERS's
    (j // PROBE_USERS + 1)-th event, and the view counts reads, so a count of
    n shows every probe of that user with j // PROBE_USERS < n."""

    def __init__(self, plan, reader, probe_sent):
        self.plan, self.reader, self.probe_sent = plan, reader, probe_sent
        self.visible_at = np.full(plan.probes, np.nan)
        self.next_sent = 0            # probes below this have been sent
        self.pending = set()
        self.next_poll = 0.0
        self.polls = self.poll_errors = 0

    def poll_until(self, deadline, stop_when_all_seen=False):
        while True:
            now = time.perf_counter()
            if stop_when_all_seen and self.next_sent == self.plan.probes and not self.pending:
                return
            if max(now, self.next_poll) >= deadline:
                return
            if now < self.next_poll:
                time.sleep(min(self.next_poll - now, deadline - now))
                continue
            self.next_poll = now + self.plan.probe_poll_s
            self._poll()

    def _poll(self):
        while self.next_sent < self.plan.probes and self.probe_sent[self.next_sent] > 0:
            self.pending.add(self.next_sent)
            self.next_sent += 1
        if not self.pending:
            return
        users = sorted({self.plan.probe_user(j) for j in self.pending})
        self.polls += 1
        try:
            counts = dict(zip(users, self.reader.reads_of(users)))
        except LOOKUP_ERRORS:
            self.poll_errors += 1
            self.reader.reconnect()
            return
        replied = time.perf_counter()
        for j in list(self.pending):
            if (counts[self.plan.probe_user(j)] or 0) > j // PROBE_USERS:
                self.visible_at[j] = replied
                self.pending.discard(j)

    def results(self):
        sent = np.frombuffer(self.probe_sent, dtype=np.float64)[:self.plan.probes].copy()
        return {"sent_at": sent, "visible_at": self.visible_at, "polls": self.polls,
                "poll_errors": self.poll_errors}


# ---- the deployment under test ----------------------------------------------------

class Deployment:
    """The quick-start deployment: a broker, ``tally serve`` of the example view
    and the lookup server, each started here unless the arguments name a
    running one. ``stop_service()`` SIGTERMs the service (its last checkpoint)."""

    def __init__(self, args):
        self.args = args
        self.broker = self.service = self.lookup_server = None
        self.workdir = Path(tempfile.mkdtemp(prefix="tally-load-"))
        self.store = args.store
        self.checkpoints = args.checkpoints
        self.metrics_url = args.metrics
        self.service_pid = args.service_pid
        self.lookup_server_pid = args.lookup_server_pid

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self):
        if self.args.pulsar:
            self.pulsar_url = self.args.pulsar
            self.admin_url = self.args.admin or _default_admin_url(self.args.pulsar)
        else:
            from tally.service.pulsar.local import LocalPulsar
            self.broker = LocalPulsar()
            self.broker.start(timeout=180)
            self.pulsar_url, self.admin_url = self.broker.service_url, self.broker.admin_url
        self._ensure_topic()
        if self.args.serve:
            host, _, port = self.args.serve.rpartition(":")
            self.lookup_address = (host or "127.0.0.1", int(port))
        else:
            self._start_service()
            self.lookup_server, port, _ = start_lookup_server(self.store)
            self.lookup_server_pid = self.lookup_server.pid
            self.lookup_address = ("127.0.0.1", port)

    def _ensure_topic(self):
        from tally.service.pulsar.admin import Admin, PulsarAdminError
        try:
            Admin(self.admin_url).create_partitioned_topic(self.args.topic, PARTITIONS)
        except PulsarAdminError as error:
            if error.status != 409:           # 409: it exists already, fine
                raise

    def _start_service(self):
        definitions = self.workdir / "definitions.py"
        definitions.write_text(textwrap.dedent(DEFINITIONS.format(topic=self.args.topic)))
        # a store URL given (aerospike://...) is the store of the deployment started here
        self.store = self.args.store or str(self.workdir / "store")
        self.checkpoints = str(self.workdir / "checkpoints")
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.service_log = self.workdir / "serve.log"
        with open(self.service_log, "wb") as log:
            self.service = subprocess.Popen(
                [sys.executable, "-m", "tally", "serve", str(definitions),
                 "--pulsar", self.pulsar_url, "--store", self.store,
                 "--checkpoints", self.checkpoints, "--metrics", f"127.0.0.1:{metrics_port}"],
                stdout=log, stderr=subprocess.STDOUT)
        self.service_pid = self.service.pid
        deadline = time.monotonic() + 90
        while b"tally.serve serving" not in self.service_log.read_bytes():
            if self.service.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tally serve did not start:\n" +
                                   self.service_log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    def processes(self):
        """name -> psutil.Process of what can be measured on this machine."""
        import psutil
        found = {}
        for name, pid in (("service", self.service_pid),
                          ("lookup_server", self.lookup_server_pid),
                          ("broker", self.broker and self.broker._process.pid)):
            if pid:
                try:
                    found[name] = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    pass
        return found

    def backlog(self):
        """Messages of the topic the service's subscription has not acknowledged."""
        from tally.service.pulsar.topics import subscription_for
        from tally.service.pulsar.admin import Admin
        from tally.service.pulsar.topics import rest_path
        stats = Admin(self.admin_url, timeout=10).request(
            "GET", f"{rest_path(self.args.topic)}/partitioned-stats")
        subscription = stats.get("subscriptions", {}).get(subscription_for(self.view()))
        return None if subscription is None else subscription["msgBacklog"]

    def view(self):
        from tally.service.examples.reading import read_events, user_reading
        return dataclasses.replace(user_reading, source=dataclasses.replace(
            read_events, topic=self.args.topic))

    def service_metrics(self):
        """(newest event-time lag over partitions in s, events folded) or Nones."""
        if not self.metrics_url:
            return None, None
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None, None
        lags = [float(v) for v in re.findall(
            rf'^tally_event_time_lag_seconds{{[^}}]*view="{VIEW}"[^}}]*}} (\S+)$', text, re.M)]
        events = [float(v) for v in re.findall(
            rf'^tally_events_total{{[^}}]*view="{VIEW}"[^}}]*}} (\S+)$', text, re.M)]
        return (max(lags) if lags else None), (sum(events) if events else None)

    def stop_service(self):
        """SIGTERM: the service finishes its batch and writes a last checkpoint."""
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()

    def __exit__(self, *exc):
        if self.lookup_server is not None:
            self.lookup_server.terminate()
            self.lookup_server.wait()
        if self.service is not None and self.service.poll() is None:
            self.service.kill()
            self.service.wait()
        if self.broker is not None:
            self.broker.stop()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _default_admin_url(pulsar_url):
    host = urllib.parse.urlparse(pulsar_url).hostname or "127.0.0.1"
    return f"http://{host}:8080"


# ---- sampling this machine once a second ------------------------------------------

class Sampler(threading.Thread):
    """Samples at start + k seconds, k = 0, 1, ...: cumulative CPU seconds and
    RSS of each deployment process, the backlog, the service's metrics, the
    machine's CPU and CPU pressure. Series are differenced afterwards."""

    def __init__(self, deployment, start, harness_pids=()):
        super().__init__(daemon=True)
        self.deployment, self.start_at = deployment, start
        self.harness_pids = harness_pids
        self.samples = []
        self.stopping = threading.Event()

    def run(self):
        import psutil
        processes = self.deployment.processes()
        # the load generators compete for the same cores: measure them too
        processes["harness"] = [psutil.Process(pid) for pid in self.harness_pids]
        k = 0
        while not self.stopping.is_set():
            pause = self.start_at + k - time.perf_counter()
            if pause > 0 and self.stopping.wait(pause):
                break
            self.samples.append(self.sample(psutil, processes, k))
            k += 1

    def sample(self, psutil, processes, k):
        sample = {"t": k, "at": time.perf_counter() - self.start_at}
        # First the service's counters, which are compared with the producer's
        # per-second counts: an admin call before them (slow on a busy broker)
        # would shift every difference.
        sample["event_time_lag_s"], sample["events_folded"] = self.deployment.service_metrics()
        sample["metrics_at"] = time.perf_counter() - self.start_at
        for name, process in processes.items():
            try:
                family = process if isinstance(process, list) else \
                    [process] + process.children(recursive=True)
                cpu = sum(sum(p.cpu_times()[:2]) for p in family)
                rss = sum(p.memory_info().rss for p in family)
                sample[name] = {"cpu_s": cpu, "rss": rss}
            except psutil.Error:
                sample[name] = None
        times = psutil.cpu_times()
        sample["machine_busy_s"] = sum(times) - times.idle - getattr(times, "iowait", 0)
        sample["machine_total_s"] = sum(times)
        sample["cpu_stall_s"] = cpu_stall_seconds()
        try:
            sample["backlog"] = self.deployment.backlog()
        except (OSError, ValueError, KeyError):
            sample["backlog"] = None
        return sample


# ---- the run ---------------------------------------------------------------------

def parse_args(argv, quick):
    parser = argparse.ArgumentParser(prog="python -m tally.bench load",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events-per-s", type=float, default=10_000)
    parser.add_argument("--lookups-per-s", type=float, default=500)
    parser.add_argument("--entities", type=int, default=1_000_000,
                        help="users the Zipf draws range over")
    parser.add_argument("--duration", type=float, default=60 if quick else 300, metavar="S",
                        help="seconds of load (60 with --quick, else 300)")
    parser.add_argument("--warmup", type=float, default=None, metavar="S",
                        help="seconds left out of the overall figures (10%% of the run, "
                             "at most 15)")
    parser.add_argument("--pulsar", help="use this broker (pulsar://host:port) instead of "
                                         "starting one")
    parser.add_argument("--admin", help="its admin URL (default http://<host>:8080)")
    parser.add_argument("--serve", metavar="HOST:PORT",
                        help="use this running lookup server (msgpack port) and the "
                             "tally serve behind it, instead of starting both; needs "
                             "--pulsar")
    parser.add_argument("--metrics", help="with --serve: the service's /metrics URL")
    parser.add_argument("--service-pid", type=int,
                        help="with --serve: the tally serve PID, for CPU/RSS")
    parser.add_argument("--lookup-server-pid", type=int,
                        help="with --serve: the lookup server's PID, for lookups per core")
    parser.add_argument("--store", help="the online store, a path or URL (aerospike://host:"
                        "port/namespace): with --serve, the running deployment's (a path "
                        "for --c-api and sizes); without, the one the deployment started "
                        "here writes and serves (default: a path in its work directory)")
    parser.add_argument("--checkpoints", help="with --serve: the checkpoint directory")
    parser.add_argument("--topic", default="read_events")
    parser.add_argument("--c-api", action="store_true",
                        help="also look up through libtally, in another process")
    parser.add_argument("--probe-interval-ms", type=float, default=100)
    parser.add_argument("--probe-poll-ms", type=float, default=5)
    parser.add_argument("--out", help="the JSON document (default "
                                      "bench/results/load-<timestamp>.json)")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.serve and not args.pulsar:
        parser.error("--serve needs --pulsar: the producer writes to that broker")
    if args.warmup is None:
        args.warmup = min(15.0, args.duration / 10)
    if args.c_api and args.serve and not args.store:
        parser.error("--c-api with --serve needs --store")
    if args.c_api and args.store and "://" in args.store and not args.store.startswith("lmdb:"):
        parser.error("--c-api reads an embedded store: --store must be a path")
    if min(args.events_per_s, args.lookups_per_s, args.duration, args.probe_interval_ms,
           args.probe_poll_ms) <= 0:
        parser.error("rates, durations and intervals must be positive")
    return args


def run(quick=False, argv=()):
    argv = list(argv) + (["--quick"] if quick else [])
    args = parse_args([a for a in argv if a != "--quick"], quick)
    started = datetime.now(timezone.utc)
    out = Path(args.out) if args.out else \
        RESULTS_DIR / f"load-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    plan = Plan(events_per_s=args.events_per_s, lookups_per_s=args.lookups_per_s,
                entities=args.entities, duration_s=args.duration, warmup_s=args.warmup,
                topic=args.topic, probe_interval_s=args.probe_interval_ms / 1000,
                probe_poll_s=args.probe_poll_ms / 1000,
                probe_base=PROBE_BASE + (int(time.time()) % 1_000_000) * PROBE_USERS)
    with Deployment(args) as deployment:
        raw = drive(plan, deployment, args.c_api)
        drained_s = wait_for_drain(deployment)
        deployment.stop_service()
        storage = measure_storage(deployment)
        document = assemble(plan, args, argv, raw, storage, drained_s, started)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_charts:
        from tally.bench.load_charts import plot
        document["charts"] = [plot(document, out.with_suffix(".png")).name]
    out.write_text(json.dumps(document, indent=1, default=_json_default) + "\n")
    if document.get("scale_model"):
        print(scale_model.markdown(document["scale_model"]))
    print_overall(document["overall"])
    print(f"wrote {out}")
    return dict(document["overall"], benchmark="load", out=str(out))


def drive(plan, deployment, with_c_api):
    """Start the load processes, release them at one start time, sample until
    they are done, and return what each reported."""
    context = multiprocessing.get_context("spawn")     # no fork of a threaded parent
    probe_sent = context.Array("d", max(plan.probes, 1), lock=False)
    workers = {"producer": (produce, (plan, deployment.pulsar_url, probe_sent)),
               "probes": (watch_probes, (plan, deployment.lookup_address, probe_sent)),
               "service": (issue_lookups, (plan, "service", deployment.lookup_address))}
    if with_c_api:
        workers["c_api"] = (issue_lookups, (plan, "c_api", deployment.store))
    pipes, processes = {}, {}
    for name, (target, arguments) in workers.items():
        parent_end, child_end = context.Pipe()
        processes[name] = context.Process(target=target, args=(*arguments, child_end),
                                          name=f"tally-load-{name}")
        processes[name].start()
        pipes[name] = parent_end
    try:
        for name, pipe in pipes.items():
            if _receive(name, pipe, processes[name], timeout_s=120) != "ready":
                raise RuntimeError(f"the {name} process did not start")
        deployment.backlog()          # the broker's first stats call is slow: not at t=0
        start = time.perf_counter() + 0.5
        for pipe in pipes.values():
            pipe.send(start)
        sampler = Sampler(deployment, start, [p.pid for p in processes.values()])
        sampler.start()
        reports = {name: _receive(name, pipe, processes[name],
                                  timeout_s=plan.duration_s + PROBE_GRACE_S + 120)
                   for name, pipe in pipes.items()}
        sampler.stopping.set()
        sampler.join()
    finally:
        for process in processes.values():
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return {"start": start, "reports": reports, "samples": sampler.samples}


def _receive(name, pipe, process, timeout_s):
    """The process's next message; fails at once if the process died."""
    deadline = time.monotonic() + timeout_s
    while not pipe.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"the {name} load process died (exit {process.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {name} load process sent nothing in {timeout_s:.0f} s")
    return pipe.recv()


def wait_for_drain(deployment, timeout_s=120):
    """Seconds until the service has folded everything produced (None: no
    backlog to read, or not within the timeout)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        try:
            if deployment.backlog() == 0:
                return round(time.monotonic() - began, 1)
        except (OSError, ValueError, KeyError):
            return None
        time.sleep(0.5)
    return None


# ---- state and store sizes --------------------------------------------------------

def measure_storage(deployment):
    """Bytes per entity and feature of the view's state (in memory, restored
    from the last checkpoints, and as checkpoint files) and per online record
    (LMDB pages per entry)."""
    sizes = {}
    if deployment.checkpoints and os.path.isdir(deployment.checkpoints):
        sizes.update(state_sizes(deployment.view(), deployment.checkpoints))
    if deployment.store and os.path.isdir(deployment.store):
        sizes.update(store_sizes(deployment.store))
    return sizes


def state_sizes(view, checkpoint_root):
    from tally.core.definitions import state_hash
    from tally.core.view import ViewState
    from tally.service.ingest.checkpoint import CheckpointStore
    checkpoints = CheckpointStore(checkpoint_root)
    digest = state_hash(view)
    features = [f.name for f in view.features]
    entities = file_bytes = 0
    ram = {"features": 0, "per_view": 0}
    disk = {"features": 0, "per_view": 0}
    for partition in range(PARTITIONS):
        sequence = checkpoints.latest_sequence(view.name, digest, partition)
        if not sequence:
            continue
        arrays, meta = checkpoints.load(view.name, digest, partition, sequence)
        file_bytes += os.path.getsize(os.path.join(
            checkpoints.directory(view.name, digest, partition), f"{sequence:012d}.ckpt"))
        state = ViewState.from_arrays(view, meta["params"], arrays)
        entities += len(state)
        # The key index and the hidden newest-event-time arena are paid once
        # per entity and view, whatever the number of features.
        for name, arena in state.arenas.items():
            ram["features" if name in features else "per_view"] += arena.nbytes
        ram["per_view"] += state.index.nbytes
        for name, array in arrays.items():
            is_feature = any(name.startswith(f"arena.{f}.") for f in features)
            disk["features" if is_feature else "per_view"] += array.nbytes
    if not entities:
        return {}
    return {"state_entities": entities, "features": len(features),
            "checkpoint_file_bytes": file_bytes,
            "ram_bytes_per_entity_feature": ram["features"] / entities / len(features),
            "ram_bytes_per_entity_view": ram["per_view"] / entities,
            "snapshot_bytes_per_entity_feature": disk["features"] / entities / len(features),
            "snapshot_bytes_per_entity_view": disk["per_view"] / entities}


def store_sizes(store_path):
    from tally.service.store.lmdb import LmdbStore
    with LmdbStore(store_path, readonly=True) as store:
        schema = store.schema(VIEW)
        db = store._db(VIEW, schema.version)
        with store.env.begin() as txn:
            stat = txn.stat(db)
    pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
    per_record = pages * stat["psize"] / max(stat["entries"], 1)
    return {"store_records": stat["entries"], "store_bytes": pages * stat["psize"],
            "record_bytes": schema.fixed_size, "lmdb_bytes_per_record": per_record,
            "lmdb_overhead_bytes_per_record": per_record - schema.fixed_size}


# ---- from raw reports to the document ---------------------------------------------

def assemble(plan, args, argv, raw, storage, drained_s, started):
    producer = raw["reports"]["producer"]
    lookups = {k: raw["reports"][k] for k in ("service", "c_api") if k in raw["reports"]}
    series = {"t_s": list(range(plan.seconds)),
              "events_target_per_s": [plan.events_per_s] * plan.seconds,
              "events_sent_per_s": producer["sent_per_second"],
              "producer_behind_ms": producer["behind_per_second"] * 1000}
    series.update(sample_series(raw["samples"], plan.seconds))
    series["unfolded_events"] = unfolded_events(producer["sent_per_second"], raw["samples"],
                                                plan)
    probes = raw["reports"]["probes"]
    freshness = freshness_figures(probes, raw["start"], plan)
    series.update(freshness.pop("series"))
    overall = {"events_target_per_s": plan.events_per_s,
               "events_achieved_per_s": _steady_rate(producer["sent_per_second"], plan),
               "events_sent": producer["sent"], "produce_error": producer["error"],
               "freshness": freshness, "drain_s_after_load": drained_s}
    for kind, report in lookups.items():
        figures, kind_series = lookup_figures(report, plan)
        overall[f"lookups_{kind}"] = figures
        series.update({f"lookup_{kind}_{k}": v for k, v in kind_series.items()})
    overall.update(steady_sample_figures(series, plan))
    overall.update(per_core_figures(raw["samples"], lookups["service"], probes, plan))
    document = {"benchmark": "load", "command": " ".join(["python -m tally.bench load", *argv]),
                "started_utc": started.isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": os.getloadavg()[0]},
                "plan": dataclasses.asdict(plan) | {"probe_users": PROBE_USERS,
                                                    "partitions": PARTITIONS, "view": VIEW},
                "deployment": {"started_here": not args.pulsar and not args.serve,
                               "broker": args.pulsar or "LocalPulsar",
                               "lookup_server": args.serve or "tally lookup-server"},
                "overall": overall, "series": series, "storage": storage}
    measured = scale_measurements(overall, storage)
    missing = [k for k in scale_model.required_measurements() if measured.get(k) is None]
    if missing:
        document["scale_model_skipped"] = f"not measured in this run: {missing}"
        print(f"no scale model: {document['scale_model_skipped']}", file=sys.stderr)
    else:
        document["scale_model"] = scale_model.build(measured)
    return document


def _steady_rate(per_second, plan):
    """Mean per-second count over the seconds after the warm-up (whole seconds
    only: the last one may be cut short by the end of the run)."""
    whole = int(plan.duration_s)
    window = np.asarray(per_second[int(math.ceil(plan.warmup_s)):whole], dtype=float)
    return round(float(window.mean()), 1) if len(window) else None


def _percentiles(values, scale=1000.0, digits=2):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"p50": None, "p99": None, "p999": None, "max": None}
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9]) * scale
    return {"p50": round(float(p50), digits), "p99": round(float(p99), digits),
            "p999": round(float(p999), digits), "max": round(float(values.max() * scale), digits)}


def lookup_figures(report, plan):
    """Overall figures (after the warm-up) and per-second series, by due time."""
    n = len(report["latency_s"])
    due = np.arange(n) / plan.lookups_per_s
    second = due.astype(int)
    steady = due >= plan.warmup_s
    latency, failed = report["latency_s"], report["failed"]
    ok = ~failed
    figures = {"requests": int(steady.sum()), "errors": int(failed[steady].sum()),
               "error_kinds": report["errors"],
               "found_share": round(float(report["found"][steady & ok].mean()), 3)
               if (steady & ok).any() else None}
    figures.update({f"latency_ms_{k}": v for k, v in
                    _percentiles(latency[steady & ok], digits=3).items()})
    series = {"per_s": [], "p50_ms": [], "p99_ms": [], "p999_ms": [], "errors": []}
    for s in range(plan.seconds):
        mine = second == s
        p = _percentiles(latency[mine & ok], digits=3)
        series["per_s"].append(int(mine.sum()))
        series["errors"].append(int(failed[mine].sum()))
        for k in ("p50", "p99", "p999"):
            series[f"{k}_ms"].append(p[k])
    return figures, series


def freshness_figures(probes, start, plan):
    sent_at = probes["sent_at"] - start
    freshness = probes["visible_at"] - probes["sent_at"]
    was_sent = probes["sent_at"] > 0
    steady = was_sent & (sent_at >= plan.warmup_s)
    figures = {"probes_sent": int(was_sent.sum()),
               "probes_unseen": int((was_sent & np.isnan(freshness)).sum()),
               "polls": probes["polls"], "poll_errors": probes["poll_errors"],
               "resolution_ms": plan.probe_poll_s * 1000}
    figures.update({f"ms_{k}": v for k, v in
                    _percentiles(freshness[steady], digits=2).items() if k != "p999"})
    series = {"freshness_p50_ms": [], "freshness_p99_ms": [], "freshness_max_ms": []}
    second = np.where(was_sent, sent_at, -1).astype(int)
    for s in range(plan.seconds):
        p = _percentiles(freshness[second == s], digits=2)
        series["freshness_p50_ms"].append(p["p50"])
        series["freshness_p99_ms"].append(p["p99"])
        series["freshness_max_ms"].append(p["max"])
    figures["series"] = series
    return figures


def sample_series(samples, seconds):
    """Per-second series from the cumulative samples: sample k is taken at the
    end of second k - 1, so second s is the difference of samples s + 1 and s."""
    by_t = {s["t"]: s for s in samples}
    series = {name: [] for name in (
        "service_cpu_percent", "service_rss_mb", "lookup_server_cpu_percent",
        "lookup_server_rss_mb", "broker_cpu_percent", "harness_cpu_percent",
        "machine_cpu_percent",
        "cpu_wait_share", "backlog_messages", "event_time_lag_s", "events_folded_per_s")}
    for s in range(seconds):
        before, after = by_t.get(s), by_t.get(s + 1)
        span = (after["at"] - before["at"]) if before and after else None
        for name in ("service", "lookup_server", "broker", "harness"):
            cpu = rss = None
            if span and before.get(name) and after.get(name):
                cpu = round(100 * (after[name]["cpu_s"] - before[name]["cpu_s"]) / span, 1)
                rss = round(after[name]["rss"] / 2**20, 1)
            series[f"{name}_cpu_percent"].append(cpu)
            if f"{name}_rss_mb" in series:
                series[f"{name}_rss_mb"].append(rss)
        # busy share of all cores, in the processes' unit (100 = one core)
        series["machine_cpu_percent"].append(
            round(100 * os.cpu_count() * (after["machine_busy_s"] - before["machine_busy_s"]) /
                  (after["machine_total_s"] - before["machine_total_s"]), 1) if span else None)
        stalled = span and before["cpu_stall_s"] is not None and after["cpu_stall_s"] is not None
        series["cpu_wait_share"].append(
            round((after["cpu_stall_s"] - before["cpu_stall_s"]) / span, 3) if stalled else None)
        series["backlog_messages"].append(after and after["backlog"])
        series["event_time_lag_s"].append(after and after["event_time_lag_s"])
        folded = span and before["events_folded"] is not None and \
            after["events_folded"] is not None
        series["events_folded_per_s"].append(
            round((after["events_folded"] - before["events_folded"]) / span) if folded else None)
    return series


def unfolded_events(sent_per_second, samples, plan):
    """Events produced but not yet folded by the service, at the end of each
    second: the consumer lag in events. (The broker's backlog is no measure of
    it: the service acknowledges only what a checkpoint covers, so the backlog
    also holds up to a checkpoint interval of events already folded.) Assumes
    nothing was waiting when the load began."""
    by_t = {s["t"]: s for s in samples}
    first = by_t.get(0, {}).get("events_folded")
    produced_by = np.concatenate([[0], np.cumsum(sent_per_second)])

    seconds = plan.seconds

    def produced_at(t):
        """Events and probes produced by t seconds, spreading each second's
        events evenly (the sample is taken a little after its boundary)."""
        whole = min(int(t), seconds)
        within = sent_per_second[whole] * (t - whole) if whole < seconds else 0
        probes = min(plan.probes, int(t / plan.probe_interval_s) + 1)
        return produced_by[whole] + within + probes

    lag = []
    for s in range(seconds):
        after = by_t.get(s + 1)
        folded = None if after is None or first is None else after["events_folded"]
        lag.append(None if folded is None else
                   max(0, int(round(produced_at(after["metrics_at"]) - (folded - first)))))
    return lag


def steady_sample_figures(series, plan):
    """Means and maxima of the sampled series over the seconds after warm-up."""
    begin, end = int(math.ceil(plan.warmup_s)), int(plan.duration_s)

    def values(name):
        window = [v for v in series[name][begin:end] if v is not None]
        return np.array(window, dtype=float)

    figures = {}
    for name, kinds in (("events_folded_per_s", ("mean",)), ("backlog_messages", ("mean", "max")),
                        ("unfolded_events", ("mean", "max")),
                        ("event_time_lag_s", ("p50", "max")),
                        ("service_cpu_percent", ("mean", "max")), ("service_rss_mb", ("max",)),
                        ("lookup_server_cpu_percent", ("mean",)),
                        ("broker_cpu_percent", ("mean",)), ("harness_cpu_percent", ("mean",)),
                        ("machine_cpu_percent", ("mean",)),
                        ("cpu_wait_share", ("mean",)), ("producer_behind_ms", ("max",))):
        window = values(name)
        for kind in kinds:
            value = None
            if len(window):
                value = {"mean": window.mean(), "max": window.max(),
                         "p50": np.median(window)}[kind]
                value = round(float(value), 3)
            figures[f"{name}_{kind}"] = value
    return figures


def per_core_figures(samples, service_lookups, probes, plan):
    """Events folded per CPU-second of tally serve and lookups served per
    CPU-second of the lookup server, over the steady window. At a load below
    saturation these include idle costs (polling, timers): conservative."""
    by_t = {s["t"]: s for s in samples}
    begin, end = by_t.get(int(math.ceil(plan.warmup_s))), by_t.get(int(plan.duration_s))
    figures = {"events_per_core": None, "lookups_per_core": None}
    if not (begin and end):
        return figures
    if begin.get("service") and end.get("service") and end["events_folded"] is not None \
            and begin["events_folded"] is not None:
        cpu = end["service"]["cpu_s"] - begin["service"]["cpu_s"]
        figures["events_per_core"] = round((end["events_folded"] - begin["events_folded"]) / cpu)
    if begin.get("lookup_server") and end.get("lookup_server"):
        cpu = end["lookup_server"]["cpu_s"] - begin["lookup_server"]["cpu_s"]
        due = np.arange(len(service_lookups["latency_s"])) / plan.lookups_per_s
        served = int(((due >= begin["at"]) & (due < end["at"])).sum())
        # probe polls (a few keys each) are requests too; spread evenly
        polls = probes["polls"] * (end["at"] - begin["at"]) / plan.duration_s
        figures["lookups_per_core"] = round((served + polls) / cpu)
    return figures


def scale_measurements(overall, storage):
    return {"events_per_core": overall.get("events_per_core"),
            "features_measured": storage.get("features"),
            "lookups_per_core": overall.get("lookups_per_core"),
            **{k: _round(storage.get(k)) for k in (
                "ram_bytes_per_entity_feature", "ram_bytes_per_entity_view",
                "snapshot_bytes_per_entity_feature", "snapshot_bytes_per_entity_view",
                "lmdb_overhead_bytes_per_record")}}


def _round(value, digits=2):
    return None if value is None else round(float(value), digits)


def _json_default(value):
    if isinstance(value, np.ndarray):
        return [None if isinstance(v, float) and not math.isfinite(v) else v
                for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def print_overall(overall):
    service = overall.get("lookups_service", {})
    fresh = overall["freshness"]
    print(f"events/s: target {overall['events_target_per_s']:,.0f}, achieved "
          f"{overall['events_achieved_per_s']:,.0f}, folded {overall['events_folded_per_s_mean']}")
    print(f"lookups (service): {service.get('requests')} requests, {service.get('errors')} "
          f"errors, p50 {service.get('latency_ms_p50')} ms, p99 {service.get('latency_ms_p99')} "
          f"ms, p999 {service.get('latency_ms_p999')} ms")
    print(f"freshness: p50 {fresh['ms_p50']} ms, p99 {fresh['ms_p99']} ms "
          f"({fresh['probes_sent']} probes, {fresh['probes_unseen']} unseen)")
    print(f"lag: unfolded events max {overall['unfolded_events_max']}, backlog max "
          f"{overall['backlog_messages_max']} messages, event-time lag "
          f"max {overall['event_time_lag_s_max']} s; tally serve CPU "
          f"{overall['service_cpu_percent_mean']} %, RSS {overall['service_rss_mb_max']} MB")
