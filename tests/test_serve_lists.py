"""``tally serve`` of a view with last_n and top_k (the README's
user_reading_7d, with a top_k beside its last_n) against a real broker: the
lists served online -- through LmdbStore, libtally and the lookup server --
equal a pandas recomputation over the events produced."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

from tally.service.pulsar.producer import EventProducer
from tally.service.store.lmdb import LmdbStore

pytestmark = pytest.mark.pulsar

DEFINITIONS = """
from tally.core.definitions import Entity, Feature, FeatureView, Source, Window

reads = Source("read_events", {topic!r},
               schema={{"user": "int64", "article": "int64", "readtime": "float64",
                        "ts": "int64"}}, timestamp_field="ts")
week = Window.sliding("7d", "1h")
user_reading_7d = FeatureView("user_reading_7d", Entity("user", "int64"), reads, features=[
    Feature("readtime_7d", "sum", "readtime", week, filter="readtime > 0"),
    Feature("reads_7d", "count", window=week, filter="readtime > 0"),
    Feature("recent_articles", "last_n", "article", week, filter="readtime > 0", n=10),
    Feature("top_articles", "top_k", "article", week, filter="readtime > 0", k=3),
    Feature("last_article", "last", "article"),
])
"""
N_USERS = 300
EVENTS_PER_USER = 40


def make_events(seed):
    """Events of the last hours, one distinct timestamp per event of a user
    (so "newest first" has one answer); at most 9 distinct articles per user,
    fewer than top_k's 4k counters, so its counts are exact."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    events = []
    for user in range(N_USERS):
        articles = rng.sample(range(10**6), 9)
        times = rng.sample(range(now - 3 * 3600_000, now), EVENTS_PER_USER)
        for ts in times:
            events.append({"user": user, "article": rng.choice(articles),
                           "readtime": rng.choice([0.0, 1.5, 30.0, 240.0]), "ts": ts})
    rng.shuffle(events)
    return events


def oracle(events):
    """Per user, from pandas: the features as the online record must hold them."""
    df = pd.DataFrame(events)
    kept = df[df.readtime > 0].sort_values("ts")
    expected = {}
    for user, group in df.sort_values("ts").groupby("user"):
        mine = kept[kept.user == user]
        counts = mine.article.value_counts().reset_index()
        counts.columns = ["article", "count"]
        top = counts.sort_values(["count", "article"], ascending=[False, True]).head(3)
        expected[int(user)] = {
            "reads_7d": len(mine),
            "recent_articles": [int(a) for a in mine.article.to_numpy()[::-1][:10]],
            "top_articles": [(int(a), int(c)) for a, c in zip(top.article, top["count"])],
            "last_article": int(group.article.iloc[-1]),
            "readtime_7d": float(mine.readtime.sum())}
    return expected


def test_serve_of_last_n_and_top_k_serves_lists_equal_to_pandas(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    pulsar_broker.create_partitioned_topic(topic_name, 2)
    definitions = tmp_path / "defs.py"
    definitions.write_text(textwrap.dedent(DEFINITIONS.format(topic=topic_name)))
    store_path = tmp_path / "store"
    seed = int(os.environ.get("TALLY_TEST_SEED", random.randrange(1 << 32)))
    print(f"TALLY_TEST_SEED={seed}")
    events = make_events(seed)
    expected = oracle(events)
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", str(definitions), "--pulsar",
         pulsar_broker.service_url, "--store", str(store_path), "--checkpoints",
         str(tmp_path / "ckpt"), "--checkpoint-interval", "0.5", "--metrics", "off"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        producer = EventProducer(pulsar_client, topic_name, "user")
        for event in events:
            producer.send(event)
        producer.close()
        users = sorted(expected)

        def served():
            if not (store_path / "data.mdb").exists():
                return None
            with LmdbStore(store_path, readonly=True) as store:
                if "user_reading_7d" not in store.views():
                    return None
                return store.get_many("user_reading_7d", users)

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            records = served()
            if records and all(r is not None and r["reads_7d"] == expected[u]["reads_7d"]
                               for u, r in zip(users, records)):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"not caught up in 120 s; see {log.name}")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]

    for user, record in zip(users, served()):
        want = expected[user]
        assert record["recent_articles"] == want["recent_articles"]
        assert record["top_articles"] == want["top_articles"]
        assert record["last_article"] == want["last_article"]
        assert all(type(a) is int for a in record["recent_articles"])
        np.testing.assert_allclose(record["readtime_7d"], want["readtime_7d"], rtol=1e-9)

    # the same through libtally and the lookup server (msgpack and HTTP/JSON)
    from tally.service.lookup.client import LookupClient
    from tally.service.lookup.server import serve_in_background
    from tally.service.store.embedded import EmbeddedReader
    with LmdbStore(store_path, readonly=True) as store:
        want = store.get_many("user_reading_7d", users)
    with EmbeddedReader(store_path) as reader:
        assert reader.get_many("user_reading_7d", users) == want
    with serve_in_background(store_path, port=0, http_port=0) as server:
        with LookupClient(port=server.port) as client:
            assert client.get_many("user_reading_7d", users, batch_size=100) == want
            types = client.views()["user_reading_7d"]["features"]
        assert types == {"readtime_7d": "float64", "reads_7d": "int64",
                         "recent_articles": "list<int64>", "top_articles": "top_k<int64>",
                         "last_article": "int64"}
