"""Feast's feature service on its Redis online store: the peer of Tally's
feature-service lookups (``bench/services.py``).

Feast runs in an interpreter of its own (``--feast-python``: a venv with
``feast[redis]``), so this module only writes the job and the driver script,
runs it, and reads back its figures. The driver loads the same three views
as the Tally side -- a float per user, a list of 5 int64 article ids per
user, a float per article -- into Redis through ``write_to_online_store``,
defines one feature service over them, and measures ``get_online_features``
with the service, with the open-loop driver of ``bench/lookup.py`` (sent as
source), so both sides are measured the same way.
"""
import json
import os
import subprocess
from pathlib import Path

from tally.bench.lookup import DRIVER_SOURCE

FEAST_DRIVER = """
import json, os, sys, time
from datetime import timedelta
import numpy as np, pandas as pd
from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.repo_config import RegistryConfig, RepoConfig
from feast.types import Array, Float64, Int64

{driver}

def view(name, entity, fields, frame, repo):
    path = os.path.join(repo, name + ".parquet")
    frame.to_parquet(path)
    return FeatureView(name=name, entities=[entity], ttl=timedelta(days=36500), schema=fields,
                       online=True, source=FileSource(path=path, timestamp_field="event_timestamp"))

def main():
    job = json.load(open(sys.argv[1]))
    repo, data = job["repo"], job["data"]
    config = RepoConfig(project="bench", provider="local",
                        registry=RegistryConfig(path=os.path.join(repo, "registry.db")),
                        online_store=RedisOnlineStoreConfig(
                            connection_string=f"127.0.0.1:{{job['redis_port']}}"),
                        entity_key_serialization_version=3)
    store = FeatureStore(config=config)
    when = pd.Timestamp("2023-11-14", tz="UTC")
    users = pd.DataFrame({{"user": np.arange(len(data["total_readtime"]), dtype=np.int64),
                          "total_readtime": np.array(data["total_readtime"]),
                          "event_timestamp": when}})
    recent = pd.DataFrame({{"user": users["user"],
                           "recent_articles": [list(map(int, a)) for a in data["recent_articles"]],
                           "event_timestamp": when}})
    articles = pd.DataFrame({{"article": np.arange(len(data["avg_length"]), dtype=np.int64),
                             "avg_length": np.array(data["avg_length"]), "event_timestamp": when}})
    user = Entity(name="user", join_keys=["user"], value_type=ValueType.INT64)
    article = Entity(name="article", join_keys=["article"], value_type=ValueType.INT64)
    views = [view("user_reading", user, [Field(name="total_readtime", dtype=Float64)], users, repo),
             view("user_reading_7d", user, [Field(name="recent_articles", dtype=Array(Int64))],
                  recent, repo),
             view("article_stats", article, [Field(name="avg_length", dtype=Float64)],
                  articles, repo)]
    service = FeatureService(name="recommend", features=views)
    store.apply([user, article, *views, service])
    started = time.perf_counter()
    for v, frame in zip(views, (users, recent, articles)):
        store.write_to_online_store(v.name, frame)
    loaded = time.perf_counter() - started
    service = store.get_feature_service("recommend")

    def call(rows):
        return store.get_online_features(
            features=service, entity_rows=[{{"user": u, "article": a}} for u, a in rows]).to_dict()
    sample = call([job["sample"]])
    results = {{"load_seconds": round(loaded, 1),
               "sample": {{k: v[0] for k, v in sample.items()}}}}
    for size, batches in job["batches"].items():
        results[size] = repeated(lambda: measure(call, batches, job["rates"][size],
                                                 job["seconds"], job["warmup"]),
                                 job["repeats"])
    print(json.dumps(results))

main()
"""


def feast_service(python, workdir, redis_port, data, batches, rates, seconds, warmup,
                  repeats):
    """Figures of Feast's feature-service lookups, or the reason they were skipped.

    ``data``: ``total_readtime`` (per user), ``recent_articles`` (lists, per
    user), ``avg_length`` (per article); ``batches``: per batch size, lists of
    (user, article) rows."""
    if not python or not os.path.exists(python):
        return {"skipped": f"no Feast interpreter at {python!r} (python -m venv "
                           "/tmp/feastenv && /tmp/feastenv/bin/pip install 'feast[redis]')"}
    repo = Path(workdir) / "feast-redis"
    repo.mkdir()
    job = {"repo": str(repo), "redis_port": redis_port, "data": data,
           "sample": batches[min(batches)][0][0],
           "rates": {str(size): rate for size, rate in rates.items()},
           "seconds": seconds, "warmup": warmup, "repeats": repeats,
           "batches": {str(size): b for size, b in batches.items()}}
    (repo / "job.json").write_text(json.dumps(job))
    script = repo / "driver.py"
    script.write_text(FEAST_DRIVER.format(driver=DRIVER_SOURCE))
    done = subprocess.run([python, str(script), str(repo / "job.json")],
                          capture_output=True, text=True)
    if done.returncode:
        return {"skipped": f"the Feast driver failed: {done.stderr.strip()[-800:]}"}
    return json.loads(done.stdout.splitlines()[-1])
