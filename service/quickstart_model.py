"""``tally quickstart --model recommend``: the talk's model end to end.

A local broker; an ``articles`` changelog (articles published over a day,
some re-categorised later) and reading events; the example's three views
(``tally.service.examples.recommend``) computed by the production partition
workers, the reads joined with their article as of the read; the feature
service's vector for (user, current article) rows; and a training set for a
spine of (user, current article, time, clicked) rows, from the same topics
and the same definitions.
"""
import functools
import tempfile
import time

import numpy as np

from tally.service.examples import recommend as model
from tally.service.quickstart import START_MS

CATEGORIES = ["news", "sports", "tech", "arts", "culture", "travel", "food", "science"]
DAY_MS = 86_400_000


def generate(n_events, n_users, n_articles, seed=3):
    """(article rows, read events) as lists of dicts, each in time order:
    articles appear through the day, 10% are re-categorised later; users
    (Zipf) read recent articles, each user mostly from two favourite
    categories."""
    rng = np.random.default_rng(seed)
    published = START_MS + np.sort(rng.integers(0, DAY_MS // 2, n_articles))
    category = rng.integers(0, len(CATEGORIES), n_articles)
    articles = [{"article": a, "category": CATEGORIES[category[a]],
                 "content_length": int(rng.integers(300, 9000)), "ts": int(published[a])}
                for a in range(n_articles)]
    for a in rng.choice(n_articles, n_articles // 10, replace=False):
        articles.append({**articles[a], "category": CATEGORIES[rng.integers(len(CATEGORIES))],
                         "ts": int(published[a] + rng.integers(1, DAY_MS // 2))})
    articles.sort(key=lambda row: row["ts"])
    by_category = {c: np.flatnonzero(category == c) for c in range(len(CATEGORIES))}
    favourites = rng.integers(0, len(CATEGORIES), (n_users, 2))
    users = (rng.zipf(1.3, n_events) - 1) % n_users
    times = START_MS + DAY_MS // 2 + np.sort(rng.integers(0, DAY_MS // 2, n_events))
    reads = []
    for user, t in zip(users.tolist(), times.tolist()):
        c = favourites[user][rng.integers(2)] if rng.random() < 0.8 else \
            rng.integers(len(CATEGORIES))
        pool = by_category[int(c)]
        article = int(pool[rng.integers(len(pool))]) if len(pool) else int(rng.integers(n_articles))
        reads.append({"user": user, "article": article,
                      "readtime": float(np.round(rng.lognormal(3.0, 1.0), 3)), "ts": t})
    return articles, reads


def run(n_events=200_000, n_users=10_000, n_articles=5_000, n_partitions=4, store_path=None,
        out=None):
    from tally.core.serving import ServedService
    from tally.service.ingest.run import Ingestion
    from tally.service.ingest.service import publish_services
    from tally.service.progress import advance, progress_bar, until_read
    from tally.service.pulsar.client import connect
    from tally.service.pulsar.local import LocalPulsar
    from tally.service.pulsar.producer import EventProducer
    from tally.service.store.lmdb import LmdbStore
    from tally.service.training import PulsarTopic, training_set

    store_path = store_path or tempfile.mkdtemp(prefix="tally-store-")
    views = [model.user_history, model.user_taste, model.article_info]
    print("Starting a local Apache Pulsar broker (first run downloads it from Maven Central)...")
    with LocalPulsar() as broker:
        print(f"  broker ready in {broker.startup_seconds:.1f} s at {broker.service_url}")
        broker.create_partitioned_topic(model.read_events.topic, n_partitions)
        broker.create_partitioned_topic(model.articles.topic, 2)
        client = connect(broker.service_url)
        articles, reads = generate(n_events, n_users, n_articles)
        t0 = time.monotonic()
        for source, key, rows in ((model.articles, "article", articles),
                                  (model.read_events, "user", reads)):
            producer = EventProducer(client, source.topic, key, routing=source.routing)
            for row in progress_bar("events", rows, desc=f"produce {source.name}"):
                producer.send(row)
            producer.close()
        print(f"Produced {len(articles):,} article rows and {len(reads):,} reads in "
              f"{time.monotonic() - t0:.1f} s")

        store = LmdbStore(store_path)
        for view in views:
            expected = len(articles) if view.source is model.articles else len(reads)
            with Ingestion(view, client, store, subscription=f"tally-{view.name}") as job, \
                    progress_bar("events", desc=view.name) as bar:
                job.run(until=until_read(bar, expected), idle_timeout_s=30)
                summary = job.stats.summary()
            print(f"  {view.name}: {summary['events']:,} events in {summary['seconds']} s"
                  + (f" (joined with {model.articles.name}; {job.stats.join_misses} without "
                     "an article row)" if view.joins else ""))
        publish_services(store, [(model.recommend, 1)], {v.name: v for v in views})
        served = ServedService.from_bytes("recommend", store.service("recommend"))
        rng = np.random.default_rng(5)
        rows = [{"user": int(u), "article": int(a)} for u, a in
                zip(rng.integers(0, 20, 3), rng.integers(0, n_articles, 3))]
        print("The model's vector for (user, current article):  tally get --service "
              f"recommend user=U article=A --store {store_path}")
        for row, vector in zip(rows, served.read(store, rows)):
            print(f"  {row} -> {_rounded(vector)}")

        end = reads[-1]["ts"]
        spine = _spine(reads, n_articles, end, rng)
        with progress_bar("rows", desc="training set") as bar:
            table = training_set(spine, service=model.recommend, views=views,
                                 pulsar=PulsarTopic(client),
                                 progress=functools.partial(advance, bar))
        client.close()
    out = out or tempfile.mktemp(prefix="tally-recommend-", suffix=".parquet")
    import pyarrow.parquet as pq
    pq.write_table(table, out)
    print(f"Training set: {table.num_rows:,} rows x {table.num_columns} columns "
          f"(point in time: each row's features as of its ts) -> {out}")
    for row in table.slice(0, 3).to_pylist():
        print(f"  {_rounded(row)}")
    store.close()
    return table


def _spine(reads, n_articles, end, rng, n=2_000):
    """Columns (user, current article, ts, clicked): reads that happened
    (clicked) and random articles shown at the same moments (not clicked)."""
    picked = rng.choice(len(reads), n // 2, replace=False)
    users = np.array([reads[i]["user"] for i in picked])
    articles = np.array([reads[i]["article"] for i in picked])
    ts = np.array([reads[i]["ts"] - 1 for i in picked])
    shown = np.array([int(rng.integers(n_articles)) for _ in picked])
    return {"user": np.concatenate([users, users]),
            "article": np.concatenate([articles, shown]),
            "ts": np.concatenate([ts, ts]),
            "clicked": np.repeat([1, 0], len(picked))}


def _rounded(vector):
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in vector.items()}
