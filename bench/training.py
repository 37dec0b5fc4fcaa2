"""Training sets: Tally's point-in-time replay against DuckDB and Polars, same data.

1M events over 100k entities and 1M spine rows (``--quick``: 10x smaller),
events and spine in memory (Arrow), event times unique (so "the last value"
has one answer), spine times over the same 30 days. Two key distributions:
uniform, and with 3% of events (and spine rows) on one hot key.

* last value: Tally ``last`` (lifetime) against DuckDB ``ASOF LEFT JOIN``
  (LEFT, so label rows without an earlier event are kept as nulls).
* 7-day sum: Tally ``sum`` over ``Window.sliding('7d', '1h')`` against the two
  DuckDB formulations we found, best taken:
  - ``range``: a window ``RANGE BETWEEN 7 days - 1 ms PRECEDING AND CURRENT
    ROW`` over the union of events and spine rows (spine rows carry 0), the
    spine rows picked out afterwards;
  - ``prefix``: a running sum per entity over the events, then two ASOF joins
    (at t and at the window's start) and a difference.
  Tally's window is hop-aligned: it covers [(t // 1h - 167) * 1h, t]. Spine
  times here end an hour (t = k * 1h + 1h - 1 ms), where that equals DuckDB's
  (t - 7d, t], so both compute the same numbers and are checked equal.

Beside them (``all_threads``): DuckDB with every core (``SET threads``) and
Polars (its thread pool, every core: its size is fixed at import), with
``join_asof`` for the last value and, for the 7-day sum, the same prefix
formulation and ``rolling_sum_by`` over the union of events and spine rows;
Tally itself runs on one thread throughout.

Each candidate takes its inputs as Arrow tables and returns an Arrow table
(DuckDB's output order is its own; Tally returns spine order). Best of
``--repeat``. Row counts and a full value comparison are reported.

``feast_last``: Feast's ``get_historical_features`` for the last value, with
its file (Dask) and DuckDB offline stores (one thread each too), against
Tally on the same spine rows. Feast is not a dependency of Tally: it runs in
a venv of its own (``--feast-python``) by subprocess, on the events and spine
written to Parquet; only ``get_historical_features(...).to_df()`` is timed,
best of ``--repeat`` in one process (setting up the repo and reading the
spine: ``setup_s``). Feast's file store merges every spine row with every
event of its entity before it filters by time, so a hot key costs it
(hot rows x hot events) pairs: when the spine's pairs exceed
``--feast-pairs``, Feast gets a random subsample of the spine, Tally is timed
again on exactly those rows, and a per-row ratio against Tally's full-spine
rate is reported too. Semantics: all take events with time <= t (inclusive,
like the ASOF join above) and the TTL (ten years) never cuts; but Feast's
file store *drops* a spine row whose entity has only later events (Tally and
the DuckDB store keep it, null), so Feast's values are compared with Tally's
on the rows Feast returned, and the rows it left out are counted.

``archive``: Tally's last value with the events read from Parquet instead,
time-sorted (streamed by row group) and unsorted (external sort in spilled
runs of a tenth of the events), with the peak of numpy allocations
(tracemalloc; Arrow's own buffers are not counted).
"""
import argparse
import importlib.metadata
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tally.bench.setup_peers import feast_python, feast_version, missing_peer
from tally.core.definitions import Entity, Feature, FeatureView, Source, Window
from tally.service.training import training_set

HOUR = 3_600_000
DAY = 24 * HOUR
SPAN = 30 * DAY
START = 1_732_780_800_000
FEAST_STORES = ("file", "duckdb")

user = Entity("user", "int64")
events_source = Source("bench_events", "bench_events",
                       schema={"user": "int64", "v": "float64", "ts": "int64"})
LAST = FeatureView("b_last", user, events_source, features=[Feature("last_v", "last", "v")])
WEEK = FeatureView("b_week", user, events_source,
                   features=[Feature("sum_7d", "sum", "v", Window.sliding("7d", "1h"))])


