"""The registry: validation at apply time, versions, pinning, rollback, the
deployment cycle, discovery, lineage, and concurrent apply from two processes."""
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from tally.core.definitions import (DefinitionError, Entity, Feature, FeatureView, Source,
                                    Window, content_hash, duration_ms, state_hash)
from tally.service.registry import (Conflict, NotFound, Registry, RegistryError, collect,
                                    load_file)

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "service", "examples")

user = Entity("user", "int64")
read_events = Source("read_events", "read_events",
                     schema={"user": "int64", "article": "int64", "readtime": "float64",
                             "country": "string", "ts": "int64"})
reading = FeatureView("reading", user, read_events,
                      [Feature("total", "sum", "readtime"), Feature("reads", "count")],
                      owner="team-a", description="Reading totals", tags=("reading",))


@pytest.fixture
def registry(tmp_path):
    with Registry(str(tmp_path / "registry.db")) as r:
        yield r


def with_features(view, *features, **changes):
    return dataclasses.replace(view, features=view.features + features, **changes)


def error_of(make):
    with pytest.raises(DefinitionError) as error:
        make()
    return str(error.value)


# --------------------------------------------------------------------------
# validation: every error names the definition, the field and a fix

def view_with(*features, **kwargs):
    return FeatureView("v", user, read_events, features, **kwargs)


