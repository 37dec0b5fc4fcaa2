"""Feast's feature service on its Redis online store: the peer of Tally's
feature-service lookups (``bench/services.py``).

Feast runs in an interpreter of its own (``--feast-python``: a venv with
``feast[redis]``), so this module only writes the job and the driver script,
runs it, and reads back its figures. The job names the views (entity, typed
fields, one row of values per entity key: the records Tally serves), loaded
into Redis through ``write_to_online_store``; with ``on_demand`` the feature
service also holds one of the model's on-demand feature views
(``recommend_request`` below, or ``recommend_request_histogram``, which also
derives two features from a stored histogram per request): Feast's
request-time transformations, in their ``python`` mode. The
driver measures ``get_online_features`` with the service, with the
open-loop driver of ``bench/lookup.py`` (sent as source), so both sides are
measured the same way, and answers the job's ``check`` rows for the
comparison with Tally's vectors.
"""
import json
import os
import subprocess
from pathlib import Path

from tally.bench.lookup import DRIVER_SOURCE
from tally.bench.setup_peers import missing_peer

FEAST_DRIVER = """
import json, os, sys, time
from datetime import timedelta
import pandas as pd
from feast import (Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource,
                   RequestSource, ValueType)
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.on_demand_feature_view import on_demand_feature_view
from feast.repo_config import RegistryConfig, RepoConfig
from feast.types import Array, Float64, Int64, String

{driver}

TYPES = {{"int64": Int64, "float64": Float64, "string": String, "list<int64>": Array(Int64),
         "list<string>": Array(String)}}


def view(spec, entity, repo, when):
    frame = pd.DataFrame({{spec["entity"]: spec["keys"], **spec["columns"], "event_timestamp": when}})
    path = os.path.join(repo, spec["name"] + ".parquet")
    frame.to_parquet(path)
    fields = [Field(name=name, dtype=TYPES[kind]) for name, kind in spec["fields"]]
    return FeatureView(name=spec["name"], entities=[entity], ttl=timedelta(days=36500),
                       schema=fields, online=True,
                       source=FileSource(path=path, timestamp_field="event_timestamp")), frame


def recommend_request(views):
    \"\"\"The talk's model's request-time columns, as Feast writes them: the
    candidate article comes as request data (Feast reads a join key only to
    look rows up, never as an input of a transformation).\"\"\"
    candidate = RequestSource(name="candidate",
                              schema=[Field(name="request_article", dtype=Int64)])

    @on_demand_feature_view(
        sources=[views["user_history"], views["user_taste"], views["article_info"], candidate],
        schema=[Field(name="current_article", dtype=Int64),
                Field(name="in_top_category", dtype=Int64),
                Field(name="just_read", dtype=Int64)],
        mode="python")
    def recommend_request(inputs):
        in_top, just_read = [], []
        for category, top, last_5, article in zip(
                inputs["article_category"], inputs["top_category"],
                inputs["last_5_articles"], inputs["request_article"]):
            in_top.append(None if category is None or top is None else int(category == top))
            just_read.append(None if last_5 is None else int(article in last_5))
        return {{"current_article": inputs["request_article"], "in_top_category": in_top,
                "just_read": just_read}}
    return recommend_request


def recommend_request_histogram(views):
    \"\"\"recommend_request's columns, and the user's top category and reading
    diversity derived from the stored category histogram (as Tally's
    TOP_VALUE and ENTROPY in bits).\"\"\"
    candidate = RequestSource(name="candidate",
                              schema=[Field(name="request_article", dtype=Int64)])

    @on_demand_feature_view(
        sources=[views["user_history"], views["user_taste"], views["article_info"], candidate],
        schema=[Field(name="top_category", dtype=String),
                Field(name="reading_diversity", dtype=Float64),
                Field(name="current_article", dtype=Int64),
                Field(name="in_top_category", dtype=Int64),
                Field(name="just_read", dtype=Int64)],
        mode="python")
    def recommend_request_histogram(inputs):
        import math                     # Feast runs the function's source on its own
        top_category, diversity, in_top, just_read = [], [], [], []
        for values, counts, category, last_5, article in zip(
                inputs["categories"], inputs["category_counts"], inputs["article_category"],
                inputs["last_5_articles"], inputs["request_article"]):
            top = values[0] if values else None
            total = float(sum(counts)) if counts else 0.0
            top_category.append(top)
            diversity.append(-sum((c / total) * math.log2(c / total) for c in counts if c > 0)
                             + 0.0 if counts else None)
            in_top.append(None if category is None or top is None else int(category == top))
            just_read.append(None if last_5 is None else int(article in last_5))
        return {{"top_category": top_category, "reading_diversity": diversity,
                "current_article": inputs["request_article"], "in_top_category": in_top,
                "just_read": just_read}}
    return recommend_request_histogram


ON_DEMAND = {{"recommend_request": recommend_request,
             "recommend_request_histogram": recommend_request_histogram}}


def main():
    job = json.load(open(sys.argv[1]))
    repo = job["repo"]
    config = RepoConfig(project="bench", provider="local",
                        registry=RegistryConfig(path=os.path.join(repo, "registry.db")),
                        online_store=RedisOnlineStoreConfig(
                            connection_string=f"127.0.0.1:{{job['redis_port']}}"),
                        entity_key_serialization_version=3)
    store = FeatureStore(config=config)
    when = pd.Timestamp("2023-11-14", tz="UTC")
    entities = {{name: Entity(name=name, join_keys=[name], value_type=ValueType.INT64)
                for name in dict.fromkeys(spec["entity"] for spec in job["views"])}}
    views, frames = {{}}, {{}}
    for spec in job["views"]:
        views[spec["name"]], frames[spec["name"]] = view(spec, entities[spec["entity"]], repo,
                                                         when)
    features = list(views.values())
    if job["on_demand"]:
        features.append(ON_DEMAND[job["on_demand"]](views))
    service = FeatureService(name=job["service"], features=features)
    store.apply([*entities.values(), *features, service])
    started = time.perf_counter()
    for name, frame in frames.items():
        store.write_to_online_store(name, frame)
    loaded = time.perf_counter() - started
    service = store.get_feature_service(job["service"])

    def call(rows):
        return store.get_online_features(features=service, entity_rows=rows).to_dict()
    checked = call(job["check"])
    results = {{"load_seconds": round(loaded, 1),
               "check": [dict(zip(checked, values)) for values in zip(*checked.values())]}}
    for size, batches in job["batches"].items():
        results[size] = repeated(lambda: measure(call, batches, job["rates"][size],
                                                 job["seconds"], job["warmup"],
                                                 pids=(job["redis_pid"],)),
                                 job["repeats"])
    print(json.dumps(results))

main()
"""


