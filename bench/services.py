"""Feature-service lookups: a model's whole vector in one request, Tally
against Feast in the same run (``python -m tally.bench services``).

The vector: three views of two entities -- ``user_reading.total_readtime``
(a float per user), ``user_reading_7d.recent_articles`` (5 int64 article ids
per user) and ``article_stats.avg_length`` (a float per article) -- as in the
README's feature service. Rows are (user, article) pairs: 1 row (a
request-time lookup) and 100 rows (ranking candidates).

* ``tally``: ``LookupClient.service`` against ``tally lookup-server`` (a
  process of its own) over the embedded LMDB store, msgpack/TCP -- the path
  production runs;
* ``tally_aerospike`` (with ``--aerospike host:port``): the same server over
  Aerospike, the views read in one batch (``get_views_async``) in the
  store's thread pool; and ``raw_aerospike``, the official client's
  ``batch_read`` of the same records (one batch across the three sets), the
  floor Tally adds to -- in this process, so without the lookup server's
  TCP hop and protocol, which the ``tally`` row shows on its own;
* ``store_aerospike`` (with ``--aerospike``): in process, closed loop as
  ``bench/lookup.py``'s Aerospike client rows, interleaved rounds: the raw
  one-batch read (``raw``), Tally's store's ``get_views_async`` (``one_batch``)
  and one ``get_many_async`` per view gathered (``per_view``, what the lookup
  server did before); ratios raw lookups/s over Tally's (goal: at most 1.2);
* ``feast``: ``get_online_features`` with a FeatureService on Feast's Redis
  online store (Debian ``redis-server``), in its own venv
  (``--feast-python``; see ``bench/feast_redis.py``).

Every side is driven by the same open-loop driver (``bench/lookup.py``):
requests at a fixed rate (or half the back-to-back rate, if lower), latency
from each request's due time, median over ``--repeats`` runs. The ratios are
Feast's p99 over Tally's (the goal: at least 5) and Tally-on-Aerospike's
p99 over the raw client's (the goal: at most 1.2).
"""
import argparse
import tempfile
import uuid

import numpy as np

from tally.bench.feast_redis import feast_service
from tally.bench.lookup import (DEFAULT_FEAST_PYTHON, measure, repeated, start_lookup_server,
                                start_redis)
from tally.core.record import INT64_MAX, Records, ViewSchema
from tally.core.serving import ServedColumn, ServedService
from tally.service.store import open_store

SIZES = (1, 100)
VIEWS = {
    "user_reading": ViewSchema("user_reading", 1, "int64", (("total_readtime", "float64"),)),
    "user_reading_7d": ViewSchema("user_reading_7d", 1, "int64",
                                  (("recent_articles", "list<int64>"),)),
    "article_stats": ViewSchema("article_stats", 1, "int64", (("avg_length", "float64"),)),
}
ENTITY = {"user_reading": "user", "user_reading_7d": "user", "article_stats": "article"}
ENTITY_INDEX = {view: ("user", "article").index(entity) for view, entity in ENTITY.items()}
SERVICE = ServedService("recommend", 1, tuple(
    ServedColumn(feature, view, feature, ENTITY[view])
    for view, schema in VIEWS.items() for feature, _ in schema.features))


def make_data(n_users, n_articles, seed=7):
    rng = np.random.default_rng(seed)
    return {"total_readtime": (rng.random(n_users) * 1e4).round(3).tolist(),
            "recent_articles": rng.integers(0, n_articles, (n_users, 5)).tolist(),
            "avg_length": (rng.random(n_articles) * 3e3).round(1).tolist()}


def write_store(url, data):
    """The three views' records and the service, as ``tally serve`` writes them."""
    columns = {"total_readtime": np.array(data["total_readtime"]),
               "recent_articles": _objects(data["recent_articles"]),
               "avg_length": np.array(data["avg_length"])}
    with open_store(url) as store:
        for view, schema in VIEWS.items():
            (feature, _), = schema.features
            n = len(columns[feature])
            store.register_view(schema)
            for start in range(0, n, 50_000):
                part = slice(start, min(n, start + 50_000))
                count = part.stop - part.start
                store.write(view, np.arange(part.start, part.stop), Records(
                    {feature: (columns[feature][part], np.ones(count, bool))},
                    np.full(count, 1_700_000_000_000), 1_700_000_000_000,
                    np.full(count, INT64_MAX)))
        store.put_service(SERVICE.name, SERVICE.to_bytes())