@pytest.mark.parametrize("make, message", [
    # unknown column
    (lambda: view_with(Feature("t", "sum", "readtme")),
     "view 'v', feature 't': column 'readtme' is not a field of source 'read_events'; did you "
     "mean 'readtime'? use one of user, article, readtime, country, ts"),
    (lambda: view_with(Feature("t", "sum")),
     "view 'v', feature 't': column is missing; sum aggregates a column: name one of user, "
     "article, readtime, country, ts"),
    # aggregation of the wrong type
    (lambda: view_with(Feature("t", "sum", "country")),
     "view 'v', feature 't': aggregation sum needs a numeric column, but column 'country' is "
     "string; aggregate a numeric column, or use count, first, last, last_n, distinct_count, "
     "top_k, histogram for a string column"),
    (lambda: view_with(Feature("t", "mean", "country")),
     "view 'v', feature 't': aggregation mean needs a numeric column, but column 'country' "
     "is string"),
    (lambda: view_with(Feature("t", "max", "country")),
     "view 'v', feature 't': aggregation max needs a numeric column, but column 'country' "
     "is string"),
    (lambda: view_with(Feature("t", "p99", "readtime")),
     "view 'v', feature 't': aggregation 'p99' is unknown; use one of count, sum, mean, "
     "min, max, first, last, last_n, distinct_count, top_k, histogram"),
    (lambda: view_with(Feature("t", "summ", "readtime")),
     "view 'v', feature 't': aggregation 'summ' is unknown; did you mean 'sum'? use one of"),
    (lambda: view_with(Feature("t", "count", "readtime")),
     "view 'v', feature 't': column 'readtime' is set, but count counts events and takes no "
     "column; drop the column, or count the events where it is set with "
     "filter=\"readtime IS NOT NULL\""),
    (lambda: view_with(Feature("t", "last_n", "readtime")),
     "view 'v', feature 't': n is missing; last_n needs n, e.g. n=10"),
    (lambda: view_with(Feature("t", "top_k", "article", k=5000)),
     "view 'v', feature 't': k=5000 is out of range; use an integer from 1 to 1024"),
    (lambda: view_with(Feature("t", "last_n", "article", n=5000)),
     "view 'v', feature 't': n=5000 is out of range; use an integer from 1 to 4096"),
    (lambda: view_with(Feature("t", "sum", "readtime", n=3)),
     "view 'v', feature 't': n=3 does not apply to sum; sum takes no parameter: drop n"),
    (lambda: view_with(Feature("t", "top_k", "article", n=3, k=2)),
     "view 'v', feature 't': n=3 does not apply to top_k; k is the parameter of top_k: drop n"),
    # a hop that does not divide the window
    (lambda: view_with(Feature("t", "count", window=Window.sliding("1h", "25m"))),
     "view 'v', feature 't': window hop 25m does not divide the window size 1h; use a hop "
     "that divides it, e.g. 20m or 30m"),
    (lambda: view_with(Feature("t", "count", window=Window.sliding("7d", "5h"))),
     "view 'v', feature 't': window hop 5h does not divide the window size 7d; use a hop "
     "that divides it, e.g. 4h or 6h"),
    (lambda: view_with(Feature("t", "count", window=Window(0, 1000))),
     "view 'v', feature 't': window has a hop (1s) but no size; use Window.lifetime() or "
     "give the window a size"),
    (lambda: view_with(Feature("t", "count", window=Window(-5, 1))),
     "view 'v', feature 't': window size and hop must be positive durations"),
    (lambda: view_with(Feature("t", "count", lateness_ms=-1)),
     "view 'v', feature 't': lateness_ms -1 is negative; use 0 or a positive duration such "
     "as '5m'"),
    (lambda: view_with(Feature("t", "count", lateness_ms="5m")),
     "view 'v', feature 't': lateness_ms is set, but a lifetime window accepts events of any "
     "age; drop lateness_ms, or give the feature a window"),
    # duplicate names
    (lambda: view_with(Feature("t", "count"), Feature("t", "sum", "readtime")),
     "view 'v': feature name 't' is used twice; give each feature a distinct name"),
    # the entity key missing from the source
    (lambda: FeatureView("v", Entity("member", "int64"), read_events, [Feature("n", "count")]),
     "view 'v': key_column 'member' (the key of entity 'member') is not a field of source "
     "'read_events'; add it to the source's schema, or set key_column to the field holding "
     "the member key (fields: user, article, readtime, country, ts)"),
    (lambda: FeatureView("v", Entity("usr", "int64"), read_events, [Feature("n", "count")]),
     "view 'v': key_column 'usr' (the key of entity 'usr') is not a field of source "
     "'read_events'; did you mean 'user'? add it to the source's schema"),
    (lambda: FeatureView("v", Entity("user", "string"), read_events, [Feature("n", "count")]),
     "view 'v': key_column 'user' is int64 in source 'read_events', but entity 'user' has "
     "string keys; set key_column to a string field, or declare the entity with "
     "key_type='int64'"),
    # filters
    (lambda: view_with(Feature("t", "count", filter="readtme > 0")),
     "view 'v', feature 't': filter 'readtme > 0': column 'readtme' is not a field of the "
     "source; did you mean 'readtime'? use one of user, article, readtime, country, ts"),
    (lambda: view_with(Feature("t", "count", filter="country > 1")),
     "view 'v', feature 't': filter 'country > 1': 'country > 1' compares values of different "
     "types"),
    (lambda: Feature("t", "count", filter="readtime >"),
     "feature 't': filter 'readtime >': syntax error: line 1, col 10"),
    # names, metadata and sources
    (lambda: view_with(Feature("my feature", "count")),
     "view 'v', feature 'my feature': name 'my feature' is not a valid name; use letters, "
     "digits and underscores, starting with a letter (e.g. 'user_reading')"),
    (lambda: view_with(Feature("_t", "count")),
     "name '_t' is not a valid name"),
    (lambda: FeatureView("v@2", user, read_events, [Feature("n", "count")]),
     "view 'v@2': name 'v@2' is not a valid name"),
    (lambda: view_with(),
     "view 'v': features is empty; add at least one Feature"),
    (lambda: view_with(Feature("n", "count"), tags=("a,b",)),
     "view 'v': tag 'a,b' is not valid; tags are non-empty strings without commas"),
    (lambda: view_with(Feature("n", "count"), online_expiry="soon"),
     "view 'v': online_expiry: duration 'soon': write a number and a unit (ms, s, m, h, d or "
     "w), e.g. '7d' or '1h'"),
    (lambda: Entity("user", "uuid"),
     "entity 'user': key_type 'uuid' is not one of ('int64', 'string'); use 'int64' or "
     "'string'"),
    (lambda: Source("s", "t", {"k": "int64", "ts": "timestamp"}),
     "source 's': schema field 'ts' has type 'timestamp'; use one of ('int64', 'float64', "
     "'string', 'bool')"),
    (lambda: Source("s", "t", {"k": "int64", "time": "int64"}),
     "source 's': timestamp_field 'ts' must be an int64 field of the schema (event time in "
     "epoch milliseconds); fields: k, time"),
    (lambda: Source("s", "t", {"k": "int64", "ts": "int64"}, format="avro"),
     "source 's': format 'avro' is not supported; use one of msgpack, json, arrow"),
    (lambda: Source("s", "", {"k": "int64", "ts": "int64"}),
     "source 's': topic is empty; name the Pulsar topic"),
    (lambda: Source("s", "t", (("k", "int64"), ("k", "int64"), ("ts", "int64"))),
     "source 's': schema field 'k' is listed twice; list each field once"),
])
def test_validation_errors(make, message):
    assert message in error_of(make)