def feast_service(python, workdir, redis_port, job, batches, rates, seconds, warmup, repeats):
    """Figures of Feast's feature-service lookups, or the reason they were skipped.

    ``job``: ``service`` (its name), ``views`` (each a dict: ``name``,
    ``entity``, ``fields`` [(name, value type)], ``keys`` and ``columns``
    {field: value per key}), ``on_demand`` (None or the name of an on-demand
    feature view of the driver's), ``check`` (entity rows whose vectors come
    back under ``check``) and ``redis_pid`` (its CPU is counted with Feast's);
    ``batches``: per batch size, lists of entity rows."""
    if not python:
        return {"skipped": "--feast-python ''"}
    if not os.path.exists(python):
        return {"skipped": missing_peer(f"Feast (no interpreter at {python!r})")}
    repo = Path(workdir) / "feast-redis"
    repo.mkdir()
    job = dict(job, repo=str(repo), redis_port=redis_port,
               rates={str(size): rate for size, rate in rates.items()},
               seconds=seconds, warmup=warmup, repeats=repeats,
               batches={str(size): b for size, b in batches.items()})
    (repo / "job.json").write_text(json.dumps(job))
    script = repo / "driver.py"
    script.write_text(FEAST_DRIVER.format(driver=DRIVER_SOURCE))
    done = subprocess.run([python, str(script), str(repo / "job.json")],
                          capture_output=True, text=True)
    if done.returncode:
        return {"skipped": f"the Feast driver failed: {done.stderr.strip()[-800:]}"}
    return json.loads(done.stdout.splitlines()[-1])
