"""Lookup latency (issue 7): Tally's read paths side by side with Redis and Feast.

Every candidate reads the same entities (one int64-keyed view, 8 features:
4 int64, 4 float64), decodes every feature of every record it gets, and is
driven open loop: request i is due at start + i / rate, its latency is
measured from that due time (not from when it was actually sent), so a slow
answer that delays the next requests is charged to them too -- no
coordinated omission. Between due times the driver sleeps, then spins for
the last ~150 us, because a sleeping thread wakes tens of microseconds late.

Candidates, for 1 key and for 100 keys per request:

* ``c_api``     -- a C program compiled here against cext's libtally:
                   renew + get (or get_many) + read the features + reset.
* ``embedded``  -- ``EmbeddedReader`` (libtally through ctypes) in this process.
* ``service``   -- ``LookupClient`` against ``tally lookup-server`` (another
                   process), msgpack over loopback TCP.
* ``http``      -- the same server's HTTP port (GET one key, POST 100 keys),
                   from a minimal keep-alive client, JSON decoded.
* ``redis``     -- Debian's redis-server on loopback, one msgpack blob per
                   entity, GET / MGET from a minimal RESP client.
* ``feast``     -- Feast's ``get_online_features`` with its SQLite online store,
                   in a venv of its own (``--feast-python``), by subprocess.

Every candidate gets the same load: ``--rate`` requests/s of 1 key (1000)
and ``--batch-rate`` requests/s of 100 keys (200), unless that is more than
half the throughput it reached back to back -- then it runs at that half,
since an open-loop test above a server's capacity measures only its queue.
The rate used is reported with the figures, with the share of the time
some task of the machine waited for a CPU (Linux PSI) during the run: on a
shared machine, microsecond tails are mostly other tenants' work.
"""
import argparse
import asyncio
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from tally.bench.setup_peers import feast_python, missing_peer
from tally.service.store import open_store
from tally.core.record import INT64_MAX, Records, ViewSchema

VIEW = "user_reading"
INT_FEATURES = ("reads_1h", "reads_1d", "reads_7d", "reads_total")
FLOAT_FEATURES = ("readtime_1d", "readtime_7d", "readtime_total", "readtime_mean")
SCHEMA = ViewSchema(VIEW, 1, "int64", tuple((f, "int64") for f in INT_FEATURES) +
                    tuple((f, "float64") for f in FLOAT_FEATURES))
BATCH_SIZES = (1, 100)
CEXT = Path(__file__).resolve().parent.parent / "cext"


# ---- the open-loop driver (also sent to the Feast subprocess, as source) ----------

def wait_until(due):
    """Sleep most of the way (wake-ups come late), then spin to ``due``."""
    remaining = due - time.perf_counter()
    if remaining > 300e-6:
        time.sleep(remaining - 150e-6)
    while time.perf_counter() < due:
        pass


def open_loop(call, batches, rate):
    """Latency in seconds of each call(batch), measured from its due time."""
    interval = 1.0 / rate
    latencies = []
    start = time.perf_counter() + 0.005
    for i, batch in enumerate(batches):
        due = start + i * interval
        wait_until(due)
        call(batch)
        latencies.append(time.perf_counter() - due)
    return latencies


def capacity(call, batches, seconds):
    """Back-to-back calls per second over ``seconds`` (this also warms up)."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call(batches[done % len(batches)])
        done += 1
    return done / (time.perf_counter() - start)


def summarize(latencies):
    ordered = sorted(latencies)

    def at(q):
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)
    return {"p50_us": at(0.50), "p99_us": at(0.99), "p999_us": at(0.999),
            "max_us": round(ordered[-1] * 1e6, 1), "samples": len(ordered)}


def cpu_stall_seconds():
    """Seconds for which some task of the machine waited for a CPU (Linux
    PSI), or None: tells how disturbed a measurement was."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            return int(pressure.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pids=()):
    """CPU seconds used so far by this process and the processes ``pids``
    (a server, read from Linux's /proc): a request's cost in CPU, which
    waiting for a CPU on a shared machine does not inflate."""
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(call, batches, rate, seconds, warmup_seconds, pids=()):
    """Open-loop figures at ``rate``, or at half the back-to-back rate if
    lower; ``cpu_us_per_call``: the CPU of this process and ``pids`` per call
    back to back (the warm-up: no idle spinning of the driver counted)."""
    cpu, done = cpu_seconds(pids), time.perf_counter()
    reached = capacity(call, batches, warmup_seconds)
    cpu_per_call = (cpu_seconds(pids) - cpu) / (reached * (time.perf_counter() - done))
    used = min(rate, reached / 2)
    count = max(200, int(used * seconds))
    stalled, started = cpu_stall_seconds(), time.perf_counter()
    figures = summarize(open_loop(call, [batches[i % len(batches)] for i in range(count)],
                                  used))
    if stalled is not None:
        share = (cpu_stall_seconds() - stalled) / (time.perf_counter() - started)
        figures["cpu_wait_share"] = round(share, 3)
    return dict(figures, rate=round(used), back_to_back_per_s=round(reached),
                cpu_us_per_call=round(cpu_per_call * 1e6, 1))