def make_data(n_events, n_entities, n_spine, hot_fraction, seed=1):
    rng = np.random.default_rng(seed)

    def keys(n):
        k = rng.integers(0, n_entities, n)
        if hot_fraction:
            k[rng.random(n) < hot_fraction] = 0
        return k
    ts = START + rng.choice(SPAN, n_events, replace=False)       # unique event times
    events = pa.table({"user": keys(n_events), "v": np.round(rng.random(n_events) * 100, 2),
                       "ts": ts})
    spine_ts = START + rng.integers(-DAY, SPAN + DAY, n_spine)
    spine = pa.table({"row": np.arange(n_spine), "user": keys(n_spine), "ts": spine_ts,
                      "label": rng.integers(0, 2, n_spine)})
    # hour-ending times for the 7-day sum (see the module docstring)
    aligned = pa.table({"row": np.arange(n_spine), "user": spine.column("user"),
                        "ts": (spine_ts // HOUR) * HOUR + HOUR - 1,
                        "label": spine.column("label")})
    return events, spine, aligned


def best_of(repeat, fn):
    best, result = None, None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def tally_last(events, spine):
    return training_set(spine, ["b_last:last_v"], {"bench_events": events}, views=[LAST])


def tally_week(events, spine):
    return training_set(spine, ["b_week:sum_7d"], {"bench_events": events}, views=[WEEK])


def duckdb_connection(threads=1):
    """A DuckDB connection on ``threads`` threads, or None when DuckDB is not installed."""
    try:
        import duckdb
    except ImportError:
        return None
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    return con


def polars_module():
    try:
        import polars
    except ImportError:
        return None
    return polars


def polars_last(pl, events, spine):
    """``join_asof`` backward by user: the last event at or before each row
    (both sides sorted by time, as ``join_asof`` requires; it cannot check
    that within ``by`` groups, hence ``check_sortedness=False``)."""
    e = pl.from_arrow(events).select("user", "ts", "v").sort("ts")
    s = pl.from_arrow(spine).sort("ts")
    return s.join_asof(e, on="ts", by="user", strategy="backward", check_sortedness=False) \
        .rename({"v": "last_v"}).to_arrow()


def polars_week_prefix(pl, events, spine):
    """A running sum per user, two ``join_asof`` (at t, and at the window's
    start) and a difference: DuckDB's ``prefix`` formulation."""
    running = pl.from_arrow(events).sort("user", "ts") \
        .with_columns(cum=pl.col("v").cum_sum().over("user")).select("user", "ts", "cum") \
        .sort("ts")
    s = pl.from_arrow(spine).sort("ts")
    upto = s.join_asof(running, on="ts", by="user", strategy="backward", check_sortedness=False)
    start = s.select("row", "user", ts=pl.col("ts") - 7 * DAY).sort("ts") \
        .join_asof(running.rename({"cum": "cum_before"}), on="ts", by="user",
                   strategy="backward", check_sortedness=False).select("row", "cum_before")
    return upto.join(start, on="row").select(
        "row", "user", "ts", "label",
        sum_7d=pl.col("cum") - pl.col("cum_before").fill_null(0.0)).to_arrow()


def polars_week_rolling(pl, events, spine):
    """``rolling_sum_by`` over (t - 7 days, t] per user on the union of
    events and spine rows (rows carry 0, after the events of their time);
    null where the user has no event yet."""
    e = pl.from_arrow(events).select("user", "ts", "v", is_row=pl.lit(0, pl.Int8),
                                     row=pl.lit(None, pl.Int64), label=pl.lit(None, pl.Int64))
    s = pl.from_arrow(spine).select("user", "ts", v=pl.lit(0.0), is_row=pl.lit(1, pl.Int8),
                                    row="row", label="label")
    both = pl.concat([e, s]).sort("user", "ts", "is_row")
    summed = both.with_columns(
        sum_7d=pl.col("v").rolling_sum_by("ts", window_size=f"{7 * DAY}i", closed="right").over("user"),
        seen=(1 - pl.col("is_row")).cum_sum().over("user"))
    return summed.filter(pl.col("is_row") == 1).select(
        "row", "user", "ts", "label",
        sum_7d=pl.when(pl.col("seen") > 0).then(pl.col("sum_7d"))).to_arrow()


def duckdb_version():
    try:
        return importlib.metadata.version("duckdb")
    except importlib.metadata.PackageNotFoundError:
        return missing_peer("DuckDB")


def duckdb_last(con, events, spine):
    con.register("events", events)
    con.register("spine", spine)
    return con.sql("""
        SELECT s.row, s.user, s.ts, s.label, e.v AS last_v
        FROM spine s ASOF LEFT JOIN events e ON s.user = e.user AND s.ts >= e.ts
    """).to_arrow_table()


def duckdb_week_range(con, events, spine):
    con.register("events", events)
    con.register("spine", spine)
    return con.sql("""
        WITH u AS (
            SELECT user, ts, v, 0 AS is_row, NULL::BIGINT AS row, NULL::BIGINT AS label
            FROM events
            UNION ALL
            SELECT user, ts, 0.0 AS v, 1 AS is_row, row, label FROM spine
        ), w AS (
            SELECT is_row, row, user, ts, label,
                   SUM(v) OVER (PARTITION BY user ORDER BY ts
                                RANGE BETWEEN 604799999 PRECEDING AND CURRENT ROW) AS sum_7d,
                   COUNT(*) FILTER (WHERE is_row = 0) OVER (
                       PARTITION BY user ORDER BY ts
                       RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS seen
            FROM u
        )
        SELECT row, user, ts, label, CASE WHEN seen > 0 THEN sum_7d END AS sum_7d
        FROM w WHERE is_row = 1
    """).to_arrow_table()


def duckdb_week_prefix(con, events, spine):
    con.register("events", events)
    con.register("spine", spine)
    return con.sql("""
        WITH c AS (
            SELECT user, ts, SUM(v) OVER (PARTITION BY user ORDER BY ts
                                          ROWS UNBOUNDED PRECEDING) AS cum
            FROM events
        ), upto AS (
            SELECT s.row, s.user, s.ts, s.label, c.cum
            FROM spine s ASOF LEFT JOIN c ON s.user = c.user AND s.ts >= c.ts
        ), before AS (
            SELECT s.row, c.cum
            FROM spine s ASOF LEFT JOIN c ON s.user = c.user AND s.ts - 604800000 >= c.ts
        )
        SELECT upto.row, upto.user, upto.ts, upto.label,
               upto.cum - COALESCE(before.cum, 0) AS sum_7d
        FROM upto JOIN before ON upto.row = before.row
    """).to_arrow_table()


def by_row(table, column):
    """``column`` ordered by the spine's row id, as float64 with NaN for null."""
    order = np.argsort(table.column("row").to_numpy())
    return table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)[order]


