"""Issue #18: Tally against Apache Flink on the same Pulsar topic, in one run.

The quick start's reads (``generate_events``: msgpack maps of user, article,
readtime, ts; here spread over ``--days`` days, so the 7-day window leaves
some out) are written once to a 4-partition topic of a local broker. Then, for
each of ``--repeats`` rounds, in alternating order, each side reads the whole
topic from its start through a subscription of its own and computes per user
the lifetime SUM(readtime) and COUNT and the SUM(readtime) of a 7-day window
sliding by 1 hour, in event time:

* ``flink``: the Flink peer (``bench/peers/flink``, built by ``python -m
  tally.bench setup-peers``) in a local mini-cluster of parallelism = cores,
  reading through flink-connector-pulsar up to the last message there at its
  start; a keyed process function for the lifetime values (emitted on every
  event) and ``SlidingEventTimeWindows`` with an incremental aggregate for the
  window (emitted when each window closes), both into discarding sinks that
  count, and a dump of each user's last values for the check below.
  ``--flink-window tiles`` keeps the window as Tally does instead, 168 hour
  tiles per user in keyed state, the sum emitted on every event; ``none``
  leaves it out, to see what the window costs. Its CPU is
  the JVM's whole (``wait4``'s rusage: start-up and JIT included) and, apart,
  that of ``execute()`` alone (the JVM's own process CPU time around it).
* ``tally``: the production path (``Ingestion``, as ``bench/ingest.py``
  measures it) of a view of the same three features, into LMDB, with the
  workers' clock at the history's end (``now`` decides which hops a window
  covers; the history is from 2024). CPU: this process's ``process_time``
  during the run (the client's I/O threads included).

The broker is shared by both, and its CPU counted for neither. Check: on a
sample of users, Tally's and Flink's lifetime sum and count are equal, and the
7-day sum at the history's end -- Tally's as of the end, Flink's window that
ends at the next hour boundary, the same tiles -- within float tolerance;
both are also compared with numpy over the generated events.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from tally.bench.ingest import bare_client_rate, tally_rates
from tally.bench.setup_peers import flink_classpath, missing_peer
from tally.core.definitions import Feature, FeatureView, Window
from tally.service.examples.reading import read_events, user
from tally.service.pulsar.client import connect
from tally.service.pulsar.local import LocalPulsar, java_executable
from tally.service.pulsar.producer import EventProducer
from tally.service.quickstart import generate_events
from tally.service.store.lmdb import LmdbStore

TOPIC = "bench_flink"
HOUR = 3_600_000
WEEK = 7 * 24 * HOUR
VIEW = FeatureView(
    "bench_flink", user, dataclasses.replace(read_events, topic=TOPIC),
    features=[Feature("total_readtime", "sum", "readtime"), Feature("reads", "count"),
              Feature("readtime_7d", "sum", "readtime", Window.sliding("7d", "1h"))])
JOB_CLASS = "tally.peers.flink.ReadingJob"
FLINK_WINDOWS = ("sliding", "tiles", "none")
# What Flink 1.18's own launcher opens on Java 17 (env.java.opts.all).
FLINK_JVM_OPENS = [f"--add-opens=java.base/{package}=ALL-UNNAMED" for package in (
    "java.lang", "java.net", "java.io", "java.nio", "sun.nio.ch", "java.lang.reflect",
    "java.text", "java.time", "java.util", "java.util.concurrent",
    "java.util.concurrent.atomic", "java.util.concurrent.locks")]


def check_window_end(end_ms):
    """The end of the hop-aligned 7-day window a read as of ``end_ms`` covers:
    tiles (t // hop - 168, t // hop], i.e. [end - 7d, end) with end the next
    hour boundary after ``end_ms``'s hour starts."""
    return (end_ms // HOUR + 1) * HOUR


def oracle(events, window_end):
    """{user: (lifetime sum, count, 7-day sum)} straight from the events."""
    users, readtime, ts = events["user"], events["readtime"], events["ts"]
    n = int(users.max()) + 1
    recent = (ts >= window_end - WEEK) & (ts < window_end)
    sums = np.bincount(users, readtime, n)
    counts = np.bincount(users, minlength=n)
    week = np.bincount(users[recent], readtime[recent], n)
    return {int(u): (sums[u], int(counts[u]), week[u]) for u in np.unique(users)}


# ---- Flink -------------------------------------------------------------------------

def flink_round(classpath, broker, window_end, subscription, workdir, window="sliding"):
    """One run of the Flink job: its figures and {user: (sum, count, 7-day sum)}
    (the 7-day sum None when ``window`` is "none")."""
    out = Path(tempfile.mkdtemp(prefix="dump-", dir=workdir))
    command = [java_executable(), "-Xmx3g", "-XX:+PerfDisableSharedMem", *FLINK_JVM_OPENS,
               "-cp", classpath, JOB_CLASS,
               "--service-url", broker.service_url, "--admin-url", broker.admin_url,
               "--topic", f"persistent://public/default/{TOPIC}",
               "--subscription", subscription, "--check-window-end", str(window_end),
               "--out", str(out), "--parallelism", str(os.cpu_count()),
               "--window", window]
    log = out / "stdout"
    with open(log, "w") as stdout:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT)
        # wait4: the rusage of the JVM with all its threads, read as it is reaped
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
    lines = log.read_text().splitlines()
    if child.returncode:
        raise RuntimeError(f"the Flink job failed ({child.returncode}):\n" +
                           "\n".join(lines[-40:]))
    figures = json_line(lines)
    figures.update(process_seconds=round(wall, 2),
                   jvm_cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2))
    return figures, read_dumps(out, window != "none")


