"""The lookup server (tally.service.lookup.server) and its clients, against
LmdbStore.get_many as the oracle.

A Python writer makes the store and computes the expected records, then
closes it; the server opens it through libtally in this process (LMDB allows
one open per process). Servers that need another configuration (a token), and
the writer of the concurrent-writes test, run in their own processes.
"""
import asyncio
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from tally.service.store.lmdb import LmdbStore
from tally.service.lookup.client import (AsyncLookupClient, LookupClient, LookupServerError,
                                         encode_frame)
from tally.core.record import INT64_MAX, INT64_MIN, Records, ViewSchema

CEXT = Path(__file__).resolve().parent.parent / "cext"
MAX_BATCH = 50
MAX_FRAME = 64 << 10
TOKEN = "s3cret-token"
USERS = ViewSchema("users", 2, "int64", (("n", "int64"), ("total", "float64"),
                                         ("avg", "float64")))
PAGES = ViewSchema("pages", 1, "string", (("visits", "int64"), ("score", "float64")))
READING = ViewSchema("reading", 1, "int64", (
    ("reads", "int64"), ("recent", "list<int64>"), ("titles", "list<string>"),
    ("top_tags", "top_k<string>"), ("top_ids", "top_k<int64>"), ("title", "string"),
    ("lengths", "list<float64>"), ("top_len", "top_k<float64>")))
WORDS = ["", "a", "größe", "🙂", "with,comma", 'quote"', "x" * 50]
META = ("_event_time", "_write_time", "_valid_until", "_view_version")


# ---- the store and the servers --------------------------------------------------