def test_duplicate_names_across_definitions_are_refused(registry):
    other = with_features(reading, Feature("more", "count"))
    assert error_of(lambda: registry.apply([reading, other])) == (
        "view 'reading' is defined twice with different content (in the definitions and the "
        "definitions); give each view a distinct name, or use one FeatureView object for both")
    renamed_source = dataclasses.replace(read_events, topic="elsewhere")
    assert error_of(lambda: registry.apply(
        [reading, dataclasses.replace(reading, name="b", source=renamed_source)])) == (
        "source 'read_events' is defined twice with different content (in view 'reading' and "
        "view 'b'); give each source a distinct name, or use one Source object for both")
    # the same object twice is fine
    assert len(collect([reading, reading, read_events, user])) == 3
    assert registry.sequence() == 0          # nothing was stored


def test_durations():
    assert duration_ms("7d") == 7 * 86_400_000
    assert duration_ms("7 days") == duration_ms("1w") == duration_ms("7DAYS")
    assert duration_ms("250ms") == 250 and duration_ms(5) == 5
    with pytest.raises(DefinitionError):
        duration_ms("7 fortnights")


# --------------------------------------------------------------------------
# the content hash

def test_content_hash_is_stable_and_content_based():
    # a golden value: changing the canonical form changes every stored hash;
    # if this fails on purpose, plan a migration of stored versions
    assert content_hash(reading) == \
        "95b69d858371d67ea7d33c855545ff9391c4f21e11df2593154103c6ede019e8"
    same = FeatureView("reading", Entity("user"), Source(
        "read_events", "read_events", (("user", "int64"), ("article", "int64"),
                                       ("readtime", "float64"), ("country", "string"),
                                       ("ts", "int64"))),
        (Feature("total", "sum", "readtime", Window.lifetime()), Feature("reads", "count")),
        owner="team-a", description="Reading totals", tags=["reading", "reading"])
    assert same == reading and content_hash(same) == content_hash(reading)
    assert content_hash(with_features(reading, Feature("x", "count"))) != content_hash(reading)
    assert content_hash(dataclasses.replace(reading, description="other")) != \
        content_hash(reading)
    # the state hash ignores metadata
    assert state_hash(dataclasses.replace(reading, description="other", tags=(),
                                          online_expiry="1d")) == state_hash(reading)
    assert state_hash(with_features(reading, Feature("x", "count"))) != state_hash(reading)


def test_filters_hash_by_their_canonical_text():
    a = Feature("n", "count", filter="readtime>0 and (country='de')")
    b = Feature("n", "count", filter="readtime > 0 AND country = 'de'")
    assert a == b and a.filter == "readtime > 0 AND country = 'de'"


def test_definitions_round_trip_through_their_canonical_form():
    from tally.core.definitions import canonical_document, from_document
    for d in load_file(os.path.join(EXAMPLES, "reading.py")):
        assert from_document(json.loads(json.dumps(canonical_document(d)))) == d


# --------------------------------------------------------------------------
# versions, pinning and rollback