def compare(a, b, column):
    x, y = by_row(a, column), by_row(b, column)
    same_nulls = np.array_equal(np.isnan(x), np.isnan(y))
    close = np.allclose(x, y, rtol=1e-9, atol=1e-6, equal_nan=True)
    return bool(same_nulls and close), int(np.sum(~np.isclose(x, y, rtol=1e-9, atol=1e-6,
                                                             equal_nan=True)))


def run_case(name, events, spine, aligned, repeat):
    """Tally's figures, and DuckDB's beside them when it is installed."""
    con = duckdb_connection()
    n = spine.num_rows
    figures = {}
    t_tally, got = best_of(repeat, lambda: tally_last(events, spine))
    figures["last"] = {"tally_rows_per_s": round(n / t_tally),
                       "rows": {"spine": n, "tally": got.num_rows},
                       "null_rows": int(got.column("last_v").null_count)}
    t_week, got_week = best_of(repeat, lambda: tally_week(events, aligned))
    figures["sum_7d"] = {"tally_rows_per_s": round(n / t_week),
                         "rows": {"spine": n, "tally": got_week.num_rows},
                         "null_rows": int(got_week.column("sum_7d").null_count)}
    if con is None:
        figures["duckdb"] = missing_peer("DuckDB")
    else:
        duckdb_figures(figures, con, events, spine, aligned, repeat, (t_tally, got),
                       (t_week, got_week))
        con.close()
    peers = all_thread_peers(events, spine, aligned, repeat)
    for feature, (seconds, reference, column) in (("last", (t_tally, got, "last_v")),
                                                   ("sum_7d", (t_week, got_week, "sum_7d"))):
        figures[feature]["all_threads"] = mine = {}
        for peer, (peer_seconds, table) in peers[feature].items():
            equal, differ = compare(reference, table, column)
            mine[peer] = {"rows_per_s": round(n / peer_seconds), "values_equal": equal,
                          "rows_differing": differ}
        if mine:
            best = min(peers[feature], key=lambda p: peers[feature][p][0])
            mine["ratio_tally_to_best"] = {best: round(peers[feature][best][0] / seconds, 3)}
    figures["all_threads_peers_missing"] = peers["missing"]
    print(f"{name}: {figures}", flush=True)
    return figures


