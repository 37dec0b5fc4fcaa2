"""Feature-service lookups: a model's whole vector in one request, Tally
against Feast in the same run (``python -m tally.bench services [--model
recommend]``).

Two models (``--model``):

* ``readme`` (the default): three views of two entities --
  ``user_reading.total_readtime`` (a float per user),
  ``user_reading_7d.recent_articles`` (5 int64 article ids per user) and
  ``article_stats.avg_length`` (a float per article) -- as in the README's
  feature service, random values; rows are random (user, article) pairs;
* ``recommend``: the talk's model (``tally.service.examples.recommend``):
  the example's three views folded from ``quickstart_model.generate``'s
  reads and articles changelog (the reads joined with their article as of
  the read) and written as the bootstrap writes them (``records_for``, one
  write per view), its feature service published as ``tally serve`` does,
  with its request-time columns (``current_article``, ``in_top_category``,
  ``just_read``) computed by the lookup server. Rows are one active user and
  1 or 100 distinct candidate articles (ranking the candidates). Feast gets
  the same stored values (Tally's records read back: ``top_category`` and
  ``reading_diversity`` as stored features, as Tally derives them when it
  writes) and an on-demand feature view for the request-time columns.

The sides, for 1 row (a request-time lookup) and 100 (ranking candidates):

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
import math
import tempfile
import time
import uuid

import numpy as np

from tally.bench.feast_redis import feast_service
from tally.bench.lookup import (measure, repeated, start_lookup_server,
                                start_redis)
from tally.bench.setup_peers import feast_python, missing_peer
from tally.core.record import INT64_MAX, Records, ViewSchema
from tally.core.serving import ServedColumn, ServedService
from tally.service.store import open_store

SIZES = (1, 100)
BATCHES = 2000                  # distinct requests per size, cycled by the driver
RATES = {1: 1000, 100: 100}     # requests/s (or half the back-to-back rate, if lower)


# ---- the README's three views ----------------------------------------------------

class Readme:
    """Three single-feature views of random values (see the module docstring)."""
    service = "recommend"
    views = {"user_reading": ViewSchema("user_reading", 1, "int64",
                                        (("total_readtime", "float64"),)),
             "user_reading_7d": ViewSchema("user_reading_7d", 1, "int64",
                                           (("recent_articles", "list<int64>"),)),
             "article_stats": ViewSchema("article_stats", 1, "int64",
                                         (("avg_length", "float64"),))}
    entity = {"user_reading": "user", "user_reading_7d": "user", "article_stats": "article"}
    on_demand = None

    def __init__(self, args, seed=7):
        self.n_users, self.n_articles = args.users, args.articles
        rng = np.random.default_rng(seed)
        self.columns = {
            "total_readtime": (rng.random(self.n_users) * 1e4).round(3),
            "recent_articles": _objects(rng.integers(0, self.n_articles,
                                                     (self.n_users, 5)).tolist()),
            "avg_length": (rng.random(self.n_articles) * 3e3).round(1)}

    def write(self, url):
        """The three views' records and the service, as ``tally serve`` writes them."""
        served = ServedService(self.service, 1, tuple(
            ServedColumn(feature, view, feature, self.entity[view])
            for view, schema in self.views.items() for feature, _ in schema.features))
        with open_store(url) as store:
            for view, schema in self.views.items():
                (feature, _), = schema.features
                n = len(self.columns[feature])
                store.register_view(schema)
                for start in range(0, n, 50_000):
                    part = slice(start, min(n, start + 50_000))
                    count = part.stop - part.start
                    store.write(view, np.arange(part.start, part.stop), Records(
                        {feature: (self.columns[feature][part], np.ones(count, bool))},
                        np.full(count, 1_700_000_000_000), 1_700_000_000_000,
                        np.full(count, INT64_MAX)))
            store.put_service(served.name, served.to_bytes())

    def batches(self, size, seed):
        rng = np.random.default_rng(seed)
        return [[{"user": u, "article": a} for u, a in
                 zip(rng.integers(0, self.n_users, size).tolist(),
                     rng.integers(0, self.n_articles, size).tolist())]
                for _ in range(BATCHES)]

    def feast_views(self, url):
        keys = {"user": list(range(self.n_users)), "article": list(range(self.n_articles))}
        return [{"name": view, "entity": self.entity[view], "fields": list(schema.features),
                 "keys": keys[self.entity[view]],
                 "columns": {feature: self.columns[feature].tolist()
                             for feature, _ in schema.features}}
                for view, schema in self.views.items()]

    @staticmethod
    def feast_row(row):
        return row