def test_apply_versions_and_unchanged_content(registry):
    plan = registry.apply([reading])
    assert [(i.kind, i.name, i.action, i.version) for i in plan] == [
        ("entity", "user", "create", 1), ("source", "read_events", "create", 1),
        ("view", "reading", "create", 1)]
    seq = registry.sequence()
    plan = registry.apply([reading])
    assert [i.action for i in plan] == ["unchanged"] * 3
    assert registry.sequence() == seq                   # nothing was created
    assert len(registry.versions("reading")) == 1

    v2 = with_features(reading, Feature("reads_1h", "count", window=Window.tumbling("1h")))
    plan = registry.apply([v2])
    assert [(i.name, i.action, i.version, i.previous) for i in plan if i.changed] == \
        [("reading", "create", 2, 1)]
    assert plan[-1].changes == (("features.reads_1h", None, "count(*) tumbling 1h"),)
    assert registry.get("reading") == v2                 # the name resolves to current
    assert registry.get("reading@v1") == reading         # a pin
    assert registry.get("reading@1") == reading
    assert registry.get("view:reading@v2") == v2
    assert registry.get(f"reading@{content_hash(reading)[:10]}") == reading
    assert registry.get("reading.reads_1h") == v2.feature("reads_1h")
    assert registry.get("reading.total@v1") == reading.feature("total")
    assert [v.state for v in registry.versions("reading")] == ["retired", "current"]
    assert registry.resolve("reading").hash == content_hash(v2)


def test_rollback_and_reactivation(registry):
    versions = [reading] + [with_features(reading, Feature(f"f{i}", "count"))
                            for i in range(1, 4)]
    for v in versions:
        registry.apply([v])
    assert registry.resolve("reading").version == 4
    assert registry.rollback("reading").version == 3        # one step back
    assert registry.rollback("reading").version == 2        # and another
    assert registry.get("reading") == versions[1]
    assert registry.rollback("reading", to="v4").version == 4
    assert registry.rollback("reading@v1").version == 1
    with pytest.raises(RegistryError, match="already current"):
        registry.rollback("reading", to=1)
    with pytest.raises(RegistryError, match="no version before v1 has been current"):
        registry.rollback("reading")
    with pytest.raises(NotFound, match="has no version v9"):
        registry.rollback("reading", to=9)
    # applying old content again re-points to its version; no new version
    plan = registry.apply([versions[2]])
    assert (plan[-1].action, plan[-1].version) == ("reactivate", 3)
    assert registry.resolve("reading").version == 3 and len(registry.versions("reading")) == 4
    events = [(c.version, c.event) for c in registry.changes() if c.name == "reading"]
    assert (1, "rolled_back") in events and events[-1] == (3, "promoted")


def test_lookup_errors(registry):
    registry.apply([reading])
    with pytest.raises(NotFound, match="no definition named 'readin' in the registry; did you "
                                       "mean 'reading'?"):
        registry.get("readin")
    with pytest.raises(NotFound, match="view 'reading' has no version v7"):
        registry.get("reading@v7")
    with pytest.raises(NotFound, match="has no feature 'nope'"):
        registry.get("reading.nope")
    with pytest.raises(RegistryError, match="pin a version as reading@v3"):
        registry.get("reading@latest")
    # a name used by two kinds: a bare name prefers the view; kind: picks
    registry.apply([dataclasses.replace(reading, name="user", key_column="user")])
    assert isinstance(registry.get("user"), FeatureView)
    assert registry.get("entity:user") == user


def test_error_hierarchy():
    assert issubclass(RegistryError, RuntimeError)
    assert issubclass(NotFound, RegistryError) and issubclass(NotFound, KeyError)
    assert issubclass(Conflict, RegistryError)
    assert str(NotFound("view 'v' has no version v9")) == "view 'v' has no version v9"


# --------------------------------------------------------------------------
# the deployment cycle