@pytest.fixture(scope="module")
def libtally():
    """The server reads through libtally: the one setup.py built, else
    cext/'s (as tests/test_cext.py does)."""
    from tally.service.store import embedded
    try:
        embedded.library_path()
    except ImportError:
        done = subprocess.run(["make", "-C", str(CEXT)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        os.environ["TALLY_LIBTALLY"] = str(CEXT / "build" / "libtally.so")


def random_value(dtype, rng):
    """A string, list or top_k value: empty lists too (no NaN)."""
    if dtype == "string":
        return WORDS[int(rng.integers(len(WORDS)))]
    count = int(rng.choice([0, 1, 5, 40]))
    item = dtype[dtype.index("<") + 1:-1]
    if item == "int64":
        items = rng.integers(INT64_MIN, INT64_MAX, size=count, endpoint=True).tolist()
    elif item == "float64":
        items = rng.normal(scale=1e6, size=count).tolist()
    else:
        items = [WORDS[i] for i in rng.integers(0, len(WORDS), size=count)]
    if dtype.startswith("list<"):
        return items
    return list(zip(items, sorted(rng.integers(1, 10**6, size=count).tolist(), reverse=True)))


def random_records(schema, n, rng):
    """Records with ~20% nulls and edge values (no NaN: it never equals itself)."""
    values = {}
    for name, dtype in schema.features:
        if dtype not in ("int64", "float64"):
            column = np.empty(n, dtype=object)
            column[:] = [random_value(dtype, rng) for _ in range(n)]
            values[name] = (column, rng.random(n) >= 0.2)
            continue
        if dtype == "int64":
            column = rng.integers(INT64_MIN, INT64_MAX, size=n, dtype=np.int64, endpoint=True)
            column[:2] = [INT64_MIN, INT64_MAX][:n]
        else:
            column = rng.normal(scale=1e6, size=n)
            column[:3] = [np.inf, -np.inf, -0.0][:n]
        values[name] = (column, rng.random(n) >= 0.2)
    event_time = rng.integers(0, 1 << 45, size=n)
    event_time[rng.random(n) < 0.2] = INT64_MIN
    valid_until = np.full(n, INT64_MAX)
    return Records(values, event_time, 1_700_000_000_000, valid_until)


@pytest.fixture(scope="module")
def store(tmp_path_factory, libtally):
    """A store with an int64-keyed and a string-keyed view, and the oracle:
    {view: {key: LmdbStore's record or None}} including absent keys."""
    seed = int(os.environ.get("TALLY_TEST_SEED", random.randrange(1 << 32)))
    print(f"TALLY_TEST_SEED={seed}")
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("store")
    int_keys = sorted({INT64_MIN, INT64_MAX, -1, 0, 1} |
                      {int(k) for k in rng.integers(-10**12, 10**12, size=300)})
    str_keys = ["a", "a b", "ключ", "🙂", "with/slash", "50%", "x" * 300] + \
        [f"page-{i}" for i in range(200)]
    oracle = {}
    with LmdbStore(path) as writer:
        for schema, keys in ((USERS, int_keys), (PAGES, str_keys), (READING, int_keys)):
            writer.register_view(schema)
            writer.write(schema.view, keys, random_records(schema, len(keys), rng))
        # ("" is absent too, but LmdbStore.get raises on it: see test_empty_string_key)
        absent = {"users": [2, 3, 10**15], "pages": ["nope", "A"], "reading": [2, 3]}
        for view, keys in (("users", int_keys), ("pages", str_keys), ("reading", int_keys)):
            every = keys + absent[view]
            oracle[view] = dict(zip(every, writer.get_many(view, every)))
    return path, oracle


@pytest.fixture(scope="module")
def server(store):
    from tally.service.lookup.server import serve_in_background
    with serve_in_background(store[0], port=0, http_port=0, max_batch=MAX_BATCH,
                             max_frame_bytes=MAX_FRAME, catalog_refresh=0.2) as running:
        yield running


@pytest.fixture(scope="module")
def oracle(store):
    return store[1]


@pytest.fixture
def client(server):
    with LookupClient(port=server.port) as connected:
        yield connected


class RawConnection:
    """A bare socket, to send frames (or bytes) the clients never would."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def send_payload(self, payload):
        self.send(len(payload).to_bytes(4, "big") + payload)

    def reply(self):
        header = self.file.read(4)
        if len(header) < 4:
            return None                     # the server closed the connection
        return msgpack.unpackb(self.file.read(int.from_bytes(header, "big")), raw=False)

    def close(self):
        self.file.close()
        self.sock.close()


# ---- lookups against the oracle ---------------------------------------------------

@pytest.mark.parametrize("view", ["users", "pages", "reading"])
def test_sync_client_matches_the_store(client, oracle, view):
    keys = list(oracle[view])
    assert [client.get(view, k) for k in keys[:40]] == [oracle[view][k] for k in keys[:40]]
    random.shuffle(keys)
    batch = keys[:MAX_BATCH]
    assert client.get_batch(view, batch) == [oracle[view][k] for k in batch]
    assert client.get_many(view, keys, batch_size=MAX_BATCH) == [oracle[view][k] for k in keys]
    assert client.get_batch(view, []) == []


def test_empty_string_key(client):
    """LMDB cannot store an empty key: libtally reports it absent (py-lmdb,
    under LmdbStore.get, raises BadValsizeError instead)."""
    assert client.get("pages", "") is None


def test_feature_subset(client, oracle):
    keys = list(oracle["users"])[:20]
    expected = [None if r is None else {f: r[f] for f in ("avg", "n") + META}
                for r in (oracle["users"][k] for k in keys)]
    assert client.get_batch("users", keys, features=["avg", "n"]) == expected
    assert list(client.get("users", keys[0], features=["avg", "n"])) == ["avg", "n", *META]


def test_views(client):
    assert client.views() == {
        "pages": {"key_type": "string", "version": 1,
                  "features": {"visits": "int64", "score": "float64"}},
        "reading": {"key_type": "int64", "version": 1, "features": dict(READING.features)},
        "users": {"key_type": "int64", "version": 2,
                  "features": {"n": "int64", "total": "float64", "avg": "float64"}}}


def test_async_client_matches_the_store(server, oracle):
    async def scenario():
        async with AsyncLookupClient(port=server.port) as client:
            keys = list(oracle["users"])
            singles = await asyncio.gather(*(client.get("users", k) for k in keys[:100]))
            assert singles == [oracle["users"][k] for k in keys[:100]]
            pages = list(oracle["pages"])
            assert await client.get_many("pages", pages, batch_size=7) == \
                [oracle["pages"][k] for k in pages]
            reading = list(oracle["reading"])
            assert await client.get_many("reading", reading, batch_size=9) == \
                [oracle["reading"][k] for k in reading]
            with pytest.raises(LookupServerError) as refused:
                await client.get("nope", 1)
            assert refused.value.code == "unknown_view"
            await client.ping()                 # still in step after the error
            assert "users" in await client.views()

    asyncio.run(scenario())


def test_pipelining_100_requests(server, client, oracle):
    keys = list(oracle["users"])[:100]
    raw = RawConnection(server.port)
    try:
        raw.send(b"".join(encode_frame({"id": 1000 + i, "op": "get", "view": "users",
                                        "keys": [k]}) for i, k in enumerate(keys)))
        replies = [raw.reply() for _ in keys]
    finally:
        raw.close()
    assert [r["id"] for r in replies] == [1000 + i for i in range(100)]
    assert [r["records"][0] for r in replies] == [oracle["users"][k] for k in keys]
    # The client: 100 requests of 3 keys, 32 in flight.
    many = list(oracle["users"])[:300]
    assert client.get_many("users", many, batch_size=3) == [oracle["users"][k] for k in many]


# ---- error frames: each answered, and the connection goes on ------------------------

def frame_of(message):
    return msgpack.packb(message)


ERROR_CASES = {
    "not msgpack": (b"\xc1", "bad_frame", None),
    "empty frame": (b"", "bad_frame", None),
    "trailing bytes": (frame_of({"id": 1, "op": "ping"}) + b"\x00", "bad_frame", None),
    "not a map": (frame_of([1, "get"]), "not_a_map", None),
    "no op": (frame_of({"id": 2}), "bad_request", 2),
    "id not an int": (frame_of({"id": "x", "op": "ping"}), "bad_request", None),
    "unknown op": (frame_of({"id": 3, "op": "put"}), "unknown_op", 3),
    "no keys": (frame_of({"id": 4, "op": "get", "view": "users"}), "bad_request", 4),
    "keys not an array": (frame_of({"id": 5, "op": "get", "view": "users", "keys": 1}),
                          "bad_request", 5),
    "unknown view": (frame_of({"id": 6, "op": "get", "view": "nope", "keys": [1]}),
                     "unknown_view", 6),
    "unknown feature": (frame_of({"id": 7, "op": "get", "view": "users", "keys": [1],
                                  "features": ["n", "nope"]}), "unknown_feature", 7),
    "features not an array": (frame_of({"id": 8, "op": "get", "view": "users", "keys": [1],
                                        "features": "n"}), "bad_request", 8),
    "string key, int view": (frame_of({"id": 9, "op": "get", "view": "users",
                                       "keys": ["1"]}), "bad_key", 9),
    "bool key": (frame_of({"id": 10, "op": "get", "view": "users", "keys": [True]}),
                 "bad_key", 10),
    "key beyond int64": (frame_of({"id": 11, "op": "get", "view": "users",
                                   "keys": [(1 << 64) - 1]}), "bad_key", 11),
    "int key, string view": (frame_of({"id": 12, "op": "get", "view": "pages",
                                       "keys": [1]}), "bad_key", 12),
    "batch too big": (frame_of({"id": 13, "op": "get", "view": "users",
                                "keys": list(range(MAX_BATCH + 1))}), "batch_too_big", 13),
    "frame too big": (frame_of({"id": 14, "op": "get", "view": "users",
                                "keys": [0] * (MAX_FRAME // 8)}) + b"\0" * MAX_FRAME,
                      "frame_too_big", None),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_frame_then_the_connection_goes_on(server, oracle, case):
    payload, code, request_id = ERROR_CASES[case]
    raw = RawConnection(server.port)
    try:
        raw.send_payload(payload)
        error = raw.reply()
        assert error["ok"] is False and error["error"]["code"] == code, error
        assert error["id"] == request_id and error["error"]["message"]
        raw.send(encode_frame({"id": 99, "op": "get", "view": "users", "keys": [0, 2]}))
        assert raw.reply() == {"id": 99, "ok": True,
                               "records": [oracle["users"][0], oracle["users"][2]]}
    finally:
        raw.close()


def test_garbage_length_closes_only_that_connection(server, client):
    raw = RawConnection(server.port)
    try:
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")       # HTTP on the msgpack port
        error = raw.reply()
        assert error["error"]["code"] == "frame_too_big"
        assert str(server.http_port) in error["error"]["message"]
        assert raw.reply() is None                            # closed
    finally:
        raw.close()
    client.ping()


def test_client_errors_carry_the_code(client):
    with pytest.raises(LookupServerError) as refused:
        client.get_batch("users", list(range(MAX_BATCH + 1)))
    assert isinstance(refused.value, LookupError)
    assert refused.value.code == "batch_too_big" and "limit is 50" in str(refused.value)
    # A pipeline reads every reply before raising, so the connection stays usable.
    with pytest.raises(LookupServerError, match="unknown_view"):
        client.pipeline([{"op": "ping"}, {"op": "get", "view": "nope", "keys": []},
                         {"op": "ping"}])
    client.ping()


# ---- HTTP -----------------------------------------------------------------------

def http_call(port, method, path, body=None, headers=None, connection=None):
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    payload = None if body is None else (body if isinstance(body, bytes)
                                         else json.dumps(body).encode())
    conn.request(method, path, body=payload, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    if connection is None:
        conn.close()
    return response, data


def json_call(port, method, path, body=None, headers=None):
    response, data = http_call(port, method, path, body, headers)
    return response.status, json.loads(data)


def test_http_get_and_post(server, oracle):
    port = server.http_port
    status, answer = json_call(port, "GET", "/v1/features/users/-1")
    assert status == 200 and answer == {"ok": True, "view": "users", "key": -1,
                                        "record": json_ready(oracle["users"][-1])}
    assert json_call(port, "GET", "/v1/features/users/3")[1]["record"] is None
    assert json_call(port, "GET", "/v1/features/pages/with%2Fslash")[1]["record"] == \
        json_ready(oracle["pages"]["with/slash"])
    subset = json_call(port, "GET", "/v1/features/users/0?features=n,avg")[1]["record"]
    assert list(subset) == ["n", "avg", *META]
    keys = list(oracle["pages"])[:MAX_BATCH]
    status, answer = json_call(port, "POST", "/v1/features/pages", {"keys": keys})
    assert status == 200 and answer["records"] == [json_ready(oracle["pages"][k]) for k in keys]
    _, answer = json_call(port, "POST", "/v1/features/users", {"keys": [0], "features": ["n"]})
    assert list(answer["records"][0]) == ["n", *META]
    assert json_call(port, "GET", "/v1/views")[1]["views"]["users"]["key_type"] == "int64"


def test_http_serves_strings_lists_and_top_k_as_json(server, oracle):
    """Lists as arrays, top_k as [[value, count], ...], in the store's order."""
    keys = list(oracle["reading"])[:MAX_BATCH]
    status, answer = json_call(server.http_port, "POST", "/v1/features/reading", {"keys": keys})
    assert status == 200
    for key, got in zip(keys, answer["records"]):
        want = oracle["reading"][key]
        if want is None:
            assert got is None
            continue
        for name, dtype in READING.features:
            if want[name] is not None and dtype.startswith("top_k"):
                assert got[name] == [[value, count] for value, count in want[name]]
            else:
                assert got[name] == want[name]
    some = next(k for k in keys if oracle["reading"][k] and oracle["reading"][k]["title"])
    record = json_call(server.http_port, "GET", f"/v1/features/reading/{some}")[1]["record"]
    assert record["title"] == oracle["reading"][some]["title"]


def json_ready(record):
    """The record as JSON carries it (json writes inf as Infinity and reads it back)."""
    return json.loads(json.dumps(record))


@pytest.mark.parametrize("method, path, body, status, code", [
    ("GET", "/v1/features/nope/1", None, 404, "unknown_view"),
    ("GET", "/v1/features/users/abc", None, 400, "bad_key"),
    ("GET", "/v1/features/users/1?features=nope", None, 400, "unknown_feature"),
    ("POST", "/v1/features/users", b"{not json", 400, "bad_request"),
    ("POST", "/v1/features/users", {"keys": "1"}, 400, "bad_request"),
    ("POST", "/v1/features/users", {"keys": ["1"]}, 400, "bad_key"),
    ("POST", "/v1/features/users", {"keys": list(range(MAX_BATCH + 1))}, 413, "batch_too_big"),
    ("GET", "/v2/anything", None, 404, "not_found"),
    ("POST", "/health", b"", 405, "method_not_allowed"),
    ("GET", "/v1/features/users", None, 405, "method_not_allowed"),
])
def test_http_errors(server, method, path, body, status, code):
    got, answer = json_call(server.http_port, method, path, body)
    assert (got, answer["ok"], answer["error"]["code"]) == (status, False, code)


def test_http_keep_alive_and_oversized_body(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    for key in range(5):                        # one connection, five requests
        response, _ = http_call(None, "GET", f"/v1/features/users/{key}", connection=conn)
        assert response.status == 200
    response, data = http_call(None, "POST", "/v1/features/users", b"x" * (MAX_FRAME + 1),
                               connection=conn)
    assert response.status == 413 and json.loads(data)["error"]["code"] == "frame_too_big"
    conn.close()


def test_health_and_metrics(server, client):
    client.get("users", 0)
    with pytest.raises(LookupServerError):
        client.get("nope", 0)
    status, health = json_call(server.http_port, "GET", "/health")
    assert status == 200 and health["ok"] and health["status"] == "serving"
    response, data = http_call(server.http_port, "GET", "/metrics")
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(data.decode())
    ok = ("tally_lookup_requests_total", (("op", "get"), ("status", "ok"), ("transport", "tcp")))
    assert samples[ok] >= 1
    assert samples[("tally_lookup_errors_total", (("code", "unknown_view"),
                                                  ("transport", "tcp")))] >= 1
    histogram = (("op", "get"), ("transport", "tcp"))
    inf = samples[("tally_lookup_request_duration_seconds_bucket", (("le", "+Inf"),) + histogram)]
    assert inf == samples[("tally_lookup_request_duration_seconds_count", histogram)] >= 1
    assert samples[("tally_lookup_connections", (("transport", "tcp"),))] >= 1


def parse_prometheus(text):
    """{(name, sorted label pairs): value}; fails on any line that is not
    a comment or a well-formed sample."""
    sample = re.compile(r'^([a-z_]+)(?:\{((?:[a-z_]+="[^"]*",?)*)\})? (\S+)$')
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = sample.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        labels = tuple(sorted(re.findall(r'([a-z_]+)="([^"]*)"', match.group(2) or "")))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


# ---- a token, on a server of its own (through the CLI) -----------------------------

@pytest.fixture(scope="module")
def token_server(store):
    """`tally lookup-server` in a subprocess, token from $TALLY_TOKEN."""
    command = [sys.executable, "-m", "tally.service.cli", "lookup-server", "--store",
               str(store[0]), "--port", "0", "--http-port", "0"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, TALLY_TOKEN=TOKEN))
    line = child.stdout.readline()
    match = re.search(r"msgpack on 127\.0\.0\.1:(\d+), HTTP on http://127\.0\.0\.1:(\d+)", line)
    if not match:
        child.kill()
        pytest.fail(f"the server did not start: {line!r} {child.stderr.read()}")
    assert "token required" in line
    yield child, int(match.group(1)), int(match.group(2))
    if child.poll() is None:
        child.kill()
        child.wait()


def test_token_on_tcp(token_server, oracle):
    _, port, _ = token_server
    with LookupClient(port=port) as anonymous:
        anonymous.ping()                        # liveness needs no token
        for attempt in ({"op": "get", "view": "users", "keys": [0]},
                        {"op": "views"}, {"op": "auth", "token": "wrong"},
                        {"op": "get", "view": "users", "keys": [0], "token": "wrong"}):
            with pytest.raises(LookupServerError) as refused:
                anonymous.request(attempt)
            assert refused.value.code == "unauthorized"
        assert anonymous.request({"op": "get", "view": "users", "keys": [0],
                                  "token": TOKEN})["records"] == [oracle["users"][0]]
        assert anonymous.get("users", 0) == oracle["users"][0]    # now authenticated
    with LookupClient(port=port, token=TOKEN) as authorized:
        assert authorized.get("users", -1) == oracle["users"][-1]
    with pytest.raises(LookupServerError, match="unauthorized"):
        LookupClient(port=port, token="wrong")

    async def async_clients():
        async with AsyncLookupClient(port=port, token=TOKEN) as client:
            assert await client.get("users", 1) == oracle["users"][1]
        with pytest.raises(LookupServerError, match="unauthorized"):
            await AsyncLookupClient.connect(port=port, token="wrong")

    asyncio.run(async_clients())


def test_token_on_http(token_server):
    _, _, port = token_server
    response, _ = http_call(port, "GET", "/v1/features/users/0")
    assert response.status == 401 and response.getheader("WWW-Authenticate").startswith("Bearer")
    wrong = {"Authorization": "Bearer nope"}
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert json_call(port, "GET", "/v1/features/users/0", headers=wrong)[0] == 401
    assert json_call(port, "POST", "/v1/features/users", {"keys": [0]})[0] == 401
    assert json_call(port, "GET", "/metrics")[0] == 401
    assert json_call(port, "GET", "/v1/features/users/0", headers=right)[0] == 200
    assert http_call(port, "GET", "/metrics", headers=right)[0].status == 200
    assert json_call(port, "GET", "/health")[0] == 200


def test_cli_server_stops_cleanly_on_sigterm(token_server):
    child = token_server[0]
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=10) == 0


# ---- reads while another process writes ------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from tally.service.store.lmdb import LmdbStore
    from tally.core.record import INT64_MAX, Records, ViewSchema
    schema = ViewSchema("live", 1, "int64", (("gen", "int64"), ("copy", "int64"),
                                             ("half", "float64")))
    keys = np.arange(200)
    valid = np.ones(200, dtype=bool)
    with LmdbStore(sys.argv[1]) as store:
        store.register_view(schema)
        generation, deadline = 0, time.monotonic() + float(sys.argv[2])
        while generation < 5 or time.monotonic() < deadline:
            generation += 1
            g = np.full(200, generation)
            # one write transaction per generation: a reader sees all or none of it
            store.write("live", keys, Records(
                {"gen": (g, valid), "copy": (g, valid), "half": (g / 2, valid)},
                g, 0, np.full(200, INT64_MAX)))
            if generation == 1:
                print("writing", flush=True)
    print(generation, flush=True)
""")


def test_reads_during_writes_by_another_process(store, server):
    """A view the server has never seen appears and is rewritten ~continually
    by another process; every batch read is one whole, consistent generation."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(store[0]), "1.5"],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    seen = []
    with LookupClient(port=server.port) as client:
        while writer.poll() is None:
            records = client.get_batch("live", list(range(MAX_BATCH)))
            generations = {r["gen"] for r in records}
            assert len(generations) == 1, "a batch mixed two write transactions"
            assert all(r["copy"] == r["gen"] and r["half"] == r["gen"] / 2 for r in records)
            seen.append(generations.pop())
        last = int(writer.stdout.read().split()[-1])
        assert writer.wait() == 0
        assert client.get("live", 199)["gen"] == last
    assert seen == sorted(seen) and len(seen) > 10 and seen[-1] > seen[0]
    print(f"{len(seen)} batches read across generations {seen[0]}..{seen[-1]} of {last}")


def test_server_in_the_writers_process(tmp_path, libtally):
    """A server beside its writer reads through the writer's own LmdbStore
    (LMDB allows one open per process), and sees each write at once."""
    from tally.service.lookup.server import serve_in_background
    rng = np.random.default_rng(5)
    with LmdbStore(tmp_path) as writer:
        writer.register_view(USERS)
        writer.write("users", [1, 2], random_records(USERS, 2, rng))
        with serve_in_background(writer, port=0, http_port=None) as running:
            assert running.http_port is None
            with LookupClient(port=running.port) as client:
                assert client.get_batch("users", [1, 2, 3]) == writer.get_many("users", [1, 2, 3])
                writer.write("users", [3], random_records(USERS, 1, rng))
                assert client.get("users", 3) == writer.get("users", 3) is not None
                writer.register_view(PAGES)
                assert client.get("pages", "a") is None
                assert sorted(client.views()) == ["pages", "users"]


PROMOTER = textwrap.dedent("""
    import sys
    import numpy as np
    from tally.service.store.lmdb import LmdbStore
    from tally.core.record import INT64_MAX, Records, ViewSchema
    version = int(sys.argv[2])
    names = ("a", "b")[:version]                  # version 2 adds feature "b"
    schema = ViewSchema("promoted", version, "int64", tuple((n, "int64") for n in names))
    values = {n: (np.full(3, 10 * version), np.ones(3, dtype=bool)) for n in names}
    with LmdbStore(sys.argv[1]) as store:
        store.register_view(schema, current=version == 1)
        store.write("promoted", [0, 1, 2], Records(
            values, np.zeros(3, dtype=np.int64), 0, np.full(3, INT64_MAX)), version=version)
        if version > 1:
            store.promote("promoted", version)
""")


def test_a_promoted_version_is_served(store, server):
    """libtally binds an open view to one version: the server must notice a
    promotion (catalog refresh) and reopen it."""
    def write(version):
        subprocess.run([sys.executable, "-c", PROMOTER, str(store[0]), str(version)],
                       check=True)

    write(1)
    with LookupClient(port=server.port) as client:
        assert client.get("promoted", 1) == {"a": 10, "_event_time": 0, "_write_time": 0,
                                             "_valid_until": None, "_view_version": 1}
        write(2)
        deadline = time.monotonic() + 10
        while client.get("promoted", 1)["_view_version"] == 1:
            assert time.monotonic() < deadline, "the promotion was never served"
            time.sleep(0.05)
        assert client.get("promoted", 1, features=["b"])["b"] == 20
        assert client.views()["promoted"]["features"] == {"a": "int64", "b": "int64"}


WIDE = textwrap.dedent("""
    import sys
    import numpy as np
    from tally.service.store.lmdb import LmdbStore
    from tally.core.record import INT64_MAX, Records, ViewSchema
    schema = ViewSchema("wide", 1, "int64", tuple((f"feature_{i:05d}_" + "x" * 40, "float64")
                                                  for i in range(int(sys.argv[2]))))
    values = {name: (np.full(2, float(i)), np.array([True, i % 7 != 0]))
              for i, (name, _) in enumerate(schema.features)}
    with LmdbStore(sys.argv[1]) as store:
        store.register_view(schema)
        store.write("wide", [1, 2], Records(values, np.zeros(2, dtype=np.int64), 0,
                                            np.full(2, INT64_MAX)))
""")


def test_a_view_with_thousands_of_features(store, server):
    """Its schema is ~110 KB: the catalog must hold it (the child process
    that once listed the views wrote each listing as one line of at most
    64 KiB) and lookups must answer every feature."""
    n = 2000
    subprocess.run([sys.executable, "-c", WIDE, str(store[0]), str(n)], check=True)
    name = "feature_{:05d}_".format
    with LookupClient(port=server.port) as client:
        first, second = client.get_batch("wide", [1, 2])       # a view new to the catalog
        assert len(first) == len(second) == n + len(META)
        assert first[name(7) + "x" * 40] == 7.0 and second[name(7) + "x" * 40] is None
        assert second[name(n - 1) + "x" * 40] == float(n - 1)
        features = client.views()["wide"]["features"]
        assert len(features) == n and set(features.values()) == {"float64"}
        subset = client.get("wide", 2, features=[name(1) + "x" * 40])
        assert subset == {name(1) + "x" * 40: 1.0, "_event_time": 0, "_write_time": 0,
                          "_valid_until": None, "_view_version": 1}


ORPHAN = textwrap.dedent("""
    import sys
    import lmdb
    from tally.core.record import ViewSchema
    from tally.service.store.lmdb import LmdbStore
    env = lmdb.open(sys.argv[1], max_dbs=10)
    with env.begin(write=True) as txn:     # a schema without its records' database
        schemas = env.open_db(b"__schemas__", txn=txn)
        txn.put(b"orphan", ViewSchema("orphan", 1, "int64", (("n", "int64"),)).to_bytes(),
                db=schemas)
    env.close()
    with LmdbStore(sys.argv[1]) as store:
        store.register_view(ViewSchema("after_orphan", 1, "int64", (("n", "int64"),)))
""")


def test_a_view_that_cannot_be_opened_leaves_the_others_served(store, server):
    """The periodic reload (not a lookup) must find a view created beside one
    it cannot open."""
    subprocess.run([sys.executable, "-c", ORPHAN, str(store[0])], check=True)
    with LookupClient(port=server.port) as client:
        deadline = time.monotonic() + 10
        while "after_orphan" not in client.views():
            assert time.monotonic() < deadline, "the catalog never reloaded"
            time.sleep(0.05)
        views = client.views()
        assert "orphan" not in views and {"users", "pages"} <= set(views)
        with pytest.raises(LookupServerError) as refused:
            client.get("orphan", 1)
        assert refused.value.code == "unknown_view"
        assert client.get("users", 0) == store[1]["users"][0]


# ---- names no view can have: refused before the store is asked -------------------

def small_store(path, *schemas):
    """A store of its own (with one record, key 1, per view), for a server
    of its own: a second open of the module's store in this process would
    break LMDB's locks."""
    rng = np.random.default_rng(3)
    with LmdbStore(path) as writer:
        for schema in schemas:
            writer.register_view(schema)
            writer.write(schema.view, [1], random_records(schema, 1, rng))
    return path


class Counted:
    """Wraps a method of an object and counts its calls."""

    def __init__(self, owner, name):
        self.calls, self.method = 0, getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args):
        self.calls += 1
        return self.method(*args)