def _objects(lists):
    column = np.empty(len(lists), dtype=object)
    column[:] = lists
    return column


# ---- the talk's model --------------------------------------------------------------

class Recommend:
    """The talk's model on generated events (see the module docstring)."""
    service = "recommend"
    entity = {"user_history": "user", "user_taste": "user", "article_info": "article"}
    on_demand = "recommend_request"
    # Feast's fields: each served column under its service name, as stored
    fields = {"user_history": (("last_5_articles", "list<int64>"),
                               ("total_readtime", "float64")),
              "user_taste": (("top_category", "string"), ("avg_length", "float64"),
                             ("reading_diversity", "float64")),
              "article_info": (("article_category", "string"), ("article_length", "int64"))}

    def __init__(self, args):
        from tally.service.quickstart_model import generate
        from tally.service.examples import recommend as model
        self.model = model
        if args.feast_histogram:
            self.on_demand = "recommend_request_histogram"
            self.fields = dict(self.fields, user_taste=(
                ("categories", "list<string>"), ("category_counts", "list<int64>"),
                ("avg_length", "float64")))
        self.n_articles = args.articles
        started = time.perf_counter()
        articles, reads = generate(args.events, args.users, args.articles)
        self.articles = _columns(articles, model.articles.schema)
        self.reads = _columns(reads, model.read_events.schema)
        self.users = np.unique(self.reads["user"])          # the users who read
        print(f"generated {len(articles):,} article rows, {len(reads):,} reads of "
              f"{len(self.users):,} users in {time.perf_counter() - started:.1f} s")

    def write(self, url):
        """Fold the events through the views' state (the reads enriched with
        their article as of the read) and write each view's records as the
        bootstrap does; publish the service as ``tally serve`` does."""
        from tally.core.enrich import Enricher, tables_for
        from tally.core.materialize import online_schema, records_for
        from tally.core.view import ViewState
        from tally.service.ingest.service import publish_services
        model = self.model
        views = [model.user_history, model.user_taste, model.article_info]
        tables = tables_for(views)
        for table in tables.values():
            table.add(self.articles)
        now = int(time.time() * 1000)
        with open_store(url) as store:
            for view in views:
                columns, valid = self.articles if view.source is model.articles \
                    else self.reads, None
                if view.joins:
                    columns, valid = Enricher(view, tables)(columns)
                state = ViewState(view)
                state.apply(columns, valid)
                schema = online_schema(view)
                store.register_view(schema, expiry_ms=view.online_expiry)
                slots = np.arange(len(state))
                store.write(view.name, state.index.keys_of(slots),
                            records_for(state, schema, slots, now, now))
            publish_services(store, [(model.recommend, 1)], {v.name: v for v in views})
            store.flush()

    def batches(self, size, seed):
        """One active user per request and ``size`` distinct candidate articles."""
        rng = np.random.default_rng(seed)
        users = rng.choice(self.users, BATCHES).tolist()
        return [[{"user": user, "article": article}
                 for article in rng.choice(self.n_articles, size, replace=False).tolist()]
                for user in users]

    def feast_views(self, url):
        """The values Tally serves, read back from its store, per Feast view."""
        served = {f.view: [] for f in self.model.recommend.features}
        for f in self.model.recommend.features:
            served[f.view].append((f.feature, f.alias))
        keys = {"user": self.users.tolist(), "article": list(range(self.n_articles))}
        specs = []
        with open_store(url) as store:
            for view, entity in self.entity.items():
                records = [r for start in range(0, len(keys[entity]), 10_000)
                           for r in store.get_many(view, keys[entity][start:start + 10_000])]
                present = [k for k, r in zip(keys[entity], records) if r is not None]
                records = [r for r in records if r is not None]
                columns = {alias: [r[feature] for r in records]
                           for feature, alias in served[view]}
                if "categories" in dict(self.fields[view]):
                    columns.update(_histogram(records))
                specs.append({"name": view, "entity": entity, "fields": self.fields[view],
                              "keys": present,
                              "columns": {name: columns[name]
                                          for name, _ in self.fields[view]}})
        return specs

    @staticmethod
    def feast_row(row):
        """Feast reads the candidate as request data, beside the join key."""
        return dict(row, request_article=row["article"])