def json_line(lines):
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


def read_dumps(folder, sliding):
    """The job's per-user dumps: lifetime (sum, count), the checked window's sum
    (0 for a user with no event in it: no window fired; None if not computed)."""
    def read(name):
        values = {}
        for path in folder.glob(f"{name}-*.tsv"):
            for line in path.read_text().splitlines():
                key, total, count = line.split("\t")
                values[int(key)] = (float(total), int(count))
        return values
    lifetime, week = read("lifetime"), read("sliding_7d")
    return {key: (total, count, week.get(key, (0.0, 0))[0] if sliding else None)
            for key, (total, count) in lifetime.items()}


# ---- Tally -------------------------------------------------------------------------

def tally_round(client, n_events, end_ms, subscription, workdir, sample):
    store_dir = tempfile.mkdtemp(prefix="store-", dir=workdir)
    rates = tally_rates(client, n_events, store_dir, VIEW, subscription=subscription,
                        clock=lambda: end_ms)
    with LmdbStore(store_dir) as store:
        records = store.get_many(VIEW.name, sample)
    values = {key: (r["total_readtime"], r["reads"], r["readtime_7d"])
              for key, r in zip(sample, records) if r is not None}
    cpu = rates["events"] / rates["events_per_cpu_s"]
    return {"events": rates["events"], "rejected": rates["rejected"],
            "seconds": round(rates["events"] / rates["end_to_end"], 2),
            "cpu_seconds": round(cpu, 2)}, values


# ---- the check and the figures ---------------------------------------------------------

def agreement(tally, flink, truth, sample):
    """Counts of sampled users on which the sides agree, with each other and
    with numpy (lifetime values exactly between the two; sums within 1e-9; a
    7-day sum Flink did not compute agrees with any)."""
    def close(a, b):
        return a is None or b is None or bool(np.isclose(a, b, rtol=1e-9, atol=1e-9))
    found = {"users": len(sample), "tally_missing": 0, "flink_missing": 0,
             "lifetime_equal": 0, "week_close": 0, "tally_matches_numpy": 0,
             "flink_matches_numpy": 0}
    for key in sample:
        ours, theirs, want = tally.get(key), flink.get(key), truth[key]
        found["tally_missing"] += ours is None
        found["flink_missing"] += theirs is None
        if ours is None or theirs is None:
            continue
        found["lifetime_equal"] += ours[:2] == theirs[:2]
        found["week_close"] += close(ours[2], theirs[2])
        for side, got in (("tally", ours), ("flink", theirs)):
            found[f"{side}_matches_numpy"] += (got[1] == want[1] and close(got[0], want[0])
                                               and close(got[2], want[2]))
    found["all_agree"] = all(found[k] == len(sample) for k in (
        "lifetime_equal", "week_close", "tally_matches_numpy", "flink_matches_numpy"))
    return found


def spread(values):
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def tally_row(rounds, n_events):
    tally = [r["tally"] for r in rounds]
    return {"events_per_s": spread([t["events"] / t["seconds"] for t in tally]),
            "cpu_s_per_million_events": spread([t["cpu_seconds"] / (n_events / 1e6)
                                                for t in tally])}


