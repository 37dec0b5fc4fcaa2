"""Feature services: a model's whole feature vector in one call.

Definitions (Python and SQL agree; refusals name the fix), the registry
(versions, lineage, search, a view change that would break a service), and
the serving contract against pandas: the vectors the lookup server answers
over msgpack/TCP and HTTP, ``tally get --service`` and the embedded reader,
and ``training_set(spine, service=...)`` at a time after the last event, all
equal a pandas groupby of the same events.
"""
import http.client
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tally.core.definitions import Entity, Feature, FeatureService, FeatureView, Source
from tally.core.errors import DefinitionError
from tally.core.materialize import online_schema, records_for
from tally.core.serving import ServedService
from tally.core.sql import load_sql, service_to_sql
from tally.core.view import ViewState
from tally.service.ingest.service import publish_services
from tally.service.lookup.client import LookupClient, LookupServerError
from tally.service.registry import Registry
from tally.service.store.lmdb import LmdbStore
from tally.service.training import training_set

ANY_TIME = {"earliest_event_time": -2**62, "max_event_time_ahead": 2**62}
user = Entity("user", "int64")
article = Entity("article", "int64")
reads = Source("reads", "reads", schema={"user": "int64", "article": "int64",
                                         "readtime": "float64", "ts": "int64"}, **ANY_TIME)
user_reading = FeatureView("user_reading", user, reads, [
    Feature("total_readtime", "sum", "readtime"), Feature("reads", "count")])
article_stats = FeatureView("article_stats", article, reads, [
    Feature("avg_readtime", "mean", "readtime"), Feature("reads", "count")])
recommend = FeatureService("recommend", [
    "user_reading:total_readtime", "user_reading:reads as user_reads",
    "article_stats:avg_readtime", "article_stats:reads as article_reads"],
    owner="ml", tags=("ranking",))


# ---- definitions ------------------------------------------------------------------

def test_sql_and_python_define_the_same_service():
    text = """CREATE FEATURE SERVICE recommend WITH (owner = 'ml', tags = 'ranking') AS
              SELECT user_reading.total_readtime, user_reading.reads AS user_reads,
                     article_stats.avg_readtime, article_stats.reads AS article_reads"""
    assert load_sql(text) == [recommend]
    assert load_sql(service_to_sql(recommend)) == [recommend]
    assert FeatureService.from_dict(recommend.to_dict()) == recommend
    assert recommend.views == ("user_reading", "article_stats")


def test_a_feature_view_object_names_all_its_features():
    service = FeatureService("s", [user_reading])
    assert [f.ref() for f in service.features] == ["user_reading:total_readtime",
                                                   "user_reading:reads"]


@pytest.mark.parametrize("features, message", [
    (["user_reading:reads", "article_stats:reads"],
     "column 'reads' would answer both user_reading:reads and article_stats:reads; rename "
     "one, e.g. 'article_stats:reads as article_stats_reads'"),
    (["user_reading:reads", "user_reading:reads as n"], "user_reading:reads is listed twice"),
    (["user_reading"], "'user_reading' names a view; write 'view:feature'"),
    (["user_reading:reads as"], "write 'view:feature' or 'view:feature as name'"),
    (["user reading:reads"], "write 'view:feature' or 'view:feature as name'"),
    ([], "features is empty"),
    ([42], "42 is not a feature"),
])
def test_bad_services_are_refused_naming_the_fix(features, message):
    with pytest.raises(DefinitionError, match="feature service 's'") as error:
        FeatureService("s", features)
    assert message in str(error.value)


def test_features_are_checked_against_the_views():
    with pytest.raises(DefinitionError, match="view 'user_reading' has no feature 'readz'; "
                       "did you mean 'reads'"):
        FeatureService("s", ["user_reading:readz"]).validate({"user_reading": user_reading})
    with pytest.raises(DefinitionError, match="no view 'user_readin'; did you mean "
                       "'user_reading'"):
        FeatureService("s", ["user_readin:reads"]).validate({"user_reading": user_reading})
    other_user = FeatureView("by_name", Entity("user", "string"),
                             Source("s", "s", {"user": "string", "ts": "int64"}, **ANY_TIME),
                             [Feature("n", "count")])
    with pytest.raises(DefinitionError, match="entity 'user' with int64 and string keys"):
        FeatureService("s", ["user_reading:reads", "by_name:n"]).validate(
            {"user_reading": user_reading, "by_name": other_user})


# ---- the registry ----------------------------------------------------------------------