def _histogram(records):
    """user_taste's category histogram as Feast stores it: the values and
    their counts, two arrays (Feast has no list of pairs)."""
    pairs = [r["categories"] or [] for r in records]
    return {"categories": [[value for value, _ in p] for p in pairs],
            "category_counts": [[count for _, count in p] for p in pairs]}


def _columns(rows, schema):
    """Rows (dicts) as the decoded event columns a batch holds."""
    dtypes = {"string": object, "int64": np.int64, "float64": np.float64}
    return {name: np.array([row[name] for row in rows], dtype=dtypes[kind])
            for name, kind in schema}


MODELS = {"readme": Readme, "recommend": Recommend}
# (model, --quick) -> default sizes: the talk's model has users without reads
# (Zipf activity), so it has fewer users per event than readme has rows
SIZES_OF = {"readme": {False: {"users": 200_000, "articles": 50_000},
                       True: {"users": 20_000, "articles": 5_000}},
            "recommend": {False: {"users": 100_000, "articles": 20_000, "events": 1_000_000},
                          True: {"users": 10_000, "articles": 5_000, "events": 100_000}}}


# ---- the sides ---------------------------------------------------------------------

def tally_figures(url, case, batches, check, args):
    """Figures of ``LookupClient.service`` against the lookup server, and
    its vectors of the ``check`` rows."""
    from tally.service.lookup.client import LookupClient
    server, port, _ = start_lookup_server(url)
    try:
        with LookupClient(port=port) as client:
            def call(rows):
                return client.service(case.service, rows)
            return call(check), {size: repeated(lambda: measure(
                call, batches[size], RATES[size], args.seconds, args.warmup,
                pids=(server.pid,)), args.repeats) for size in SIZES}
    finally:
        server.terminate()
        server.wait()


def raw_aerospike_figures(url, case, batches, args):
    """The official client's one batch_read across the views' sets (all
    bins: each set holds one view version's bins)."""
    import aerospike
    with open_store(url) as store:
        sets = {view: store._version(view).set_name for view in case.entity}
    host, port = args.aerospike.rsplit(":", 1)
    client = aerospike.client({"hosts": [(host, int(port))]}).connect()
    policy = {"concurrent": True, "total_timeout": 1000}

    def call(rows):
        keys = [("test", sets[view], row[entity]) for row in rows
                for view, entity in case.entity.items()]
        return client.batch_read(keys, None, policy).batch_records
    try:
        return {size: repeated(lambda: measure(call, batches[size], RATES[size],
                                               args.seconds, args.warmup), args.repeats)
                for size in SIZES}
    finally:
        client.close()


def store_aerospike_figures(url, case, batches, args):
    """Closed-loop lookups/s of the views' records (see the module docstring)."""
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
        sets = {view: store._version(view).set_name for view in case.entity}

        def reads(rows):
            return {view: [row[entity] for row in rows] for view, entity in case.entity.items()}

        async def raw(rows):
            keys = [("test", sets[view], row[entity]) for row in rows
                    for view, entity in case.entity.items()]
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