def _objects(lists):
    column = np.empty(len(lists), dtype=object)
    column[:] = lists
    return column


def row_batches(n_users, n_articles, size, count, seed):
    rng = np.random.default_rng(seed)
    return [list(zip(rng.integers(0, n_users, size).tolist(),
                     rng.integers(0, n_articles, size).tolist())) for _ in range(count)]


def tally_figures(url, batches, args):
    from tally.service.lookup.client import LookupClient
    server, port, _ = start_lookup_server(url)
    try:
        with LookupClient(port=port) as client:
            def call(rows):
                return client.service("recommend", [{"user": u, "article": a}
                                                    for u, a in rows])
            sample = call(batches[1][0])[0]
            return sample, {size: repeated(lambda: measure(call, batches[size],
                                                           args.rates[size], args.seconds,
                                                           args.warmup), args.repeats)
                            for size in SIZES}
    finally:
        server.terminate()
        server.wait()


def raw_aerospike_figures(url, batches, args):
    """The official client's one batch_read across the three sets (all
    bins: each set holds one feature and the header bins)."""
    import aerospike
    with open_store(url) as store:
        sets = {view: store._version(view).set_name for view in VIEWS}
    host, port = args.aerospike.rsplit(":", 1)
    client = aerospike.client({"hosts": [(host, int(port))]}).connect()
    policy = {"concurrent": True, "total_timeout": 1000}

    def call(rows):
        keys = [("test", sets[view], key) for user, article in rows
                for view, key in (("user_reading", user), ("user_reading_7d", user),
                                  ("article_stats", article))]
        return client.batch_read(keys, None, policy).batch_records
    try:
        return {size: repeated(lambda: measure(call, batches[size], args.rates[size],
                                               args.seconds, args.warmup), args.repeats)
                for size in SIZES}
    finally:
        client.close()