def pipelined_codes(port, requests):
    """Send every request at once, then read every reply: {error code or "ok": count}."""
    raw = RawConnection(port)
    try:
        raw.send(b"".join(encode_frame(dict(r, id=i)) for i, r in enumerate(requests)))
        replies = [raw.reply() for _ in requests]
    finally:
        raw.close()
    assert [r["id"] for r in replies] == list(range(len(requests)))
    codes = {}
    for reply in replies:
        code = "ok" if reply["ok"] else reply["error"]["code"]
        codes[code] = codes.get(code, 0) + 1
    return codes


def test_names_no_view_can_have_never_reach_the_store(tmp_path, libtally):
    """"users\\0<n>" once passed libtally's C-string check as "users": each
    such name was cached as a new view handle and triggered a catalog reload
    (a hostile client grew the server by 58 MB and cut its throughput 7x)."""
    from tally.service.lookup.server import serve_in_background
    from tally.service.lookup.protocol import MAX_VIEW_NAME_LENGTH
    from tally.core.definitions import MAX_NAME_LENGTH
    assert MAX_VIEW_NAME_LENGTH == MAX_NAME_LENGTH          # the definitions' limit
    small_store(tmp_path, USERS)
    with serve_in_background(tmp_path, port=0, http_port=0, catalog_refresh=0.2) as running:
        reloads = Counted(running.store, "load_schemas")
        probes = Counted(running.store, "has_view")
        handles = len(running.store.reader._views)
        bad = ([{"op": "get", "view": f"users\0{i}", "keys": [1]} for i in range(1500)] +
               [{"op": "get", "view": "", "keys": [1]},
                {"op": "get", "view": "u" * (MAX_NAME_LENGTH + 1), "keys": [1]},
                {"op": "get", "view": "x" * 100_000, "keys": [1]}])
        assert pipelined_codes(running.port, bad) == {"unknown_view": len(bad)}
        assert (reloads.calls, probes.calls) == (0, 0)
        # names that could be views but are not: no handle kept, no reload
        unknown = [{"op": "get", "view": f"nope_{i}", "keys": [1]} for i in range(1500)]
        assert pipelined_codes(running.port, unknown) == {"unknown_view": len(unknown)}
        assert reloads.calls == 0
        assert len(running.store.reader._views) == handles
        for path in ("/v1/features/users%00x/1", f"/v1/features/{'u' * 49}/1"):
            status, answer = json_call(running.http_port, "GET", path)
            assert (status, answer["error"]["code"]) == (404, "unknown_view"), path
        assert "users" in json_call(running.http_port, "GET", "/v1/features/users%00x/1")[1][
            "error"]["message"]                          # the known views are listed
        with LookupClient(port=running.port) as client:
            assert client.get("users", 1) is not None