def test_registry_versions_lineage_search_and_refusals(tmp_path):
    registry = Registry(str(tmp_path / "registry.db"))
    with pytest.raises(DefinitionError, match="no view 'user_reading'; apply the view first"):
        registry.apply([recommend])
    assert registry.list() == []                     # all or nothing
    registry.apply([user_reading, article_stats, recommend])
    assert registry.get("recommend") == recommend
    assert registry.get("service:recommend@v1") == recommend
    lineage = registry.lineage("recommend")
    assert [(r.view, r.feature) for r in lineage] == [
        ("user_reading", "total_readtime"), ("user_reading", "reads"),
        ("article_stats", "avg_readtime"), ("article_stats", "reads")]
    assert [h.name for h in registry.search(view="article_stats")] == ["recommend"]
    assert [h.name for h in registry.search("article_re", kind="service")] == ["recommend"]
    assert [h.name for h in registry.search(tag="ranking")] == ["recommend"]

    # a view version without a feature the current service reads is refused
    smaller = FeatureView("user_reading", user, reads, [Feature("reads", "count")])
    with pytest.raises(DefinitionError, match="view 'user_reading' has no feature "
                       "'total_readtime'.*the service is in the registry"):
        registry.apply([smaller])
    # ... unless the service changes with it
    v2 = FeatureService("recommend", ["user_reading:reads as user_reads",
                                      "article_stats:avg_readtime"], owner="ml")
    plan = registry.apply([smaller, v2])
    assert {(i.kind, i.name, i.version) for i in plan if i.changed} == {
        ("view", "user_reading", 2), ("service", "recommend", 2)}
    changes = registry.diff("recommend").changes
    assert ("features.total_readtime", "user_reading:total_readtime", None) in changes
    registry.rollback("recommend")
    assert registry.get("recommend") == recommend


# ---- serving == pandas == training set -------------------------------------------------

def random_reads(seed=7, n=4000):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": rng.integers(0, 300, n), "article": rng.integers(0, 80, n),
                         "readtime": rng.gamma(2.0, 30.0, n).round(3),
                         "ts": np.sort(rng.integers(1_000, 1_000_000, n))})


def write_store(path, columns, views, services, version=1):
    """The online store the pipeline would write for the events ``columns``
    (a dict of arrays), with ``services`` published at ``version``; returns
    the time the records are as of."""
    as_of = int(columns["ts"].max()) + 1
    with LmdbStore(path) as store:
        for view in views:
            state = ViewState(view)
            slots = state.apply(columns)
            schema = online_schema(view)
            store.register_view(schema)
            store.write(view.name, state.index.keys_of(slots),
                        records_for(state, schema, slots, as_of, as_of))
        publish_services(store, [(s, version) for s in services], {v.name: v for v in views})
    return as_of


def pandas_vectors(events, rows):
    by_user = events.groupby("user").agg(total_readtime=("readtime", "sum"),
                                         user_reads=("readtime", "size"))
    by_article = events.groupby("article").agg(avg_readtime=("readtime", "mean"),
                                               article_reads=("readtime", "size"))
    expected = []
    for row in rows:
        vector = {}
        for frame, key, names in ((by_user, row["user"], ("total_readtime", "user_reads")),
                                  (by_article, row["article"],
                                   ("avg_readtime", "article_reads"))):
            for name in names:
                vector[name] = frame.at[key, name].item() if key in frame.index else None
        expected.append(vector)
    return expected


def assert_vectors_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert list(got) == list(want)                       # the service's column order
        for name in want:
            if want[name] is None or isinstance(want[name], int):
                assert got[name] == want[name], name
            else:
                assert got[name] == pytest.approx(want[name], rel=1e-12), name


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    events = random_reads()
    path = tmp_path_factory.mktemp("service-store")
    as_of = write_store(str(path), {c: events[c].to_numpy() for c in events.columns},
                        [user_reading, article_stats], [recommend])
    rng = np.random.default_rng(3)
    # rows with known and unknown users and articles, in both orders
    rows = [{"user": int(u), "article": int(a)}
            for u, a in zip(rng.integers(-5, 320, 150), rng.integers(-5, 90, 150))]
    return path, events, rows, as_of


def test_lookup_server_answers_vectors_equal_to_pandas(served):
    from tally.service.lookup.server import serve_in_background
    path, events, rows, _ = served
    expected = pandas_vectors(events, rows)
    with serve_in_background(str(path), port=0, http_port=0) as server:
        with LookupClient(port=server.port) as client:
            assert_vectors_equal(client.service("recommend", rows), expected)
            assert_vectors_equal(client.service("recommend", rows[0]), expected[:1])
            with pytest.raises(LookupServerError, match="row 0 has no 'article' key"):
                client.service("recommend", [{"user": 1}])
            with pytest.raises(LookupServerError) as error:
                client.service("nope", rows[:1])
            assert error.value.code == "unknown_service"
            with pytest.raises(LookupServerError) as error:
                client.service("recommend", [{"user": "1", "article": 2}])
            assert error.value.code == "bad_key"
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
        conn.request("POST", "/v1/services/recommend", body=json.dumps({"rows": rows}))
        reply = json.loads(conn.getresponse().read())
        assert reply["ok"] and reply["service"] == "recommend"
        assert_vectors_equal(reply["vectors"], expected)
        conn.request("POST", "/v1/services/recommend", body=json.dumps({"keys": [1]}))
        response = conn.getresponse()
        assert response.status == 400 and b"rows" in response.read()