def test_managed_deployment_cycle(registry):
    registry.apply([reading])                         # immediate: v1 current
    registry.set_deploy_mode("managed")
    since = registry.sequence()
    v2 = with_features(reading, Feature("x", "count"))
    plan = registry.apply([v2])
    assert (plan[-1].action, plan[-1].state) == ("create", "candidate")
    assert registry.get("reading") == reading         # still the old one
    (deployment,) = registry.deployments()
    assert (deployment.current.version, deployment.candidate.version) == (1, 2)
    assert not deployment.same_state
    assert [(c.version, c.event) for c in registry.changes(since)] == \
        [(2, "created"), (2, "candidate")]
    assert registry.diff("reading").changes == (("features.x", None, "count(*) lifetime"),)

    # a newer apply supersedes the candidate
    v3 = with_features(reading, Feature("y", "count"))
    registry.apply([v3])
    assert registry.versions("reading")[1].state == "cancelled"
    with pytest.raises(Conflict, match="reading@v2 is not the candidate \\(it is cancelled; "
                                       "the candidate is v3\\)"):
        registry.promote("reading", 2)
    # the service caught up
    since = registry.sequence()
    assert registry.promote("reading", 3).state == "current"
    assert registry.get("reading") == v3
    assert [(c.version, c.event) for c in registry.changes(since)] == \
        [(1, "retired"), (3, "promoted")]

    # a failure leaves the current version serving
    registry.apply([with_features(reading, Feature("z", "count"))])
    registry.mark_failed("reading", 4, "bootstrap ran out of memory")
    assert registry.get("reading") == v3 and registry.versions("reading")[3].state == "failed"
    assert registry.changes()[-1].detail == "bootstrap ran out of memory"

    # only metadata changed: nothing to compute, current at once
    plan = registry.apply([dataclasses.replace(v3, description="new words")])
    assert plan[-1].state == "current" and registry.get("reading").description == "new words"

    # a rollback cancels a pending candidate
    registry.apply([with_features(reading, Feature("w", "count"))])
    assert registry.deployments()[0].candidate is not None
    registry.rollback("reading", to=3)
    assert registry.deployments()[0].candidate is None
    # applying the current content again cancels a candidate too
    registry.apply([with_features(reading, Feature("w", "count"))])
    plan = registry.apply([v3])
    assert plan[-1].action == "cancel-candidate"
    assert registry.deployments()[0].candidate is None


def test_first_version_in_managed_mode_waits_for_the_service(registry):
    registry.set_deploy_mode("managed")
    registry.apply([reading])
    assert registry.get("source:read_events") == read_events      # sources: at once
    with pytest.raises(NotFound, match="view 'reading' has no current version yet \\(v1 is "
                                       "deploying\\); pin it as reading@v1"):
        registry.get("reading")
    assert registry.get("reading@v1") == reading
    registry.promote("reading", 1)
    assert registry.get("reading") == reading


def test_change_sequence_and_waiting(registry):
    assert registry.sequence() == 0 and registry.wait_for_changes(0, timeout=0.05) == []
    registry.apply([reading])
    changes = registry.changes()
    assert [c.seq for c in changes] == list(range(1, len(changes) + 1))
    assert registry.wait_for_changes(0, timeout=0.05) == changes
    assert registry.changes(changes[-1].seq) == []
    with pytest.raises(RegistryError):
        registry.set_deploy_mode("sometimes")


def test_another_process_sees_changes(tmp_path):
    path = str(tmp_path / "r.db")
    with Registry(path) as watcher, Registry(path) as writer:
        since = watcher.sequence()
        writer.apply([reading])
        assert {c.name for c in watcher.wait_for_changes(since, timeout=5)} == \
            {"user", "read_events", "reading"}


# --------------------------------------------------------------------------
# discovery

@pytest.fixture
def examples(registry):
    registry.apply(load_file(os.path.join(EXAMPLES, "reading.py")))
    return registry


def names(hits):
    return [(h.kind, h.name) for h in hits]