def test_a_view_outside_the_listing_reloads_the_catalog_at_most_once_per_refresh(
        tmp_path, libtally):
    """A name libtally opens but never lists (it holds "@v", as version
    entries do) is not in the catalog however often it is reloaded: asking
    for it must not reload per request."""
    from tally.service.lookup.server import serve_in_background
    hidden = ViewSchema("odd@vx", 1, "int64", (("n", "int64"),))
    small_store(tmp_path, USERS, hidden)
    with serve_in_background(tmp_path, port=0, http_port=0, catalog_refresh=0.2) as running:
        reloads = Counted(running.store, "load_schemas")
        started = time.monotonic()
        requests = [{"op": "get", "view": "odd@vx", "keys": [1]}] * 2000
        assert pipelined_codes(running.port, requests) == {"unknown_view": 2000}
        elapsed = time.monotonic() - started
        # the periodic reload plus at most one per refresh interval for the misses
        assert reloads.calls <= 2 * (elapsed / 0.2 + 1) + 1, (reloads.calls, elapsed)
        assert len(running.store.reader._views) <= 2


def test_a_view_created_after_start_is_served_at_once(tmp_path, libtally):
    """The bound on reloads must not delay a view that really is new."""
    from tally.service.lookup.server import serve_in_background
    small_store(tmp_path, USERS)
    with serve_in_background(tmp_path, port=0, http_port=0, catalog_refresh=60) as running:
        with LookupClient(port=running.port) as client:
            with pytest.raises(LookupServerError, match="unknown_view"):
                client.get("pages", "a")
            subprocess.run([sys.executable, "-c", WIDE_VIEW, str(tmp_path), "pages", "3"],
                           check=True)
            assert client.get("pages", 1)["_view_version"] == 1