def all_thread_peers(events, spine, aligned, repeat):
    """DuckDB on every core and Polars (its own thread pool, every core):
    ``{feature: {peer: (best seconds, table)}, "missing": [...]}``."""
    peers = {"last": {}, "sum_7d": {}, "missing": []}
    con = duckdb_connection(threads=os.cpu_count())
    if con is None:
        peers["missing"].append(missing_peer("DuckDB"))
    else:
        peers["last"]["duckdb_all_threads_asof"] = best_of(
            repeat, lambda: duckdb_last(con, events, spine))
        peers["sum_7d"]["duckdb_all_threads_prefix"] = best_of(
            repeat, lambda: duckdb_week_prefix(con, events, aligned))
        peers["sum_7d"]["duckdb_all_threads_range"] = best_of(
            repeat, lambda: duckdb_week_range(con, events, aligned))
        con.close()
    pl = polars_module()
    if pl is None:
        peers["missing"].append(missing_peer("Polars"))
    else:
        peers["last"]["polars_join_asof"] = best_of(repeat,
                                                    lambda: polars_last(pl, events, spine))
        peers["sum_7d"]["polars_prefix"] = best_of(
            repeat, lambda: polars_week_prefix(pl, events, aligned))
        peers["sum_7d"]["polars_rolling_sum_by"] = best_of(
            repeat, lambda: polars_week_rolling(pl, events, aligned))
    return peers


def duckdb_figures(figures, con, events, spine, aligned, repeat, last, week):
    """DuckDB's rates, ratios and value checks added to Tally's ``figures``;
    ``last`` and ``week``: Tally's (seconds, table) of each."""
    n = spine.num_rows
    t_tally, got = last
    t_duck, want = best_of(repeat, lambda: duckdb_last(con, events, spine))
    equal, differ = compare(got, want, "last_v")
    figures["last"]["rows"]["duckdb"] = want.num_rows
    figures["last"].update({
        "duckdb_asof_rows_per_s": round(n / t_duck),
        "ratio_tally_to_duckdb": round(t_duck / t_tally, 3),
        "values_equal": equal, "rows_differing": differ})
    t_tally, got = week
    t_range, want_range = best_of(repeat, lambda: duckdb_week_range(con, events, aligned))
    t_prefix, want_prefix = best_of(repeat, lambda: duckdb_week_prefix(con, events, aligned))
    equal_range, differ_range = compare(got, want_range, "sum_7d")
    equal_prefix, differ_prefix = compare(got, want_prefix, "sum_7d")
    t_best = min(t_range, t_prefix)
    figures["sum_7d"]["rows"].update(duckdb_range=want_range.num_rows,
                                     duckdb_prefix=want_prefix.num_rows)
    figures["sum_7d"].update({
        "duckdb_range_rows_per_s": round(n / t_range),
        "duckdb_prefix_rows_per_s": round(n / t_prefix),
        "ratio_tally_to_best_duckdb": round(t_best / t_tally, 3),
        "values_equal": {"range": equal_range, "prefix": equal_prefix},
        "rows_differing": {"range": differ_range, "prefix": differ_prefix}})


def archive_case(events, spine, repeat, chunk_rows):
    """The last value again, the events read from Parquet: a time-sorted
    archive (streamed by row group) and an unsorted one (sorted externally in
    spilled runs of ``chunk_rows``), with the peak of numpy allocations."""
    import tracemalloc
    n = spine.num_rows
    figures = {"chunk_rows": chunk_rows}
    with tempfile.TemporaryDirectory() as work:
        order = np.argsort(events.column("ts").to_numpy(), kind="stable")
        layouts = {"sorted": events.take(pa.array(order)), "unsorted": events}
        reference = tally_last(events, spine)
        for name, table in layouts.items():
            path = os.path.join(work, f"{name}.parquet")
            pq.write_table(table, path, row_group_size=65_536)

            def build():
                return training_set(spine, ["b_last:last_v"], {"bench_events": path},
                                    views=[LAST], chunk_rows=chunk_rows, spill_dir=work)
            seconds, got = best_of(repeat, build)
            tracemalloc.start()
            build()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            figures[name] = {"rows_per_s": round(n / seconds),
                             "numpy_peak_mb": round(peak / 2**20, 1),
                             "values_equal": got.equals(reference)}
    print(f"archive: {figures}", flush=True)
    return figures


# ---- Feast, in its own interpreter ------------------------------------------------

