"""The Aerospike store against a real server: one test per defect of issue 15 §2.

Skipped without ``TALLY_AEROSPIKE=host:port`` (namespaces ``test`` and, for the
restart tests, ``bar``: both need ``nsup-period`` > 0; ``bar`` needs storage
that outlives a restart, e.g. ``storage-engine memory`` backed by a file).
The restart tests also need ``TALLY_AEROSPIKE_RESTART_CMD``, a shell command
that stops the server and starts it again (on Community Edition every start
is a cold start). DEVELOPERS.md says how to have such a server.
"""
import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from tally.core.record import INT64_MAX, Records, ViewSchema
from tally.service.store import StoreError, open_store

SERVER = os.environ.get("TALLY_AEROSPIKE")
RESTART = os.environ.get("TALLY_AEROSPIKE_RESTART_CMD")
pytestmark = [pytest.mark.aerospike,
              pytest.mark.skipif(not SERVER, reason="set TALLY_AEROSPIKE=host:port")]
needs_restart = pytest.mark.skipif(not RESTART, reason="set TALLY_AEROSPIKE_RESTART_CMD")

V1 = ViewSchema("reads", 1, "int64", (("total", "int64"), ("gone", "float64")))
V2 = ViewSchema("reads", 2, "int64", (("total", "int64"), ("fresh", "float64")))


def url(namespace="test", prefix=None, **options):
    query = "&".join(f"{k}={v}" for k, v in options.items())
    prefix = prefix or f"t{uuid.uuid4().hex[:8]}_"
    return f"aerospike://{SERVER}/{namespace}?set_prefix={prefix}" + (f"&{query}" if query else "")


def records(schema, n, seed=0):
    rng = np.random.default_rng(seed)
    values = {}
    for name, dtype in schema.features:
        column = rng.integers(-10**15, 10**15, n) if dtype == "int64" else rng.normal(size=n)
        values[name] = (column, rng.random(n) > 0.2)
    return Records(values, rng.integers(1, 10**12, n), 1_700_000_000_000, np.full(n, INT64_MAX))


def expected(schema, recs, i):
    """What entity i must read back as: by hand, from the columns."""
    row = {}
    for name, dtype in schema.features:
        column, valid = recs.values[name]
        row[name] = (int(column[i]) if dtype == "int64" else float(column[i])) if valid[i] \
            else None
    row.update(_event_time=int(recs.event_time[i]), _write_time=int(recs.write_time),
               _valid_until=None, _view_version=schema.version)
    return row


@pytest.fixture
def prefix():
    return f"t{uuid.uuid4().hex[:8]}_"


def test_a_long_lived_reader_follows_a_new_version_and_old_writers_never_mix_in(prefix):
    with open_store(url(prefix=prefix, meta_refresh_s=0.2)) as reader, \
            open_store(url(prefix=prefix)) as writer:
        writer.register_view(V1)
        old = records(V1, 50)
        writer.write("reads", np.arange(50), old)
        assert reader.get_many("reads", range(50)) == [expected(V1, old, i) for i in range(50)]
        writer.register_view(V2)                          # another process's new version
        new = records(V2, 50, seed=1)
        writer.write("reads", np.arange(50), new)
        writer.write("reads", np.arange(50), records(V1, 50, seed=2), version=1)  # late v1 writer
        time.sleep(0.3)
        assert reader.get_many("reads", range(50)) == [expected(V2, new, i) for i in range(50)]
        assert reader.schema("reads") == V2


def test_candidates_and_promotion_readers_see_one_version_whole(prefix):
    with open_store(url(prefix=prefix, meta_refresh_s=0)) as store:
        store.register_view(V1)
        old = records(V1, 200)
        store.write("reads", np.arange(200), old)
        store.register_view(V2, current=False)
        new = records(V2, 200, seed=3)
        store.write("reads", np.arange(200), new, version=2)
        assert store.schema("reads") == V1
        stop, seen = threading.Event(), []

        def read():
            with open_store(url(prefix=prefix, meta_refresh_s=0)) as reader:
                while not stop.is_set():
                    seen.append({r["_view_version"] for r in reader.get_many("reads", range(200))})
        thread = threading.Thread(target=read)
        thread.start()
        time.sleep(0.3)
        store.promote("reads", 2)
        time.sleep(0.3)
        stop.set()
        thread.join()
        assert {1} in seen and {2} in seen and all(len(s) == 1 for s in seen)   # never a mix
        assert store.get_many("reads", range(200)) == [expected(V2, new, i) for i in range(200)]