# ---- wide views -------------------------------------------------------------------

WIDE_VIEW = textwrap.dedent("""
    import sys
    import numpy as np
    from tally.service.store.lmdb import LmdbStore
    from tally.core.record import INT64_MAX, Records, ViewSchema
    view, n = sys.argv[2], int(sys.argv[3])
    schema = ViewSchema(view, 1, "int64", tuple((f"feature_{i:05d}_" + "x" * 40, "float64")
                                                for i in range(n)))
    values = {name: (np.full(2, float(i)), np.array([True, i % 7 != 0]))
              for i, (name, _) in enumerate(schema.features)}
    with LmdbStore(sys.argv[1]) as store:
        store.register_view(schema)
        store.write(view, [1, 2], Records(values, np.zeros(2, dtype=np.int64), 0,
                                          np.full(2, INT64_MAX)))
""")


def check_wide(running, view, n):
    name = "feature_{:05d}_".format
    last = name(n - 1) + "x" * 40
    with LookupClient(port=running.port) as client:
        first, second = client.get_batch(view, [1, 2])
        assert len(first) == len(second) == n + len(META)
        assert first[name(7) + "x" * 40] == 7.0 and second[name(7) + "x" * 40] is None
        assert second[last] == float(n - 1)
        features = client.views()[view]["features"]
        assert len(features) == n and set(features.values()) == {"float64"}
        assert client.get(view, 2, features=[last])[last] == float(n - 1)
        with pytest.raises(LookupServerError) as refused:
            client.get(view, 2, features=["nope"])
        assert refused.value.code == "unknown_feature" and len(refused.value.message) < 2000
    status, answer = json_call(running.http_port, "GET", f"/v1/features/{view}/1")
    assert status == 200 and len(answer["record"]) == n + len(META)