def summary(rounds, n_events):
    flink, tally = [r["flink"] for r in rounds], [r["tally"] for r in rounds]
    million = n_events / 1e6
    rows = {
        "flink": {"events_per_s": spread([f["events"] / f["job_seconds"] for f in flink]),
                  "cpu_s_per_million_events": spread([f["jvm_cpu_seconds"] / million
                                                      for f in flink]),
                  "job_cpu_s_per_million_events": spread([f["job_cpu_seconds"] / million
                                                          for f in flink])},
        "tally": tally_row(rounds, n_events)}
    # events per CPU-second, Tally over Flink, round by round
    rows["ratio_events_per_cpu_s"] = spread(
        [f["jvm_cpu_seconds"] / t["cpu_seconds"] for f, t in zip(flink, tally)])
    rows["ratio_events_per_cpu_s_job_only"] = spread(
        [f["job_cpu_seconds"] / t["cpu_seconds"] for f, t in zip(flink, tally)])
    rows["ratio_events_per_s"] = spread(
        [f["job_seconds"] / t["seconds"] for f, t in zip(flink, tally)])
    return rows


def print_table(rows):
    print(f"{'':8} {'events/s':>22} {'CPU-s / M events':>22} {'(execute() only)':>22}")
    for side in ("flink", "tally"):
        row = rows[side]

        def cell(name):
            figures = row.get(name)
            return "" if figures is None else \
                f"{figures['median']:,.1f} [{figures['min']:,.1f}-{figures['max']:,.1f}]"
        print(f"{side:8} {cell('events_per_s'):>22} {cell('cpu_s_per_million_events'):>22} "
              f"{cell('job_cpu_s_per_million_events'):>22}")
    for name in ("ratio_events_per_cpu_s", "ratio_events_per_cpu_s_job_only",
                 "ratio_events_per_s"):
        r = rows[name]
        print(f"tally/flink {name[6:]}: {r['median']} [{r['min']}-{r['max']}]")


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench flink")
    parser.add_argument("--events", type=int, default=100_000 if quick else 1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=10, help="span of the events' times")
    parser.add_argument("--repeats", type=int, default=1 if quick else 3)
    parser.add_argument("--sample", type=int, default=1000, help="users checked")
    parser.add_argument("--flink-window", choices=FLINK_WINDOWS, default="sliding",
                        help="how Flink keeps the 7-day sum (see the module's doc)")
    args = parser.parse_args(argv)
    classpath = flink_classpath()
    payloads, keys, events = generate_events(args.events, args.users, seed=18,
                                             span_ms=args.days * 24 * HOUR)
    end_ms = int(events["ts"].max())
    window_end = check_window_end(end_ms)
    truth = oracle(events, window_end)
    rng = np.random.default_rng(18)
    sample = sorted(int(k) for k in rng.choice(sorted(truth), min(args.sample, len(truth)),
                                                replace=False))
    figures = {"benchmark": "flink", "events": args.events, "users": args.users,
               "days": args.days, "repeats": args.repeats, "cores": os.cpu_count(),
               "flink_window": args.flink_window,
               "load_average_before": os.getloadavg()}
    if classpath is None:
        figures["flink"] = {"skipped": missing_peer("the Flink peer")}
    with LocalPulsar() as broker, tempfile.TemporaryDirectory(prefix="tally-bench-flink-") as work:
        broker.create_partitioned_topic(TOPIC, 4)
        client = connect(broker.service_url)
        producer = EventProducer(client, TOPIC, "user")
        for payload, key in zip(payloads, keys):
            producer.send_payload(payload, key)
        producer.close()
        bare_client_rate(client, args.events, "warm-up", topic=TOPIC)  # the bookie's cache
        rounds = []
        for i in range(args.repeats):
            found = {}
            sides = ["tally", "flink"] if classpath else ["tally"]
            for side in sides if i % 2 == 0 else sides[::-1]:
                if side == "tally":
                    found["tally"], tally_values = tally_round(
                        client, args.events, end_ms, f"tally-{i}", work, sample)
                else:
                    found["flink"], flink_values = flink_round(
                        classpath, broker, window_end, f"flink-{i}", work,
                        window=args.flink_window)
                print(f"round {i} {side}: {found[side]}", flush=True)
                assert found[side]["events"] == args.events, f"{side} read {found[side]}"
            if classpath:
                found["agreement"] = agreement(tally_values, flink_values, truth, sample)
            rounds.append(found)
        client.close()
    figures["rounds"] = rounds
    figures["load_average_after"] = os.getloadavg()
    if classpath:
        figures.update(summary(rounds, args.events))
        figures["all_agree"] = all(r["agreement"]["all_agree"] for r in rounds)
        print_table(figures)
    else:
        figures["tally"] = tally_row(rounds, args.events)
        print(f"flink: {figures['flink']['skipped']}\ntally: {figures['tally']}")
    return figures