def test_search(examples):
    assert names(examples.search("reading")) == [        # names, descriptions, tags
        ("view", "article_popularity"), ("view", "user_reading"), ("view", "user_reading_7d")]
    assert names(examples.search("popular")) == [("view", "article_popularity")]
    hit = examples.search("LONG_reads")[0]
    assert (hit.name, hit.features) == ("user_reading_7d", ("long_reads_7d",))
    assert names(examples.search(tag="articles")) == [("view", "article_popularity")]
    assert names(examples.search(owner="quickstart")) == [("view", "user_reading"),
                                                          ("view", "user_reading_7d")]
    assert names(examples.search(entity="article")) == [("view", "article_popularity"),
                                                        ("entity", "article")]
    assert len(examples.search(source="read_events", kind="view")) == 3
    assert names(examples.search(topic="read_events", kind="source")) == \
        [("source", "read_events")]
    assert names(examples.search("7d", tag="reading", owner="quickstart")) == \
        [("view", "user_reading_7d")]
    assert examples.search("nothing like it") == []
    assert examples.search("50%") == [] and examples.search("_7d")[0].name == "user_reading_7d"


def test_list_and_describe(examples):
    listed = [(i.kind, i.name, i.version, i.state) for i in examples.list()]
    assert listed == [("view", "article_popularity", 1, "current"),
                      ("view", "user_reading", 1, "current"),
                      ("view", "user_reading_7d", 1, "current"),
                      ("source", "read_events", 1, "current"),
                      ("entity", "article", 1, "current"), ("entity", "user", 1, "current")]
    text = str(examples.describe("user_reading_7d"))
    assert "view user_reading_7d@v1 (current)" in text
    assert "long_reads_7d    count(*) sliding 7d hop 1h where readtime > 0 AND readtime >= 60" \
        in text
    assert "expiry      30d" in text
    data = examples.describe("user_reading_7d").to_dict()
    assert data["ref"] == "user_reading_7d@v1" and "WINDOW SLIDING 7 DAYS HOP 1 HOUR" in \
        data["sql"]
    assert "topic       read_events" in str(examples.describe("read_events"))


def test_diff(examples):
    old = examples.get("user_reading_7d")
    changed = dataclasses.replace(
        old, description="Reading, last week",
        tags=("reading",),
        features=[dataclasses.replace(old.features[0], window=Window.sliding("7d", "1d")),
                  old.features[1], Feature("mean_7d", "mean", "readtime", old.features[0].window)])
    examples.apply([changed])
    diff = examples.diff("user_reading_7d@v1", "user_reading_7d@v2")
    assert diff.changes == (
        ("features.readtime_7d.window", "sliding 7d hop 1h", "sliding 7d hop 1d"),
        ("features.long_reads_7d", "count(*) sliding 7d hop 1h where readtime > 0 AND "
                                   "readtime >= 60", None),
        ("features.recent_articles", "last_n(article, 10) sliding 7d hop 1h where readtime > 0",
         None),
        ("features.mean_7d", None, "mean(readtime) sliding 7d hop 1h"),
        ("description", "Reading in the last 7 days, hop 1 hour", "Reading, last week"),
        ("tags", "quickstart", None))
    assert examples.diff("user_reading_7d").changes == diff.changes
    assert str(diff).splitlines()[:2] == [
        "view user_reading_7d@v1 -> user_reading_7d@v2",
        "  ~ features.readtime_7d.window: sliding 7d hop 1h -> sliding 7d hop 1d"]
    with pytest.raises(RegistryError, match="is the first version"):
        examples.diff("user_reading@v1")
    # sources diff by field
    wider = dataclasses.replace(old.source, schema=old.source.schema + (("country", "string"),))
    examples.apply([wider])
    assert examples.diff("read_events").changes == (("schema.country", None, "string"),)