def test_embedded_reads_and_tally_get_equal_pandas(served):
    path, events, rows, _ = served
    expected = pandas_vectors(events, rows[:5])
    with LmdbStore(str(path), readonly=True) as store:
        service = ServedService.from_bytes("recommend", store.service("recommend"))
        assert_vectors_equal(service.read(store, rows[:5]), expected)
    row = rows[0]
    done = subprocess.run([sys.executable, "-m", "tally", "get", "--store", str(path),
                           "--service", "recommend", f"user={row['user']}",
                           f"article={row['article']}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_vectors_equal([json.loads(done.stdout)["features"]], expected[:1])


def test_training_set_of_the_service_equals_the_online_vectors(served):
    path, events, rows, as_of = served
    spine = pd.DataFrame({"user": [r["user"] for r in rows],
                          "article": [r["article"] for r in rows], "ts": as_of})
    table = training_set(spine, service=recommend, sources=events,
                         views=[user_reading, article_stats])
    assert table.column_names == ["user", "article", "ts", "total_readtime", "user_reads",
                                  "avg_readtime", "article_reads"]
    offline = [{name: table.column(name)[i].as_py() for name in table.column_names[3:]}
               for i in range(len(rows))]
    assert_vectors_equal(offline, pandas_vectors(events, rows))


def test_services_in_the_store_follow_the_registry(tmp_path):
    with LmdbStore(str(tmp_path / "store")) as store:
        views = {v.name: v for v in (user_reading, article_stats)}
        publish_services(store, [(recommend, 3)], views)
        stored = ServedService.from_bytes("recommend", store.service("recommend"))
        assert stored == ServedService.of(recommend, views, 3)
        assert [c.entity for c in stored.columns] == ["user", "user", "article", "article"]
        assert store.services() == ["recommend"] and store.views() == []
        publish_services(store, [], views, drop_others=True)
        assert store.services() == []


def test_one_users_candidates_read_each_key_once_and_equal_pandas(served, tmp_path):
    """Ranking candidates: one user and 100 articles (some twice, some
    unknown), with request-time columns. Each distinct key is read once, and
    the vectors -- through ServedService.read and the lookup server -- equal
    pandas."""
    from tally.core.definitions import Derived
    from tally.service.lookup.server import serve_in_background
    _, events, _, _ = served
    user_recent = FeatureView("user_recent", user, reads, [
        Feature("recent", "last_n", "article", n=3)])
    candidates = FeatureService(
        "candidates", ["user_reading:total_readtime", "user_recent:recent",
                       "article_stats:avg_readtime"],
        computed=[Derived("seen", "CONTAINS(user_recent.recent, request.article)"),
                  Derived("longer", "article_stats.avg_readtime * 100 > total_readtime"),
                  Derived("current_article", "request.article")])
    path = str(tmp_path / "store")
    write_store(path, {c: events[c].to_numpy() for c in events.columns},
                [user_reading, user_recent, article_stats], [candidates])
    heavy = int(events.user.value_counts().index[0])
    articles = list(range(-3, 94)) + [5, 5, 40]
    rows = [{"user": heavy, "article": a} for a in articles]
    recent = events[events.user == heavy].article.tolist()[-3:][::-1]
    total = events[events.user == heavy].readtime.sum()
    mean = events.groupby("article").readtime.mean()
    expected = [{"total_readtime": total, "recent": recent,
                 "avg_readtime": mean[a].item() if a in mean.index else None,
                 "seen": int(a in recent),
                 "longer": int(mean[a] * 100 > total) if a in mean.index else None,
                 "current_article": a} for a in articles]
    asked = []

    class Counting:
        def get_many(self, view, keys):
            asked.append((view, list(keys)))
            return store.get_many(view, keys)

    with LmdbStore(path, readonly=True) as store:
        service = ServedService.from_bytes("candidates", store.service("candidates"))
        assert_vectors_equal(service.read(Counting(), rows), expected)
    assert asked == [("user_reading", [heavy]), ("user_recent", [heavy]),
                     ("article_stats", list(range(-3, 94)))]
    with serve_in_background(path, port=0) as server:
        with LookupClient(port=server.port) as client:
            assert_vectors_equal(client.service("candidates", rows), expected)
            # a ranker's matrix: the same values a column at a time
            columns = client.service_columns("candidates", rows)
            assert list(columns) == list(expected[0])
            assert_vectors_equal([dict(zip(columns, r)) for r in zip(*columns.values())],
                                 expected)
            by_rows = client.request({"op": "service", "service": "candidates",
                                      "rows": rows[:2]})
            assert_vectors_equal(by_rows["vectors"], expected[:2])      # the default layout
            with pytest.raises(LookupServerError, match="'layout' is 'rows'"):
                client.request({"op": "service", "service": "candidates", "rows": rows[:1],
                                "layout": "matrix"})