def agreement(tally, feast):
    """How many of the check rows' vectors Feast and Tally agree on (every
    Tally column; floats to 1e-9), and the first that differs."""
    differ = []
    for i, (ours, theirs) in enumerate(zip(tally, feast)):
        wrong = {name: (value, theirs.get(name)) for name, value in ours.items()
                 if not _same(value, theirs.get(name))}
        if wrong:
            differ.append({"row": i, "columns": wrong})
    return {"rows": len(tally), "agree": len(tally) - len(differ),
            "first_difference": differ[0] if differ else None}


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9) or (a != a and b != b)
    return a == b


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench services")
    parser.add_argument("--model", choices=sorted(MODELS), default="readme")
    parser.add_argument("--users", type=int, help="default: per model (SIZES_OF)")
    parser.add_argument("--articles", type=int)
    parser.add_argument("--events", type=int, help="reads generated for --model recommend")
    parser.add_argument("--seconds", type=float, default=3 if quick else 10)
    parser.add_argument("--warmup", type=float, default=1 if quick else 3)
    parser.add_argument("--repeats", type=int, default=1 if quick else 3)
    parser.add_argument("--feast-python", default=feast_python(),
                        help="python of a venv with feast[redis] (default: $TALLY_FEAST_PYTHON, "
                        "else setup-peers' venv); empty: skip Feast")
    parser.add_argument("--feast-histogram", action="store_true",
                        help="--model recommend: Feast stores the category histogram and "
                        "its on-demand view derives top_category and reading_diversity "
                        "per request (by default both are stored, as Tally stores them)")
    parser.add_argument("--aerospike", help="host:port of an Aerospike server (namespace "
                        "test): adds Tally over Aerospike and the raw client")
    args = parser.parse_args(list(argv))
    for name, value in SIZES_OF[args.model][quick].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    case = MODELS[args.model](args)
    batches = {size: case.batches(size, seed=size) for size in SIZES}
    check = batches[100][0] + [rows[0] for rows in batches[1][:100]]
    figures = {}
    with tempfile.TemporaryDirectory(prefix="tally-bench-services-") as workdir:
        store = f"{workdir}/store"
        case.write(store)
        checked, figures["tally"] = tally_figures(store, case, batches, check, args)
        if args.aerospike:
            url = f"aerospike://{args.aerospike}/test?set_prefix=s{uuid.uuid4().hex[:6]}_"
            case.write(url)
            _, figures["tally_aerospike"] = tally_figures(url, case, batches, check, args)
            figures["raw_aerospike"] = raw_aerospike_figures(url, case, batches, args)
            figures["store_aerospike"] = store_aerospike_figures(url, case, batches, args)
        figures["feast"] = feast_figures(workdir, store, case, batches, check, args)
    feast_check = figures["feast"].pop("check", None)
    result = {"benchmark": "services", "model": args.model, "users": args.users,
              "articles": args.articles, "sample": checked[0], "figures": figures,
              "ratios": ratios(figures)}
    if args.model == "recommend":
        result.update(events=args.events, feast_histogram=args.feast_histogram)
    if feast_check is not None:
        result["feast_agrees"] = agreement(checked, feast_check)
    print_table(figures, result["ratios"], result.get("feast_agrees"))
    return result

def feast_figures(workdir, store, case, batches, check, args):
    """Feast's feature-service figures on its Redis online store, or why not."""
    redis, _ = start_redis(workdir)
    if redis is None:
        return {"skipped": missing_peer("redis-server (Feast's online store here)")}
    try:
        job = {"service": case.service, "views": case.feast_views(store),
               "on_demand": case.on_demand, "check": [case.feast_row(row) for row in check],
               "redis_pid": redis.pid}
        return feast_service(
            args.feast_python, workdir, int(redis.args[2]), job,
            {size: [[case.feast_row(row) for row in rows] for rows in sized]
             for size, sized in batches.items()},
            RATES, args.seconds, args.warmup, args.repeats)
    finally:
        redis.terminate()
        redis.wait()


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


def print_table(figures, found, agrees=None):
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
                      f"{row['p99_us']:>8} us  at {row['rate']}/s  cpu wait "
                      f"{row.get('cpu_wait_share')}  cpu/call {row.get('cpu_us_per_call')} us")
    for name, value in found.items():
        print(f"{name}: {value}")
    if agrees:
        print(f"Feast's vectors equal Tally's for {agrees['agree']} of {agrees['rows']} rows"
              + (f"; first difference: {agrees['first_difference']}"
                 if agrees["first_difference"] else ""))