def test_lineage_both_directions(examples):
    (row,) = examples.lineage("user_reading_7d.long_reads_7d")
    assert (row.view, row.version, row.feature, row.source, row.topic, row.fields) == (
        "user_reading_7d", 1, "long_reads_7d", "read_events", "read_events",
        (("readtime", "filter"), ("user", "key"), ("ts", "event_time")))
    assert str(row) == ("user_reading_7d.long_reads_7d -> view user_reading_7d@v1 (current) -> "
                        "source read_events -> topic read_events -> fields readtime (filter), "
                        "user (key), ts (event_time)")
    assert [r.feature for r in examples.lineage("article_popularity")] == \
        ["reads_1h", "readers_1d", "mean_readtime"]

    readers = examples.readers(topic="read_events")
    assert len(readers) == 9
    by_field = examples.readers(topic="read_events", field="article")
    assert [(r.view, r.feature) for r in by_field] == [
        ("article_popularity", "reads_1h"), ("article_popularity", "readers_1d"),
        ("article_popularity", "mean_readtime"), ("user_reading_7d", "recent_articles")]
    # rows carry all the fields the feature reads, not only the one asked for
    assert by_field[-1].fields == (("article", "value"), ("readtime", "filter"),
                                   ("user", "key"), ("ts", "event_time"))
    assert examples.readers(source="read_events", field="readtime")[0].fields[0] == \
        ("readtime", "value")
    assert examples.readers(topic="no_such_topic") == []

    # retired versions only with all_versions
    examples.apply([dataclasses.replace(examples.get("user_reading"),
                                        features=[Feature("reads", "count")])])
    current = {(r.view, r.feature) for r in examples.readers(topic="read_events",
                                                             field="readtime")}
    assert ("user_reading", "total_readtime") not in current
    everything = examples.readers(topic="read_events", field="readtime", all_versions=True)
    assert ("user_reading", 1, "retired", "total_readtime") in \
        {(r.view, r.version, r.state, r.feature) for r in everything}
    with pytest.raises(RegistryError, match="is not a view"):
        examples.lineage("read_events")


def test_reprs_for_humans_and_notebooks(examples):
    view = examples.get("user_reading_7d")
    assert repr(view).startswith("FeatureView('user_reading_7d', entity=user:int64, "
                                 "source=read_events (topic 'read_events')")
    assert "readtime_7d = sum(readtime) sliding 7d hop 1h where readtime > 0" in repr(view)
    assert "<table>" in view._repr_html_() and "readtime_7d" in view._repr_html_()
    assert repr(view.features[3]) == ("Feature('recent_articles', 'last_n', 'article', "
                                      "window=Window.sliding('7d', '1h'), "
                                      "filter='readtime > 0', n=10)")
    assert repr(user) == "Entity('user', key_type='int64')"
    for obj in (examples.describe("user_reading_7d"), examples.resolve("user_reading"),
                examples.lineage("user_reading"), examples.search("read"),
                examples.plan([view]), examples.get("read_events"), user):
        assert "<" in obj._repr_html_()


# --------------------------------------------------------------------------
# storage: schema migrations and concurrent apply from two processes

def test_schema_version_and_wal(tmp_path):
    path = str(tmp_path / "r.db")
    with Registry(path) as r:
        assert r.schema_version == 1 and r.deploy_mode == "immediate"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="schema version 99, newer than this Tally's"):
        Registry(path)


def test_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_REGISTRY", str(tmp_path / "env.db"))
    with Registry() as r:
        assert r.path == str(tmp_path / "env.db")
    monkeypatch.delenv("TALLY_REGISTRY")
    monkeypatch.chdir(tmp_path)
    with Registry() as r:
        assert r.path == os.path.join(".tally", "registry.db")
    assert os.path.exists(tmp_path / ".tally" / "registry.db")


APPLIER = textwrap.dedent("""
    import dataclasses, json, os, random, sys, time
    from tally.service.registry import Registry
    from tally.service.quickstart import user_reading

    path, me, rounds, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    open(go + "." + me, "w").close()        # ready
    while not os.path.exists(go):           # start together
        time.sleep(0.001)
    created, start = [], time.time()
    with Registry(path) as registry:        # both create the file at the same time
        for i in range(rounds):
            shared = dataclasses.replace(user_reading, name="shared")
            mine = dataclasses.replace(user_reading, description=f"{me} round {i}")
            for item in registry.apply([shared, mine]):
                if item.action == "create":
                    created.append([item.name, item.version])
            time.sleep(random.random() * 0.004)   # let the other process in
    print(json.dumps({"created": created, "start": start, "end": time.time()}))
""")


