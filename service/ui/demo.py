"""A registry and an online store to look at: the talk's model
(``tally.service.examples.recommend``) applied to a registry, a second
version of ``user_history`` applied over it, and the records the pipeline
would write for random reads of random articles, written with the store
API. The browser tests and the screenshots use it; ``python -m
tally.service.ui.demo DIR`` makes one to try ``tally ui`` on.
"""
import dataclasses
import sys
import time

import numpy as np

from tally.core.definitions import Feature
from tally.core.materialize import online_schema, records_for
from tally.core.view import ViewState
from tally.service.examples import recommend as model
from tally.service.ingest.service import publish_services
from tally.service.metrics import service_metrics
from tally.service.registry import Registry
from tally.service.store.lmdb import LmdbStore
from tally.service.ui.metrics import parse_prometheus, per_view

CATEGORIES = np.array(["news", "sports", "tech", "arts", "culture", "travel", "food"],
                      dtype=object)
DEFINITIONS = [model.user, model.article, model.read_events, model.articles,
               model.user_history, model.user_taste, model.article_info, model.recommend]
# v2 of user_history: one more feature, and a longer description
USER_HISTORY_V2 = dataclasses.replace(
    model.user_history, features=model.user_history.features + (Feature("reads", "count"),),
    description="What each user read: the last 5 articles, time spent, reads")


def events(users, articles, reads, seed):
    """(reads, articles) as column dicts: each article has one version, so a
    read's joined attributes are its article's."""
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000)
    table = {"article": np.arange(articles, dtype=np.int64),
             "category": CATEGORIES[rng.integers(0, len(CATEGORIES), articles)],
             "content_length": rng.integers(200, 5000, articles).astype(np.int64),
             "ts": np.full(articles, now - 86_400_000, dtype=np.int64)}
    article = rng.integers(0, articles, reads).astype(np.int64)
    stream = {"user": rng.integers(0, users, reads).astype(np.int64), "article": article,
              "readtime": rng.gamma(2.0, 30.0, reads).round(3),
              "ts": np.sort(rng.integers(now - 86_400_000, now, reads)).astype(np.int64),
              # the join's attributes, as the pipeline enriches each read
              "category": table["category"][article],
              "content_length": table["content_length"][article]}
    return stream, table


def build(registry_path, store_path, users=300, articles=40, reads=5000, seed=7):
    """Apply the model (user_history twice) and write its store; returns the
    events, {view: version} and the time the records are as of."""
    with Registry(registry_path) as registry:
        registry.apply(DEFINITIONS, origin="recommend.py", actor="demo")
        registry.apply([USER_HISTORY_V2], origin="recommend.py", actor="demo")
        versions = {v: registry.resolve(f"view:{v}").version
                    for v in ("user_history", "user_taste", "article_info")}
        service_version = registry.resolve("service:recommend").version
    stream, table = events(users, articles, reads, seed)
    views = [USER_HISTORY_V2, model.user_taste, model.article_info]
    as_of = int(stream["ts"].max()) + 1
    with LmdbStore(store_path) as store:
        for view in views:
            columns = table if view is model.article_info else stream
            write_view(store, view, versions[view.name], columns, as_of)
        publish_services(store, [(model.recommend, service_version)],
                         {v.name: v for v in views})
    return {"reads": stream, "articles": table, "versions": versions, "as_of": as_of}


def write_view(store, view, version, columns, as_of):
    state = ViewState(view)
    slots = state.apply({name: columns[name] for name, _ in view.input_source.schema})
    schema = online_schema(view, version)
    store.register_view(schema)
    store.write(view.name, state.index.keys_of(slots),
                records_for(state, schema, slots, as_of, as_of))


def service_hour(history, versions, now=None, step=60.0, seed=7):
    """The hour before ``now`` of the streaming service's metrics, as its
    ``/metrics`` showed them every ``step`` seconds (rendered by its own
    Metrics, parsed as a scrape is), added to ``history``; returns that
    Metrics advanced one step more, for an endpoint the next scrape reads.
    For the screenshots, which cannot wait an hour."""
    rng = np.random.default_rng(seed)
    now = time.time() if now is None else now
    metrics, events = service_metrics(), {}
    steps = int(3600 // step)
    for i in range(steps):
        _advance(metrics, versions, events, rng, step)
        history.add(now - 3600 + i * step, per_view(parse_prometheus(metrics.render())))
    _advance(metrics, versions, events, rng, step)
    return metrics


def _advance(metrics, versions, events, rng, step):
    for view, version in versions.items():
        for partition in range(2):
            labels = {"view": view, "version": version, "partition": partition}
            key = (view, partition)
            events[key] = events.get(key, 0) + int(rng.poisson(40 * step))
            metrics.set("tally_events_total", events[key], **labels)
            metrics.set("tally_freshness_seconds", round(0.05 + rng.gamma(2, 0.05), 3),
                        **labels)
            metrics.set("tally_event_time_lag_seconds", round(0.2 + rng.gamma(2, 0.2), 3),
                        **labels)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tally.service.ui.demo DIR")
    build(f"{sys.argv[1]}/registry.db", f"{sys.argv[1]}/store")
    print(f"tally ui --registry {sys.argv[1]}/registry.db --store {sys.argv[1]}/store")