def test_a_view_of_10000_features_at_start_and_added_later(tmp_path, libtally):
    """The schema helper that once listed the views broke at 10,000 features
    (a 560 KB schema): both the catalog's first load and a view the catalog
    finds later must hold one."""
    from tally.service.lookup.server import serve_in_background
    n = 10_000
    subprocess.run([sys.executable, "-c", WIDE_VIEW, str(tmp_path), "wide_at_start", str(n)],
                   check=True)
    with serve_in_background(tmp_path, port=0, http_port=0, catalog_refresh=0.2) as running:
        assert len(running.service.catalog.schemas["wide_at_start"].features) == n
        check_wide(running, "wide_at_start", n)
        subprocess.run([sys.executable, "-c", WIDE_VIEW, str(tmp_path), "wide_later", str(n)],
                       check=True)
        check_wide(running, "wide_later", n)                    # found by the lookup
        assert {"wide_at_start", "wide_later"} <= set(running.service.catalog.schemas)


# ---- HTTP: what Python's int() and json accept, and HTTP must not ------------------

def raw_http(port, request):
    """Send raw request bytes; -> (status, JSON body) of the one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def post_with_headers(headers, body=b'{"keys": [0]}'):
    return (b"POST /v1/features/users HTTP/1.1\r\nHost: x\r\n" +
            b"".join(h.encode() + b"\r\n" for h in headers) + b"\r\n" + body)


def test_http_content_length_is_digits_only_and_said_once(server, oracle):
    port = server.http_port
    status, answer = raw_http(port, post_with_headers(["Content-Length: 13"]))
    assert status == 200 and answer["records"] == [json_ready(oracle["users"][0])]
    for headers in (["Content-Length: +13"], ["Content-Length: 1_3"], ["Content-Length: ١٣"],
                    ["Content-Length: 13, 13"], ["Content-Length: 0x0d"],
                    ["Content-Length: 13", "Content-Length: 13"],
                    ["Content-Length: 13", "content-length: 0"]):
        status, answer = raw_http(port, post_with_headers(headers))
        assert (status, answer["error"]["code"]) == (400, "bad_request"), headers


@pytest.mark.parametrize("body", [b"[" * 60_000, b'{"keys": ' + b"[" * 60_000,
                                  b'{"keys": ' + b"[" * 900 + b"]" * 900 + b"}"],
                         ids=["nested", "nested keys", "nested 900 deep"])
def test_http_deeply_nested_json_is_a_bad_request(server, body):
    """json.loads raises RecursionError (no ValueError) past ~1000 levels."""
    got, answer = json_call(server.http_port, "POST", "/v1/features/users", body)
    assert got == 400 and answer["error"]["code"] in ("bad_request", "bad_key"), answer
    assert json_call(server.http_port, "GET", "/health")[0] == 200


def test_http_a_lone_surrogate_key_is_a_bad_key(server):
    """JSON can spell a string that UTF-8 cannot encode ("\\ud800")."""
    for body in (b'{"keys": ["\\ud800"]}', b'{"keys": ["ok", "a\\udfffb"]}'):
        status, answer = json_call(server.http_port, "POST", "/v1/features/pages", body)
        assert (status, answer["error"]["code"]) == (400, "bad_key"), answer


@pytest.mark.parametrize("key", ["4_2", "+42", "%D9%A4%D9%A2", "%EF%BC%94%EF%BC%92", "%2042",
                                 "42%20", "42%0A", "--42", "4%C2%B2", "9223372036854775808",
                                 "-9223372036854775809", "1" * 5000])
def test_http_int64_keys_in_the_path_are_ascii_digits(server, key):
    """int() takes '4_2', '+42', Arabic-Indic and fullwidth digits and
    surrounding spaces; a key in the path is -?[0-9]+, within int64."""
    status, answer = json_call(server.http_port, "GET", f"/v1/features/users/{key}")
    assert (status, answer["error"]["code"]) == (400, "bad_key"), answer


def test_http_int64_keys_at_the_edges(server, oracle):
    for key in (INT64_MIN, INT64_MAX, 0, -1):
        status, answer = json_call(server.http_port, "GET", f"/v1/features/users/{key}")
        assert status == 200 and answer["key"] == key
        assert answer["record"] == json_ready(oracle["users"][key])
    assert json_call(server.http_port, "GET", "/v1/features/users/007")[1]["key"] == 7


# ---- idle connections and the connection cap -------------------------------------

DROPPED = "tally_lookup_connections_dropped_total"


def dropped(http_port, transport, reason):
    _, data = http_call(http_port, "GET", "/metrics")
    samples = parse_prometheus(data.decode())
    return samples[(DROPPED, (("reason", reason), ("transport", transport)))]


def wait_closed(sock, at_most=5.0):
    """Wait until the server closes ``sock``, reading and dropping any bytes."""
    sock.settimeout(at_most)
    while sock.recv(1 << 16):
        pass


def test_idle_connections_are_closed(tmp_path, libtally):
    from tally.service.lookup.server import serve_in_background
    small_store(tmp_path, USERS)
    with serve_in_background(tmp_path, port=0, http_port=0, idle_timeout=0.3) as running:
        with LookupClient(port=running.port) as busy:      # a request every 0.1 s: kept
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                busy.ping()
                time.sleep(0.1)
            time.sleep(0.6)
            with pytest.raises(ConnectionError):
                busy.ping()
        opened = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", running.port))
        half_frame = socket.create_connection(("127.0.0.1", running.port))
        half_frame.sendall(b"\0\0")                        # a header cut short
        http_silent = socket.create_connection(("127.0.0.1", running.http_port))
        slow_head = socket.create_connection(("127.0.0.1", running.http_port))
        slow_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        keep_alive = http.client.HTTPConnection("127.0.0.1", running.http_port, timeout=10)
        assert http_call(None, "GET", "/health", connection=keep_alive)[0].status == 200
        for sock in (silent, half_frame, http_silent, slow_head, keep_alive.sock):
            wait_closed(sock)
            assert 0.25 <= time.monotonic() - opened <= 3.0
            sock.close()
        assert dropped(running.http_port, "tcp", "idle_timeout") == 3
        assert dropped(running.http_port, "http", "idle_timeout") == 3


def test_connections_over_the_cap_are_refused(tmp_path, libtally):
    from tally.service.lookup.server import serve_in_background
    small_store(tmp_path, USERS)
    with serve_in_background(tmp_path, port=0, http_port=0, max_connections=2) as running:
        first, second = LookupClient(port=running.port), LookupClient(port=running.port)
        first.ping(), second.ping()
        raw = RawConnection(running.port)                  # refused before it says a word
        error = raw.reply()
        assert error["ok"] is False and error["id"] is None
        assert error["error"]["code"] == "too_many_connections"
        assert "max_connections=2" in error["error"]["message"]
        assert raw.reply() is None
        raw.close()
        with LookupClient(port=running.port) as refused:
            with pytest.raises(LookupServerError, match="too_many_connections"):
                refused.ping()                             # refused after its request
        # HTTP has its own cap: two open, the third answered 503
        held = [http.client.HTTPConnection("127.0.0.1", running.http_port, timeout=10)
                for _ in range(2)]
        for conn in held:
            assert http_call(None, "GET", "/health", connection=conn)[0].status == 200
        status, answer = json_call(running.http_port, "GET", "/health")
        assert (status, answer["error"]["code"]) == (503, "too_many_connections")
        held.pop().close()
        first.close()
        deadline = time.monotonic() + 5
        while True:                                         # once the server saw the close
            try:
                with LookupClient(port=running.port) as again:
                    again.ping()
                if json_call(running.http_port, "GET", "/health")[0] == 200:
                    break
            except LookupServerError:
                pass
            assert time.monotonic() < deadline, "a closed connection never freed its place"
            time.sleep(0.05)
        assert second.get("users", 1) is not None           # the others were left alone
        assert dropped(running.http_port, "tcp", "too_many_connections") >= 2
        assert dropped(running.http_port, "http", "too_many_connections") >= 1
        second.close()
        held[0].close()


def test_cli_sets_the_idle_timeout_and_the_connection_cap(store):
    command = [sys.executable, "-m", "tally.service.cli", "lookup-server", "--store",
               str(store[0]), "--port", "0", "--http-port", "0", "--idle-timeout", "0.5",
               "--max-connections", "1"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, TALLY_TOKEN=""))
    try:
        line = child.stdout.readline()
        port = int(re.search(r"msgpack on 127\.0\.0\.1:(\d+)", line).group(1))
        with LookupClient(port=port) as client, LookupClient(port=port) as refused:
            client.ping()
            pinged = time.monotonic()
            with pytest.raises(LookupServerError, match="too_many_connections"):
                refused.ping()
            wait_closed(client._conn.sock)
            assert 0.45 <= time.monotonic() - pinged <= 3.0
    finally:
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=10)
    assert child.returncode == 0


def test_replies_decode_top_k_pairs_as_tuples_in_every_layout():
    """A top_k value is an array of [value, count] arrays on the wire and
    tuples in Python, in records, in vectors and in columns; a column of
    last_n lists (arrays of arrays too, one per row) stays lists."""
    from tally.service.lookup.client import decode_reply
    top = [("news", 3), ("arts", 1)]
    record = {"recent": [7, 3], "top": top, "reads": 2}
    reply = decode_reply(msgpack.packb({"id": 1, "ok": True, "records": [record, None]}))
    assert reply["records"] == [record, None] and reply["records"][0]["top"] == top
    assert type(reply["records"][0]["top"][0]) is tuple
    reply = decode_reply(msgpack.packb({"id": 2, "ok": True, "columns": {
        "recent": [[7, 3], None, [], [1]], "top": [None, [], top, top[:1]],
        "reads": [2, None, 0, 1]}}))
    columns = reply["columns"]
    assert columns["recent"] == [[7, 3], None, [], [1]]
    assert all(type(v) is list for v in columns["recent"] if v is not None)
    assert columns["top"] == [None, [], top, top[:1]]
    assert type(columns["top"][2][0]) is tuple and columns["reads"] == [2, None, 0, 1]