def repeated(measure_once, repeats):
    """The median of each figure over ``repeats`` runs (samples: their sum)."""
    runs = [measure_once() for _ in range(repeats)]
    combined = {}
    for name in runs[0]:
        values = sorted(run[name] for run in runs)
        combined[name] = sum(values) if name == "samples" else values[len(values) // 2]
    return dict(combined, repeats=repeats)


DRIVER_SOURCE = "\n\n".join(inspect.getsource(f) for f in
                            (wait_until, open_loop, capacity, summarize, cpu_stall_seconds,
                             cpu_seconds, measure, repeated))


# ---- data -----------------------------------------------------------------------

def feature_columns(n_entities, seed=7):
    rng = np.random.default_rng(seed)
    columns = {f: rng.integers(0, 1 << 20, size=n_entities) for f in INT_FEATURES}
    columns.update({f: rng.random(n_entities) * 1e4 for f in FLOAT_FEATURES})
    return columns


def write_store(url, columns, n_entities):
    """The bench's records into the store ``url`` names (a path, or aerospike://)."""
    keys = np.arange(n_entities, dtype=np.int64)
    valid = np.ones(n_entities, dtype=bool)
    event_time = np.full(n_entities, 1_700_000_000_000)
    with open_store(str(url)) as store:
        store.register_view(SCHEMA)
        for start in range(0, n_entities, 100_000):
            part = slice(start, start + 100_000)
            values = {f: (columns[f][part], valid[part]) for f, _ in SCHEMA.features}
            store.write(VIEW, keys[part], Records(
                values, event_time[part], 1_700_000_000_000,
                np.full(len(keys[part]), INT64_MAX)))


def key_batches(n_entities, size, count, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_entities, size=(count, size)).tolist()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- C API ----------------------------------------------------------------------

C_DRIVER = r"""
/* Open-loop lookup latency through libtally (generated by bench/lookup.py).
 *   lookup_c STORE VIEW ENTITIES BATCH RATE COUNT WARMUP
 * Prints one JSON object: percentiles in microseconds. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "tally.h"

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sleep to 150 us before the due time (wake-ups are late), then spin. */
static void wait_until(int64_t due)
{
    int64_t early = due - 150000;
    if (early > now_ns()) {
        struct timespec ts;
        ts.tv_sec = early / 1000000000;
        ts.tv_nsec = early % 1000000000;
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    }
    while (now_ns() < due) {}
}

static int by_value(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double at(const int64_t *sorted, long n, double q)
{
    long i = (long)(q * n);
    return sorted[i < n ? i : n - 1] / 1000.0;
}

int main(int argc, char **argv)
{
    tally_store *store; tally_view *view; tally_txn *txn;
    long entities, batch, count, warmup, total, i, j;
    double rate, checksum = 0;
    uint64_t x = 88172645463325252ULL;
    int rc;
    if (argc != 8) { fprintf(stderr, "usage: see bench/lookup.py\n"); return 2; }
    entities = atol(argv[3]); batch = atol(argv[4]); rate = atof(argv[5]);
    count = atol(argv[6]); warmup = atol(argv[7]); total = warmup + count;
    int64_t *keys = malloc(sizeof(int64_t) * total * batch);
    int64_t *latency = malloc(sizeof(int64_t) * count);
    tally_record *records = malloc(sizeof(tally_record) * batch);
    int *status = malloc(sizeof(int) * batch);
    for (i = 0; i < total * batch; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        keys[i] = (int64_t)(x % (uint64_t)entities);
    }
    if ((rc = tally_store_open(argv[1], &store)) || (rc = tally_view_open(store, argv[2], &view))
        || (rc = tally_txn_begin(store, &txn))) {
        fprintf(stderr, "%s\n", tally_strerror(rc));
        return 1;
    }
    size_t f, n_features = tally_view_feature_count(view);
    int *types = malloc(sizeof(int) * n_features);
    for (f = 0; f < n_features; f++) types[f] = tally_view_feature_type(view, f);
    tally_txn_reset(txn);
    int64_t interval = (int64_t)(1e9 / rate), start = now_ns() + 1000000;
    for (i = 0; i < total; i++) {
        int64_t due = start + i * interval;
        wait_until(due);
        if ((rc = tally_txn_renew(txn))) { fprintf(stderr, "%s\n", tally_strerror(rc)); return 1; }
        if (batch == 1)
            status[0] = tally_get_int64(txn, view, keys[i], &records[0]);
        else
            tally_get_many_int64(txn, view, keys + i * batch, (size_t)batch, records, status);
        for (j = 0; j < batch; j++) {
            if (status[j]) continue;
            for (f = 0; f < n_features; f++)
                checksum += types[f] == TALLY_INT64
                    ? (double)tally_record_int64(&records[j], f)
                    : tally_record_float64(&records[j], f);
        }
        tally_txn_reset(txn);
        if (i >= warmup) latency[i - warmup] = now_ns() - due;
    }
    qsort(latency, (size_t)count, sizeof(int64_t), by_value);
    printf("{\"p50_us\": %.3f, \"p99_us\": %.3f, \"p999_us\": %.3f, \"max_us\": %.3f, "
           "\"samples\": %ld, \"checksum\": %.1f}\n", at(latency, count, 0.5),
           at(latency, count, 0.99), at(latency, count, 0.999), latency[count - 1] / 1000.0,
           count, checksum);
    tally_txn_end(txn); tally_view_close(view); tally_store_close(store);
    return 0;
}
"""


def build_c_driver(workdir):
    subprocess.run(["make", "-C", str(CEXT), "build/libtally.a"], check=True,
                   capture_output=True)
    source = Path(workdir) / "lookup_c.c"
    source.write_text(C_DRIVER)
    binary = Path(workdir) / "lookup_c"
    subprocess.run(["cc", "-O2", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-I", str(CEXT),
                    str(source), str(CEXT / "build" / "libtally.a"), "-llmdb", "-lpthread",
                    "-o", str(binary)], check=True)
    return binary


def c_api(binary, store, n_entities, size, rate, seconds):
    count = max(200, int(rate * seconds))
    stalled, started = cpu_stall_seconds(), time.perf_counter()
    done = subprocess.run([str(binary), str(store), VIEW, str(n_entities), str(size),
                           str(rate), str(count), str(count // 5)],
                          check=True, capture_output=True, text=True)
    figures = json.loads(done.stdout)
    figures.pop("checksum")
    if stalled is not None:
        share = (cpu_stall_seconds() - stalled) / (time.perf_counter() - started)
        figures["cpu_wait_share"] = round(share, 3)
    return dict(figures, rate=round(rate))


# ---- Tally's Python readers ------------------------------------------------------

def embedded_call(reader):
    def call(keys):
        return reader.get(VIEW, keys[0]) if len(keys) == 1 else reader.get_many(VIEW, keys)
    return call


def start_lookup_server(store):
    command = [sys.executable, "-m", "tally.service.cli", "lookup-server", "--store",
               str(store), "--port", "0", "--http-port", "0"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, TALLY_TOKEN=""))
    line = child.stdout.readline()
    found = re.search(r"msgpack on [\d.]+:(\d+), HTTP on http://[\d.]+:(\d+)", line)
    if not found:
        child.kill()
        raise RuntimeError(f"tally lookup-server did not start: {line!r}")
    return child, int(found.group(1)), int(found.group(2))


def service_call(client):
    def call(keys):
        return client.get(VIEW, keys[0]) if len(keys) == 1 else client.get_batch(VIEW, keys)
    return call


class HttpKeepAlive:
    """The least an HTTP/1.1 client can do: one connection, Content-Length bodies."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def exchange(self, head, body=b""):
        self.sock.sendall(head + body)
        status = self.file.readline()
        length = 0
        for line in iter(self.file.readline, b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        answer = json.loads(self.file.read(length))
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"HTTP error: {status!r} {answer}")
        return answer

    def call(self, keys):
        if len(keys) == 1:
            return self.exchange(f"GET /v1/features/{VIEW}/{keys[0]} HTTP/1.1\r\n"
                                 "Host: bench\r\n\r\n".encode())["record"]
        body = json.dumps({"keys": keys}).encode()
        head = (f"POST /v1/features/{VIEW} HTTP/1.1\r\nHost: bench\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        return self.exchange(head.encode(), body)["records"]


# ---- Redis ----------------------------------------------------------------------

class Resp:
    """A minimal Redis (RESP2) client: commands out, replies parsed."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    @staticmethod
    def encode(*args):
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            arg = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(parts)

    def command(self, *args):
        self.sock.sendall(self.encode(*args))
        return self.reply()

    def reply(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            return None if rest == b"-1" else self.file.read(int(rest) + 2)[:-2]
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode()}")
        return rest

    def call(self, keys):
        if len(keys) == 1:
            return msgpack.unpackb(self.command("GET", f"{VIEW}:{keys[0]}"))
        values = self.command("MGET", *(f"{VIEW}:{k}" for k in keys))
        return [None if v is None else msgpack.unpackb(v) for v in values]


def start_redis(workdir):
    if shutil.which("redis-server") is None:
        return None, None
    port = free_port()
    child = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client = Resp(port)
            if client.command("PING") == b"PONG":
                return child, client
        except (ConnectionError, OSError):
            time.sleep(0.05)
    child.kill()
    raise RuntimeError("redis-server did not answer PING within 10 s")


def load_redis(client, reader, n_entities):
    """One msgpack blob per entity: the record as Tally's readers return it."""
    for start in range(0, n_entities, 1000):
        keys = list(range(start, min(start + 1000, n_entities)))
        args = []
        for key, record in zip(keys, reader.get_many(VIEW, keys)):
            args += [f"{VIEW}:{key}", msgpack.packb(record)]
        client.command("MSET", *args)


# ---- Feast ----------------------------------------------------------------------

FEAST_DRIVER = """
import json, os, sys, time
from datetime import timedelta
import numpy as np, pandas as pd
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
from feast.repo_config import RegistryConfig, RepoConfig
from feast.types import Float64, Int64

{driver}

def main():
    job = json.load(open(sys.argv[1]))
    repo = job["repo"]
    config = RepoConfig(project="bench", provider="local",
                        registry=RegistryConfig(path=os.path.join(repo, "registry.db")),
                        online_store=SqliteOnlineStoreConfig(
                            path=os.path.join(repo, "online.db")),
                        entity_key_serialization_version=3)
    store = FeatureStore(config=config)
    frame = pd.DataFrame(dict(user=np.arange(job["entities"], dtype=np.int64),
                              **{{f: np.array(v) for f, v in job["columns"].items()}}))
    frame["event_timestamp"] = pd.Timestamp("2023-11-14", tz="UTC")
    source_path = os.path.join(repo, "source.parquet")
    frame.to_parquet(source_path)
    user = Entity(name="user", join_keys=["user"], value_type=ValueType.INT64)
    schema = [Field(name=f, dtype=Int64) for f in job["int_features"]] + \\
        [Field(name=f, dtype=Float64) for f in job["float_features"]]
    view = FeatureView(name=job["view"], entities=[user], ttl=timedelta(days=36500),
                       schema=schema, online=True,
                       source=FileSource(path=source_path, timestamp_field="event_timestamp"))
    store.apply([user, view])
    started = time.perf_counter()
    store.write_to_online_store(job["view"], frame)
    loaded = time.perf_counter() - started
    features = [f"{{job['view']}}:{{f}}" for f in job["int_features"] + job["float_features"]]

    def call(keys):
        return store.get_online_features(features=features,
                                         entity_rows=[{{"user": k}} for k in keys]).to_dict()
    sample = call([0])
    results = {{"load_seconds": round(loaded, 1), "sample": {{k: v[0] for k, v in sample.items()}}}}
    for size, batches in job["batches"].items():
        results[size] = repeated(lambda: measure(call, batches, job["rates"][size],
                                                 job["seconds"], job["warmup"]),
                                 job["repeats"])
    print(json.dumps(results))

main()
"""


def feast(python, workdir, columns, n_entities, batches, rates, seconds, warmup, repeats):
    """Figures from Feast in its own interpreter, or a reason it was skipped."""
    if not python:
        return {"skipped": "--feast-python ''"}
    if not os.path.exists(python):
        return {"skipped": missing_peer(f"Feast (no interpreter at {python!r})")}
    repo = Path(workdir) / "feast"
    repo.mkdir()
    job = {"repo": str(repo), "entities": n_entities, "view": VIEW,
           "rates": {str(size): rate for size, rate in rates.items()},
           "seconds": seconds, "warmup": warmup, "repeats": repeats,
           "int_features": list(INT_FEATURES),
           "float_features": list(FLOAT_FEATURES),
           "columns": {f: c.tolist() for f, c in columns.items()},
           "batches": {str(size): b for size, b in batches.items()}}
    (repo / "job.json").write_text(json.dumps(job))
    script = repo / "driver.py"
    script.write_text(FEAST_DRIVER.format(driver=DRIVER_SOURCE))
    done = subprocess.run([python, str(script), str(repo / "job.json")],
                          capture_output=True, text=True)
    if done.returncode:
        return {"skipped": f"the Feast driver failed: {done.stderr.strip()[-800:]}"}
    return json.loads(done.stdout.splitlines()[-1])


# ---- the run --------------------------------------------------------------------

def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench lookup")
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="requests/s of 1 key (1000)")
    parser.add_argument("--batch-rate", type=float, default=200.0,
                        help="requests/s of 100 keys (200)")
    parser.add_argument("--busy-rate", type=float, default=100_000.0,
                        help="rate of the extra c_api_busy row, 1 key (100000)")
    parser.add_argument("--seconds", type=float, default=2.0 if quick else 10.0,
                        help="open-loop time per run (2 with --quick, else 10)")
    parser.add_argument("--repeats", type=int, default=1 if quick else 3,
                        help="runs per row; the figures are their medians (1 / 3)")
    parser.add_argument("--feast-python", default=feast_python(),
                        help="python of a venv with feast (default: $TALLY_FEAST_PYTHON, else "
                        "setup-peers' venv); empty: skip Feast")
    parser.add_argument("--aerospike", metavar="HOST:PORT", default=None,
                        help="instead: lookups from this Aerospike server (namespace test): "
                        "the lookup server on it, and the official client on a thread pool "
                        "against aerospike-py's asyncio client")
    parser.add_argument("--skip-server", action="store_true",
                        help="with --aerospike: only the client rows, not the lookup server")
    args = parser.parse_args(argv)
    args.warmup = 0.3 if quick else 1.0
    args.rates = {1: args.rate, 100: args.batch_rate}
    columns = feature_columns(args.entities)
    if args.aerospike:
        return aerospike_run(args, columns)
    with tempfile.TemporaryDirectory(prefix="tally-bench-lookup-") as workdir:
        store = Path(workdir) / "store"
        write_store(store, columns, args.entities)
        batches = {size: key_batches(args.entities, size, 2000, seed=size)
                   for size in BATCH_SIZES}
        figures = c_candidates(build_c_driver(workdir), store, args)
        figures.update(python_candidates(store, workdir, args, batches))
        figures["feast"] = feast(args.feast_python, workdir, columns, args.entities, batches,
                                 args.rates, args.seconds, args.warmup, args.repeats)
    print_table(figures)
    return {"benchmark": "lookup", "entities": args.entities, "features": len(SCHEMA.features),
            "rates": args.rates, "seconds": args.seconds, "repeats": args.repeats,
            "load_average": os.getloadavg()[0], "figures": figures, "goals": goals(figures)}


def c_candidates(binary, store, args):
    def rows(rates):
        return {size: repeated(lambda: c_api(binary, store, args.entities, size, rate,
                                             args.seconds), args.repeats)
                for size, rate in rates.items()}
    return {"c_api": rows(args.rates),
            "c_api_busy": rows({1: args.busy_rate})}


def python_candidates(store, workdir, args, batches):
    from tally.service.store.embedded import EmbeddedReader
    from tally.service.lookup.client import LookupClient
    figures = {}

    def each_size(call):
        return {size: repeated(lambda: measure(call, batches[size], args.rates[size],
                                               args.seconds, args.warmup), args.repeats)
                for size in BATCH_SIZES}

    with EmbeddedReader(store) as reader:
        figures["embedded"] = each_size(embedded_call(reader))
        server, port, http_port = start_lookup_server(store)
        try:
            with LookupClient(port=port) as client:
                assert client.get(VIEW, 5) == reader.get(VIEW, 5)
                figures["service"] = each_size(service_call(client))
            figures["http"] = each_size(HttpKeepAlive(http_port).call)
        finally:
            server.terminate()
            server.wait()
        redis, redis_client = start_redis(workdir)
        if redis is None:
            figures["redis"] = {"skipped": missing_peer("redis-server")}
        else:
            try:
                load_redis(redis_client, reader, args.entities)
                assert redis_client.call([5]) == reader.get(VIEW, 5)
                figures["redis"] = each_size(redis_client.call)
            finally:
                redis.terminate()
                redis.wait()
    return figures


def goals(figures):
    def p99(candidate, size):
        row = figures.get(candidate, {}).get(size) or figures.get(candidate, {}).get(str(size))
        return row["p99_us"] if row else None

    checks = {"c_api_1_key_p99_le_2us": (p99("c_api", 1), 2.0),
              "service_1_key_p99_le_500us": (p99("service", 1), 500.0),
              "service_100_keys_p99_le_1500us": (p99("service", 100), 1500.0)}
    result = {name: value is not None and value <= limit
              for name, (value, limit) in checks.items()}
    for size in BATCH_SIZES:
        feast_p99 = p99("feast", size)
        for candidate in ("c_api", "embedded", "service", "http"):
            mine = p99(candidate, size)
            if feast_p99 and mine:
                result[f"{candidate}_{size}_p99_vs_feast"] = round(feast_p99 / mine, 1)
    return result


def print_table(figures):
    print(f"{'candidate':10} {'keys':>4} {'rate/s':>7} {'p50 us':>9} {'p99 us':>9} "
          f"{'p999 us':>9} {'max us':>9} {'samples':>8} {'cpu wait':>8}")
    for name, rows in figures.items():
        if "skipped" in rows:
            print(f"{name:10} skipped: {rows['skipped'][:200]}")
            continue
        for size in BATCH_SIZES:
            row = rows.get(size) or rows.get(str(size))
            if row:
                print(f"{name:10} {size:>4} {row['rate']:>7} {row['p50_us']:>9} "
                      f"{row['p99_us']:>9} {row['p999_us']:>9} {row['max_us']:>9} "
                      f"{row['samples']:>8} {row.get('cpu_wait_share', '-'):>8}")


# ---- Aerospike ------------------------------------------------------------------

AEROSPIKE_CONCURRENCY = 16          # requests in flight in the closed-loop client rows
RAW, TALLY = "official_threadpool", "tally_store_official"


def aerospike_run(args, columns):
    """The lookup server serving from Aerospike (open loop, as the other
    rows), then the raw Python clients and Tally's store side by side in a
    closed loop of ``AEROSPIKE_CONCURRENCY`` requests in flight on one event
    loop: ``--repeats`` rounds, each running every client once per size (the
    order reversed every other round, so a drift of the shared machine's load
    falls on both sides), and per round the ratio raw lookups/s over Tally's
    (the goal: at most 1.2); its median and spread are reported."""
    import uuid
    from tally.service.lookup.client import LookupClient
    url = f"aerospike://{args.aerospike}/test?set_prefix=b{uuid.uuid4().hex[:6]}_"
    write_store(url, columns, args.entities)
    batches = {size: key_batches(args.entities, size, 2000, seed=size) for size in BATCH_SIZES}
    figures = {}
    if not args.skip_server:
        server, port, _ = start_lookup_server(url)
        try:
            with LookupClient(port=port) as client:
                figures["service_aerospike"] = {
                    size: repeated(lambda: measure(service_call(client), batches[size],
                                                   args.rates[size], args.seconds,
                                                   args.warmup), args.repeats)
                    for size in BATCH_SIZES}
        finally:
            server.terminate()
            server.wait()
        print_table(figures)
    # the store gets as many threads as the raw clients' pool: the same concurrency
    with open_store(url, executor_workers=AEROSPIKE_CONCURRENCY) as store:
        set_name = store._version(VIEW).set_name
        keys = {size: [[("test", set_name, k) for k in batch] for batch in chunk]
                for size, chunk in batches.items()}
        clients = aerospike_clients(args.aerospike, store)
        runs = {name: {size: [] for size in BATCH_SIZES} for name in clients}
        for round_ in range(args.repeats):
            for name in (list(clients) if round_ % 2 == 0 else list(clients)[::-1]):
                for size in BATCH_SIZES:
                    runs[name][size].append(closed_loop(clients[name], keys[size],
                                                        args.seconds))
    for name, sizes in runs.items():
        figures[name] = {size: median_run(rows) for size, rows in sizes.items()}
        for size, row in figures[name].items():
            print(f"{name:22} {size:>4} keys  {row['per_s']:>9,.0f} lookups/s  "
                  f"p50 {row['p50_us']:>7} us  p99 {row['p99_us']:>7} us")
    ratios = {size: spread([raw["per_s"] / tally["per_s"] for raw, tally in
                             zip(runs[RAW][size], runs[TALLY][size])])
              for size in BATCH_SIZES}
    for size, ratio in ratios.items():
        print(f"raw / tally lookups/s, {size} keys: {ratio}")
    return {"benchmark": "lookup-aerospike", "entities": args.entities, "figures": figures,
            "raw_over_tally": ratios, "concurrency": AEROSPIKE_CONCURRENCY,
            "seconds": args.seconds, "repeats": args.repeats}


def median_run(rows):
    """The run of median lookups/s, with every run's lookups/s."""
    ordered = sorted(rows, key=lambda row: row["per_s"])
    return dict(ordered[len(ordered) // 2], per_s_runs=[row["per_s"] for row in rows])


def spread(values):
    """Median, min, max and every value of per-round ratios."""
    ordered = sorted(values)
    return {"median": round(ordered[len(ordered) // 2], 3), "min": round(ordered[0], 3),
            "max": round(ordered[-1], 3), "runs": [round(v, 3) for v in values]}


def aerospike_clients(address, store):
    """name -> async call(keys): the raw clients (every bin: a set holds one
    version's bins, as the store reads them), and Tally's store over the
    official one."""
    import concurrent.futures
    import aerospike
    import aerospike_py
    host, port = address.rsplit(":", 1)
    official = aerospike.client({"hosts": [(host, int(port))]})
    pool = concurrent.futures.ThreadPoolExecutor(AEROSPIKE_CONCURRENCY)
    policy = {"concurrent": True, "total_timeout": 1000}

    async def official_pool(keys):
        loop = asyncio.get_running_loop()
        batch = await loop.run_in_executor(pool, official.batch_read, keys, None, policy)
        return [r.record[2] if r.result == 0 else None for r in batch.batch_records]

    state = {}

    async def native(keys):
        if "client" not in state:
            state["client"] = await aerospike_py.AsyncClient(
                {"hosts": [(host, int(port))]}).connect()
        batch = await state["client"].batch_read(keys, None, policy)
        return [r.record[2] if r.result == 0 else None for r in batch.batch_records]

    async def tally_store(keys):
        return await store.get_many_async(VIEW, [k[2] for k in keys])

    return {RAW: official_pool, "aerospike_py_async": native, TALLY: tally_store}


def closed_loop(call, batches, seconds):
    """Lookups/s and latency with AEROSPIKE_CONCURRENCY requests in flight."""
    latencies = []

    async def worker(offset, until):
        i = offset
        while time.perf_counter() < until:
            started = time.perf_counter()
            await call(batches[i % len(batches)])
            latencies.append(time.perf_counter() - started)
            i += AEROSPIKE_CONCURRENCY

    async def main():
        await call(batches[0])                                   # connect, warm
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(worker(w, until) for w in range(AEROSPIKE_CONCURRENCY)))
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    ordered = sorted(latencies)
    return {"per_s": round(len(ordered) / elapsed), "samples": len(ordered),
            "p50_us": round(ordered[len(ordered) // 2] * 1e6, 1),
            "p99_us": round(ordered[int(len(ordered) * 0.99)] * 1e6, 1)}