# Run by the Feast venv's python with a job file; imports only Feast and pandas.
FEAST_DRIVER = """
import json, os, sys, time
from datetime import timedelta

import pandas as pd
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
from feast.repo_config import RegistryConfig, RepoConfig
from feast.types import Float64


def offline_store(kind):
    # one thread, like Tally and DuckDB in this benchmark
    if kind == "file":
        import dask
        from feast.infra.offline_stores.dask import DaskOfflineStoreConfig
        dask.config.set(scheduler="synchronous")
        return DaskOfflineStoreConfig(type="file")
    import ibis
    from feast.infra.offline_stores.duckdb import DuckDBOfflineStoreConfig
    ibis.get_backend().raw_sql("SET threads = 1")   # the backend Feast's reads use
    return DuckDBOfflineStoreConfig()


def feature_store(job):
    repo = job["repo"]
    config = RepoConfig(project="bench", provider="local", repo_path=repo,
                        registry=RegistryConfig(path=os.path.join(repo, "registry.db")),
                        online_store=SqliteOnlineStoreConfig(
                            path=os.path.join(repo, "online.db")),
                        offline_store=offline_store(job["store"]),
                        entity_key_serialization_version=3)
    store = FeatureStore(config=config)
    user = Entity(name="user", join_keys=["user"], value_type=ValueType.INT64)
    # a TTL longer than the history, so the value is "the last one as of t"
    view = FeatureView(name="b_last", entities=[user], ttl=timedelta(days=3650),
                       schema=[Field(name="last_v", dtype=Float64)], online=False,
                       source=FileSource(path=job["events"], timestamp_field="event_timestamp",
                                         field_mapping={"v": "last_v"}))
    store.apply([user, view])
    return store


def main():
    job = json.load(open(sys.argv[1]))
    started = time.perf_counter()
    store = feature_store(job)
    spine = pd.read_parquet(job["spine"])
    setup = time.perf_counter() - started
    best = None
    for _ in range(job["repeat"]):
        started = time.perf_counter()
        result = store.get_historical_features(entity_df=spine,
                                               features=["b_last:last_v"]).to_df()
        seconds = time.perf_counter() - started
        best = seconds if best is None else min(best, seconds)
    result[["row", "last_v"]].to_parquet(job["out"])
    print(json.dumps({"setup_s": round(setup, 2),
                      "seconds": round(best, 3), "rows": len(result)}))


main()
"""


def feast_interpreter(option):
    """The Feast venv's python, or None when there is none."""
    path = option if option is not None else feast_python()
    return path if path and os.path.exists(path) else None


def write_feast_inputs(workdir, events, spine):
    """Events and spine as Parquet, in the order Tally gets them, times as UTC
    timestamps (Feast wants those)."""
    def with_timestamps(table):
        stamps = table.column("ts").cast(pa.timestamp("ms", tz="UTC"))
        return table.append_column("event_timestamp", stamps).drop_columns(["ts"])
    paths = {"events": os.path.join(workdir, "events.parquet"),
             "spine": os.path.join(workdir, "spine.parquet")}
    pq.write_table(with_timestamps(events), paths["events"])
    pq.write_table(with_timestamps(spine), paths["spine"])
    return paths