def store_aerospike_figures(url, batches, args):
    """Closed-loop lookups/s of a 3-view vector (see the module docstring)."""
    import asyncio
    import concurrent.futures
    import aerospike
    from tally.bench.lookup import (AEROSPIKE_CONCURRENCY, closed_loop, median_run,
                                    spread)
    host, port = args.aerospike.rsplit(":", 1)
    client = aerospike.client({"hosts": [(host, int(port))]})
    pool = concurrent.futures.ThreadPoolExecutor(AEROSPIKE_CONCURRENCY)
    policy = {"concurrent": True, "total_timeout": 1000}
    with open_store(url, executor_workers=AEROSPIKE_CONCURRENCY) as store:
        sets = {view: store._version(view).set_name for view in VIEWS}

        def reads(rows):
            return {view: [row[ENTITY_INDEX[view]] for row in rows] for view in VIEWS}

        async def raw(rows):
            keys = [("test", sets[view], row[ENTITY_INDEX[view]]) for row in rows
                    for view in VIEWS]
            batch = await asyncio.get_running_loop().run_in_executor(
                pool, client.batch_read, keys, None, policy)
            return [r.record[2] if r.result == 0 else None for r in batch.batch_records]

        async def one_batch(rows):
            return await store.get_views_async(reads(rows))

        async def per_view(rows):
            wanted = reads(rows)
            return await asyncio.gather(*(store.get_many_async(view, keys)
                                          for view, keys in wanted.items()))
        calls = {"raw": raw, "one_batch": one_batch, "per_view": per_view}
        runs = {name: {size: [] for size in SIZES} for name in calls}
        try:
            for round_ in range(args.repeats):
                for name in (list(calls) if round_ % 2 == 0 else list(calls)[::-1]):
                    for size in SIZES:
                        runs[name][size].append(closed_loop(calls[name], batches[size],
                                                            args.seconds))
        finally:
            client.close()
            pool.shutdown()
    figures = {name: {size: median_run(rows) for size, rows in sizes.items()}
               for name, sizes in runs.items()}
    figures["raw_over"] = {name: {size: spread([r["per_s"] / t["per_s"] for r, t in
                                                zip(runs["raw"][size], runs[name][size])])
                                  for size in SIZES} for name in ("one_batch", "per_view")}
    return figures


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench services")
    parser.add_argument("--users", type=int, default=20_000 if quick else 200_000)
    parser.add_argument("--articles", type=int, default=5_000 if quick else 50_000)
    parser.add_argument("--seconds", type=float, default=3 if quick else 10)
    parser.add_argument("--warmup", type=float, default=1 if quick else 3)
    parser.add_argument("--repeats", type=int, default=1 if quick else 3)
    parser.add_argument("--feast-python", default=DEFAULT_FEAST_PYTHON,
                        help="python of a venv with feast[redis]; empty: skip Feast")
    parser.add_argument("--aerospike", help="host:port of an Aerospike server (namespace "
                        "test): adds Tally over Aerospike and the raw client")
    args = parser.parse_args(list(argv))
    args.rates = {1: 1000, 100: 100}
    data = make_data(args.users, args.articles)
    batches = {size: row_batches(args.users, args.articles, size, 2000, seed=size)
               for size in SIZES}
    figures = {}
    with tempfile.TemporaryDirectory(prefix="tally-bench-services-") as workdir:
        store = f"{workdir}/store"
        write_store(store, data)
        sample, figures["tally"] = tally_figures(store, batches, args)
        if args.aerospike:
            url = f"aerospike://{args.aerospike}/test?set_prefix=s{uuid.uuid4().hex[:6]}_"
            write_store(url, data)
            _, figures["tally_aerospike"] = tally_figures(url, batches, args)
            figures["raw_aerospike"] = raw_aerospike_figures(url, batches, args)
            figures["store_aerospike"] = store_aerospike_figures(url, batches, args)
        redis, _ = start_redis(workdir)
        try:
            figures["feast"] = feast_service(
                args.feast_python if redis else None, workdir,
                redis and int(redis.args[2]), data, batches, args.rates, args.seconds,
                args.warmup, args.repeats)
        finally:
            if redis:
                redis.terminate()
                redis.wait()
    result = {"benchmark": "services", "users": args.users, "articles": args.articles,
              "sample": sample, "figures": figures, "ratios": ratios(figures)}
    print_table(figures, result["ratios"])
    return result


def ratios(figures):
    def p99(side, size):
        row = figures.get(side, {}).get(size) or figures.get(side, {}).get(str(size))
        return row and row.get("p99_us")
    found = {}
    for size in SIZES:
        tally, feast = p99("tally", size), p99("feast", size)
        if tally and feast:
            found[f"feast_p99_over_tally_{size}"] = round(feast / tally, 1)
        on_aerospike, raw = p99("tally_aerospike", size), p99("raw_aerospike", size)
        if on_aerospike and raw:
            found[f"tally_aerospike_p99_over_raw_{size}"] = round(on_aerospike / raw, 2)
    return found


def print_table(figures, found):
    for side, rows in figures.items():
        if side == "store_aerospike":
            for name, sizes in rows.items():
                for size, row in sizes.items():
                    print(f"store_aerospike {name:10} {size:>4} rows  " + (
                        f"{row['per_s']:>7,} vectors/s  p50 {row['p50_us']} us"
                        if name != "raw_over" else f"raw/x lookups/s {row}"))
            continue
        if "skipped" in rows:
            print(f"{side:16} skipped: {rows['skipped']}")
            continue
        for size in SIZES:
            row = rows.get(size) or rows.get(str(size))
            if row:
                print(f"{side:16} {size:>4} rows  p50 {row['p50_us']:>8} us  p99 "
                      f"{row['p99_us']:>8} us  at {row['rate']}/s")
    for name, value in found.items():
        print(f"{name}: {value}")