REGISTER = r"""
import sys
from tally.core.record import ViewSchema
from tally.service.store import open_store
url, first = sys.argv[1], int(sys.argv[2])
with open_store(url) as store:
    for version in range(first, 41, 2):
        store.register_view(ViewSchema("race", version, "int64",
                                       ((f"only_v{version}", "int64"),)), current=False)
"""


def test_concurrent_registrations_from_two_processes_lose_nothing(prefix):
    processes = [subprocess.Popen([sys.executable, "-c", REGISTER, url(prefix=prefix), str(first)])
                 for first in (1, 2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    with open_store(url(prefix=prefix)) as store:
        versions = store._pointer("race", fresh=True).versions
        assert sorted(versions) == list(range(1, 41))
        assert len({v.set_name for v in versions.values()}) == 40
        for version in (7, 8):                    # a value written as one feature reads as it
            n = 5
            store.write("race", np.arange(n), Records(
                {f"only_v{version}": (np.arange(n) * version, np.ones(n, bool))},
                np.arange(n), 1, np.full(n, INT64_MAX)), version=version)
        assert [r[f"only_v{7}"] for r in store.get_many("race", range(5), version=7)] == \
            [i * 7 for i in range(5)]
        assert [r[f"only_v{8}"] for r in store.get_many("race", range(5), version=8)] == \
            [i * 8 for i in range(5)]


def test_record_ttl_is_the_views_online_expiry(prefix):
    with open_store(url(prefix=prefix)) as store:
        store.register_view(V1, expiry_ms=2000)
        store.write("reads", np.arange(10), records(V1, 10))
        key = (store.namespace, store._version("reads").set_name, 3)
        _, meta, _ = store.client.get(key)
        assert 0 < meta["ttl"] <= 2
        assert all(r is not None for r in store.get_many("reads", range(10)))
        deadline = time.monotonic() + 10
        while any(store.get_many("reads", range(10))) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert store.get_many("reads", range(10)) == [None] * 10
        store.register_view(V2)                           # expiry 0: never expires
        store.write("reads", [1], records(V2, 1))
        _, meta, _ = store.client.get((store.namespace, store._version("reads").set_name, 1))
        assert meta["ttl"] == 0xFFFFFFFF


def test_keys_are_stored_count_needs_no_scan_and_big_lookups_match(prefix):
    with open_store(url(prefix=prefix)) as store:
        store.register_view(V1)
        recs = records(V1, 3000)
        keys = np.arange(3000) * 7 - 9000
        store.write("reads", keys, recs)
        assert store.count("reads") == 3000
        listed = dict(store.items("reads"))
        assert sorted(listed) == sorted(keys.tolist())
        assert listed[int(keys[10])] == expected(V1, recs, 10)
        got = store.get_many("reads", keys[:2500])                   # several chunks
        assert got == [expected(V1, recs, i) for i in range(2500)]


def test_chunks_shrink_to_a_lowered_batch_max_requests(prefix):
    with open_store(url(prefix=prefix)) as store:
        limit = store.chunk_size

        def set_limit(n):
            store.client.info_all(f"set-config:context=service;batch-max-requests={n}")
        set_limit(500)
        try:
            store.register_view(V1)
            recs = records(V1, 1000)
            store.write("reads", np.arange(1000), recs)              # chunks of `limit` first
            assert store.chunk_size <= 500 < limit
            assert store.get_many("reads", range(1000)) == [expected(V1, recs, i)
                                                            for i in range(1000)]
            with open_store(url(prefix=prefix)) as fresh:
                assert fresh.chunk_size == 500                    # read from the server
        finally:
            set_limit(limit)


def test_open_errors_are_store_errors_and_a_wrong_namespace_is_not_retried():
    started = time.monotonic()
    with pytest.raises(StoreError, match="namespace 'nope' does not exist"):
        open_store(f"aerospike://{SERVER}/nope")
    assert time.monotonic() - started < 5
    with pytest.raises(StoreError, match="cannot connect"):
        open_store("aerospike://127.0.0.1:1/test")


def test_variable_types_read_back_as_written(prefix):
    from test_aerospike_store import TYPED_SCHEMA, typed_sample
    with open_store(url(prefix=prefix)) as store:
        store.register_view(TYPED_SCHEMA)
        recs, rows = typed_sample(40)
        store.write("typed", np.arange(40), recs)
        got = store.get_many("typed", range(40))
        assert [{n: g[n] for n, _ in TYPED_SCHEMA.features} for g in got] == rows


def restart_server():
    subprocess.run(RESTART, shell=True, check=True, timeout=120)


@needs_restart
def test_writes_outlast_a_server_restart_off_the_event_loop(prefix):
    """Writes keep going while the server restarts: each call retries within
    its budget in the store's threads while the event loop keeps ticking."""
    with open_store(url("bar", prefix=prefix)) as store:
        store.register_view(V1)
        batches = [(np.arange(i * 200, (i + 1) * 200), records(V1, 200, seed=i))
                   for i in range(60)]
        gaps = []

        async def main():
            async def tick():
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    gaps.append(time.monotonic() - last)
                    last = time.monotonic()
            ticker = asyncio.ensure_future(tick())
            restarter = asyncio.get_running_loop().run_in_executor(None, restart_server)
            for keys, recs in batches:
                await store.write_async("reads", keys, recs)
                await asyncio.sleep(0.05)
            await restarter
            ticker.cancel()
        asyncio.run(main())
        assert max(gaps) < 0.5                   # the loop never waited for a retry
        assert store.stats["retried"] > 0        # the restart was seen and waited out
        for keys, recs in batches:
            assert store.get_many("reads", keys) == [expected(V1, recs, i)
                                                     for i in range(len(keys))]


@needs_restart
def test_drops_and_truncations_survive_a_cold_restart(prefix):
    with open_store(url("bar", prefix=prefix)) as store:
        store.register_view(V1)
        store.write("reads", np.arange(100), records(V1, 100))
        store.register_view(ViewSchema("gone", 1, "int64", (("x", "int64"),)))
        store.write("gone", [1, 2], Records({"x": (np.arange(2), np.ones(2, bool))},
                                            [1, 1], 1, [INT64_MAX] * 2))
        store.truncate("reads")
        store.drop_view("gone")
        kept = records(V1, 10, seed=5)
        store.write("reads", np.arange(10), kept)
    restart_server()
    with open_store(url("bar", prefix=prefix)) as store:
        assert store.views() == ["reads"]
        got = store.get_many("reads", range(100))
        assert got[:10] == [expected(V1, kept, i) for i in range(10)]
        assert got[10:] == [None] * 90
        assert store.count("reads") == 10
        with pytest.raises(StoreError, match="unknown view"):
            store.get("gone", 1)


def test_commands_serve_from_aerospike_with_no_local_files(prefix, tmp_path):
    """tally get and tally lookup-server read the store URL; the server's
    working directory stays empty."""
    import json
    import re
    from tally.service.lookup.client import LookupClient
    store_url = url(prefix=prefix)
    with open_store(store_url) as store:
        store.register_view(V1)
        recs = records(V1, 100)
        store.write("reads", np.arange(100), recs)
    env = dict(os.environ, TALLY_TOKEN="", TALLY_STORE=store_url)
    got = subprocess.run([sys.executable, "-m", "tally", "get", "reads", "3", "500"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert [json.loads(line)["features"] for line in got.stdout.splitlines()] == \
        [expected(V1, recs, 3), None]
    server = subprocess.Popen([sys.executable, "-m", "tally", "lookup-server", "--port", "0",
                               "--http-port", "0"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"msgpack on [\d.]+:(\d+)", server.stdout.readline()).group(1))
        with LookupClient(port=port) as client:
            assert client.get_batch("reads", list(range(100))) == \
                [expected(V1, recs, i) for i in range(100)]
            with open_store(store_url) as store:                 # a promotion is followed
                store.register_view(V2)
                newer = records(V2, 100, seed=4)
                store.write("reads", np.arange(100), newer)
            deadline = time.monotonic() + 10
            while client.get("reads", 1)["_view_version"] != 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.get_batch("reads", list(range(100))) == \
                [expected(V2, newer, i) for i in range(100)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert list(tmp_path.iterdir()) == []
