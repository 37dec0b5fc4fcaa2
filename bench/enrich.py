"""Ingest with an enrichment join, against the same view without the join
(``python -m tally.bench enrich``).

The joined view is the talk's ``user_taste`` (``service/examples/recommend.py``):
each read joined with its article's category and length as of the read, then a
histogram of categories and the mean length per user. The view without the
join computes the same features from reads that already carry the article's
attributes (what a producer that enriched upstream would publish): the same
aggregations over the same values, so the difference between the two rates is
what the join costs -- the dimension feed reading the ``articles`` changelog,
waiting for it to be in sync before each batch, and the as-of lookups.

Both run the production partition workers (``Ingestion``, the path ``tally
serve`` runs) over a backlog on the same broker, in rounds whose order is
reversed every other round; each round uses new subscriptions and stores.
The last round's two stores are compared record by record for a sample of
users: the two ways must give the same values, or the figures are void.
"""
import argparse
import dataclasses
import statistics
import tempfile

import msgpack
import numpy as np

from tally.bench.ingest import BROKER_CONFIG, tally_rates
from tally.core.definitions import Source
from tally.service.examples import recommend as model
from tally.service.pulsar.client import connect
from tally.service.pulsar.local import LocalPulsar
from tally.service.pulsar.producer import EventProducer
from tally.service.quickstart import START_MS
from tally.service.store.lmdb import LmdbStore

CATEGORIES = ["news", "sports", "tech", "arts", "culture", "travel", "food", "science"]
DAY_MS = 86_400_000
READS, ENRICHED_READS, ARTICLES = "bench_reads", "bench_reads_enriched", "bench_articles"


def generate(n_events, n_users, n_articles, seed=11):
    """(article versions, reads) as numpy columns: every article published
    before the reads, 10% re-categorised while they happen; each read also
    carries its article's attributes as of its time (the oracle of the join)."""
    rng = np.random.default_rng(seed)
    first = {"article": np.arange(n_articles),
             "category": rng.integers(0, len(CATEGORIES), n_articles),
             "content_length": rng.integers(300, 9000, n_articles),
             "ts": START_MS + rng.integers(0, DAY_MS, n_articles)}
    changed = rng.choice(n_articles, n_articles // 10, replace=False)
    later = {"article": changed,
             "category": rng.integers(0, len(CATEGORIES), len(changed)),
             "content_length": first["content_length"][changed],
             "ts": START_MS + DAY_MS + rng.integers(1, DAY_MS, len(changed))}
    versions = {k: np.concatenate([first[k], later[k]]) for k in first}
    order = np.lexsort((versions["ts"], versions["article"]))
    versions = {k: v[order] for k, v in versions.items()}
    reads = {"user": (rng.zipf(1.3, n_events) - 1) % n_users,
             "article": rng.integers(0, n_articles, n_events),
             "readtime": np.round(rng.lognormal(3.0, 1.0, n_events), 3),
             "ts": START_MS + DAY_MS + np.sort(rng.integers(0, DAY_MS, n_events))}
    # the version of each read's article with the greatest time <= the read's
    at = np.searchsorted(versions["article"] * (4 * DAY_MS) + (versions["ts"] - START_MS),
                         reads["article"] * (4 * DAY_MS) + (reads["ts"] - START_MS),
                         side="right") - 1
    reads["category"] = versions["category"][at]
    reads["content_length"] = versions["content_length"][at]
    return versions, reads


def views():
    """(joined, without the join): ``user_taste`` on this bench's topics."""
    reads = dataclasses.replace(model.read_events, topic=READS)
    articles = dataclasses.replace(model.articles, topic=ARTICLES)
    joined = dataclasses.replace(model.user_taste, source=reads, joins=tuple(
        dataclasses.replace(j, dimension=articles) for j in model.user_taste.joins))
    enriched = Source("read_events_enriched", ENRICHED_READS,
                      {**dict(model.read_events.schema), "category": "string",
                       "content_length": "int64"})
    return joined, dataclasses.replace(model.user_taste, source=enriched, joins=())


def produce(client, topic, key, columns, fields):
    producer = EventProducer(client, topic, key)
    rows = zip(*(columns[f].tolist() for f in fields))
    for row in rows:
        event = dict(zip(fields, row))
        if "category" in event:
            event["category"] = CATEGORIES[event["category"]]
        producer.send_payload(msgpack.packb(event), event[key])
    producer.close()


def same_records(joined_dir, plain_dir, view_name, users):
    """The two stores' records of ``users``, feature by feature."""
    with LmdbStore(joined_dir) as a, LmdbStore(plain_dir) as b:
        got, want = a.get_many(view_name, users), b.get_many(view_name, users)
    features = ("categories", "avg_length")
    differing = [u for u, x, y in zip(users, got, want)
                 if (x is None) != (y is None) or
                 (x is not None and any(x[f] != y[f] for f in features))]
    return {"compared": len(users), "differing": len(differing), "examples": differing[:5]}


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench enrich")
    parser.add_argument("--events", type=int, default=200_000 if quick else 1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--articles", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2 if quick else 4)
    args = parser.parse_args(argv)
    versions, reads = generate(args.events, args.users, args.articles)
    joined, plain = views()
    rates = {"joined": [], "plain": []}
    with LocalPulsar(extra_config=BROKER_CONFIG) as broker, \
            tempfile.TemporaryDirectory() as store_dir:
        for topic, partitions in ((READS, 4), (ENRICHED_READS, 4), (ARTICLES, 2)):
            broker.create_partitioned_topic(topic, partitions)
        client = connect(broker.service_url)
        produce(client, ARTICLES, "article", versions, [n for n, _ in model.articles.schema])
        produce(client, READS, "user", reads, [n for n, _ in model.read_events.schema])
        produce(client, ENRICHED_READS, "user", reads, [n for n, _ in plain.source.schema])
        for round_ in range(args.rounds):
            order = ("joined", "plain") if round_ % 2 == 0 else ("plain", "joined")
            for side in order:
                view = joined if side == "joined" else plain
                figures = tally_rates(client, args.events, f"{store_dir}/{side}{round_}", view,
                                      subscription=f"bench-{side}-{round_}")
                assert figures["events"] == args.events, figures
                rates[side].append(figures)
        last = args.rounds - 1
        check = same_records(f"{store_dir}/joined{last}", f"{store_dir}/plain{last}",
                             joined.name, sorted(set(reads["user"][:5000].tolist())))
        client.close()
    return summary(args, rates, check)


def summary(args, rates, check):
    def figures(side, name):
        values = [round(r[name]) for r in rates[side]]
        return {"median": statistics.median(values), "runs": values}

    ratios = {name: [round(j[name] / p[name], 3) for j, p in zip(rates["joined"], rates["plain"])]
              for name in ("end_to_end", "steady", "events_per_cpu_s")}
    return {"benchmark": "enrich", "events": args.events, "users": args.users,
            "articles": args.articles, "rounds": args.rounds,
            "joined": {n: figures("joined", n) for n in ("end_to_end", "steady",
                                                          "events_per_cpu_s")},
            "plain": {n: figures("plain", n) for n in ("end_to_end", "steady",
                                                        "events_per_cpu_s")},
            "join_misses": [r["join_misses"] for r in rates["joined"]],
            "ratio_joined_to_plain": {n: {"median": statistics.median(v), "runs": v}
                                      for n, v in ratios.items()},
            "records_compared": check}