def run_feast(python, store, paths, workdir, repeat, timeout):
    """Feast's figures and result table for one offline store (result None and
    a reason in the figures when it did not finish)."""
    repo = tempfile.mkdtemp(prefix=f"feast-{store}-", dir=workdir)
    job = dict(paths, store=store, repo=repo, repeat=repeat,
               out=os.path.join(repo, "result.parquet"))
    job_path = os.path.join(repo, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    script = os.path.join(repo, "driver.py")
    with open(script, "w") as f:
        f.write(FEAST_DRIVER)
    try:
        done = subprocess.run([python, script, job_path], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {timeout} s"}, None
    if done.returncode:
        return {"skipped": f"the Feast driver failed: {done.stderr.strip()[-600:]}"}, None
    return json.loads(done.stdout.splitlines()[-1]), pq.read_table(job["out"])


def compare_returned_rows(reference, result, column):
    """Feast's values against Tally's on the rows Feast returned (by row id),
    and which of the spine's rows it left out."""
    ref_ids = reference.column("row").to_numpy()
    order = np.argsort(ref_ids)
    ids = result.column("row").to_numpy()
    at = order[np.searchsorted(ref_ids, ids, sorter=order)]
    want = reference.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    got = result.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    same = np.isclose(got, want[at], rtol=1e-9, atol=1e-6, equal_nan=True)
    missing = np.ones(len(ref_ids), dtype=bool)
    missing[at] = False
    return {"rows_matching": int(same.sum()), "rows_differing": int((~same).sum()),
            "rows_repeated": int(len(ids) - len(np.unique(ids))),
            "rows_missing": int(missing.sum()),
            "rows_missing_null_in_tally": int(np.isnan(want[missing]).sum())}


def entity_pairs(events, spine):
    """Pairs (spine row, event of the same entity): what Feast's file store
    materializes before it filters by time (its merge is on the key alone)."""
    event_keys, spine_keys = events.column("user").to_numpy(), spine.column("user").to_numpy()
    per_entity = np.bincount(event_keys, minlength=int(spine_keys.max()) + 1)
    return int(per_entity[spine_keys].sum())


def feast_spine(events, spine, max_pairs):
    """The whole spine, or a random subsample small enough that Feast's
    file store materializes about ``max_pairs`` pairs (a hot key's rows pair
    with all of its events: 30k x 30k for the 3% hot key at full size)."""
    pairs = entity_pairs(events, spine)
    n = spine.num_rows if pairs <= max_pairs else max(1, spine.num_rows * max_pairs // pairs)
    picked = np.sort(np.random.default_rng(2).choice(spine.num_rows, n, replace=False))
    return spine.take(pa.array(picked)), pairs


def feast_store_figures(figures, result, reference, t_tally, tally_full_rows_per_s):
    """One Feast store's run, with its rate, ratios and value check added
    (the per-row ratio to Tally's full-spine rate if that is given)."""
    if result is None:
        return figures
    n = reference.num_rows
    rate = n / figures["seconds"]
    figures["rows_per_s"] = round(rate)
    figures["ratio_tally_to_feast"] = round(figures["seconds"] / t_tally, 1)
    if tally_full_rows_per_s:
        figures["ratio_per_row_tally_full_spine"] = round(tally_full_rows_per_s / rate, 1)
    figures.update(compare_returned_rows(reference, result, "last_v"))
    return figures


def feast_case(python, events, spine, tally_full_rows_per_s, args):
    """Tally against each Feast offline store, same events, same spine rows."""
    spine, pairs = feast_spine(events, spine, args.feast_pairs)
    n = spine.num_rows
    t_tally, reference = best_of(args.repeat, lambda: tally_last(events, spine))
    figures = {"spine_rows": n, "subsample": n < args.spine, "entity_pairs_full_spine": pairs,
               "tally_rows_per_s": round(n / t_tally),
               "tally_null_rows": int(reference.column("last_v").null_count)}
    # Feast's work grows with the pairs, so linearly in a random subsample,
    # while Tally's on a subsample is mostly sorting the (all) events: the
    # per-row ratio takes Tally's rate on the whole spine
    full_rate = tally_full_rows_per_s if figures["subsample"] else None
    with tempfile.TemporaryDirectory(prefix="tally-bench-feast-") as workdir:
        paths = write_feast_inputs(workdir, events, spine)
        for store in FEAST_STORES:
            store_figures, result = run_feast(python, store, paths, workdir, args.repeat,
                                              args.feast_timeout)
            figures[store] = feast_store_figures(store_figures, result, reference, t_tally,
                                                 full_rate)
            print(f"  feast {store}: {figures[store]}", flush=True)
    return figures


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench training")
    parser.add_argument("--events", type=int, default=100_000 if quick else 1_000_000)
    parser.add_argument("--entities", type=int, default=10_000 if quick else 100_000)
    parser.add_argument("--spine", type=int, default=100_000 if quick else 1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--feast-python", default=None,
                        help="python of a venv with feast (default: $TALLY_FEAST_PYTHON, "
                             "else setup-peers' venv); empty: skip Feast")
    parser.add_argument("--feast-pairs", type=int, default=30_000_000,
                        help="Feast gets a random subsample of the spine when its rows "
                             "pair with more events of their entity than this")
    parser.add_argument("--feast-timeout", type=float, default=1800,
                        help="seconds per Feast run before it is abandoned")
    args = parser.parse_args(argv)
    python = feast_interpreter(args.feast_python)
    feast = feast_version(python) if python else None
    figures = {"benchmark": "training", "events": args.events, "entities": args.entities,
               "spine_rows": args.spine, "threads": 1, "duckdb": duckdb_version(),
               "feast": feast or ("not run" if args.feast_python == ""
                                  else missing_peer("Feast"))}
    for name, hot in (("uniform", 0.0), ("hot_key_3pct", 0.03)):
        events, spine, aligned = make_data(args.events, args.entities, args.spine, hot)
        figures[name] = run_case(name, events, spine, aligned, args.repeat)
        if feast:
            figures[name]["feast_last"] = feast_case(
                python, events, spine, figures[name]["last"]["tally_rows_per_s"], args)
        if not hot:
            figures["archive"] = archive_case(events, spine, args.repeat,
                                              max(args.events // 10, 1))
    return figures