def test_concurrent_apply_from_two_processes(tmp_path):
    path, go, rounds = str(tmp_path / "registry.db"), str(tmp_path / "go"), 25
    processes = [subprocess.Popen([sys.executable, "-c", APPLIER, path, me, str(rounds), go],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for me in ("a", "b")]
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{go}.{me}") for me in ("a", "b")):
        assert time.monotonic() < deadline, "the appliers did not start"
        time.sleep(0.01)
    open(go, "w").close()
    outputs = []
    for p in processes:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append(json.loads(out))
    created = [tuple(x) for out in outputs for x in out["created"]]
    # the two processes were applying at the same time
    assert max(o["start"] for o in outputs) < min(o["end"] for o in outputs)

    with Registry(path) as registry:
        # identical content applied by both: exactly one version, created once
        assert len(registry.versions("shared")) == 1
        assert sum(1 for name, _ in created if name == "shared") == 1
        for kind_name in ("entity:user", "source:read_events"):
            assert len(registry.versions(kind_name)) == 1
        # distinct contents: one version each, numbered 1..2n without gaps or twins
        versions = registry.versions("user_reading")
        assert [v.version for v in versions] == list(range(1, 2 * rounds + 1))
        assert len({v.hash for v in versions}) == 2 * rounds
        assert sorted(v for name, v in created if name == "user_reading") == \
            list(range(1, 2 * rounds + 1))
        assert [v.state for v in versions].count("current") == 1
        assert registry.resolve("user_reading").version == 2 * rounds
        seqs = [c.seq for c in registry.changes()]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_joined_view_is_applied_with_its_dimension_and_traced_to_it(registry):
    from tally.core.definitions import Join
    articles = Source("articles", "articles_changelog",
                      {"article": "int64", "category": "string", "ts": "int64"})
    reads = Source("reads", "reads", {"user": "int64", "article": "int64", "ts": "int64"})
    view = FeatureView("taste", Entity("user"), reads, [
        Feature("sports", "count", filter="category = 'sports'"),
        Feature("reads", "count"),
        Feature("last_category", "last", "category")], joins=[Join(articles, on="article")])
    registry.apply([view])
    assert registry.get("articles") == articles          # the dimension, applied with it
    assert registry.get("taste") == view
    rows = {(r.feature, r.source): r.fields for r in registry.lineage("taste")}
    assert rows[("last_category", "articles")] == (
        ("category", "value"), ("article", "dimension_key"), ("ts", "version_time"))
    assert rows[("last_category", "reads")] == (
        ("article", "join_key"), ("user", "key"), ("ts", "event_time"))
    assert ("reads", "articles") not in rows               # reads no attribute
    readers = registry.readers(topic="articles_changelog")
    # each reading feature with all it reads: the events and the dimension
    assert sorted((r.feature, r.source) for r in readers) == [
        ("last_category", "articles"), ("last_category", "reads"),
        ("sports", "articles"), ("sports", "reads")]
    assert [h.name for h in registry.search(source="articles") if h.kind == "view"] == ["taste"]


def test_derived_features_and_request_time_columns_are_traced_to_what_they_read(registry):
    """The talk's model: top_category (a derived feature of a histogram over
    a join) reads what its histogram reads; the service's in_top_category
    reads what article_info.category and user_taste.top_category read."""
    registry.apply(load_file(os.path.join(EXAMPLES, "recommend.py")))
    rows = {(r.feature, r.source): r.fields for r in registry.lineage("user_taste")}
    assert rows[("top_category", "articles")] == rows[("categories", "articles")] == (
        ("category", "value"), ("article", "dimension_key"), ("ts", "version_time"))
    assert rows[("reading_diversity", "read_events")] == rows[("categories", "read_events")]
    service = registry.lineage("recommend")
    computed = {(r.view, r.source) for r in service if r.feature == "in_top_category"}
    assert computed == {("article_info", "articles"), ("user_taste", "read_events"),
                        ("user_taste", "articles")}
    assert {r.feature for r in service} >= {"top_category", "just_read"}
    assert "current_article" not in {r.feature for r in service}   # reads the request only
    readers = registry.readers(topic="articles", field="category")
    assert {(r.view, r.feature) for r in readers} >= {
        ("user_taste", "categories"), ("user_taste", "top_category"),
        ("user_taste", "reading_diversity"), ("article_info", "category")}
