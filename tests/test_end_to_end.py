"""The first feature end to end against a real broker: Pulsar -> Cython core ->
LMDB -> lookup, checked against a pandas groupby of the same events."""
import dataclasses

import numpy as np
import pandas as pd
import pulsar
import pytest

from tally.service.ingest.dead_letters import dead_letter_topic
from tally.service.ingest.run import Ingestion
from tally.service.store.lmdb import LmdbStore
from tally.service.pulsar.producer import EventProducer
from tally.service.quickstart import generate_events, read_events, user_reading

pytestmark = pytest.mark.pulsar

N_EVENTS = 200_000
N_USERS = 10_000


def view_on(topic):
    source = dataclasses.replace(read_events, topic=topic)
    return dataclasses.replace(user_reading, source=source)


def produce(client, topic, payloads, keys):
    producer = EventProducer(client, topic, "user")
    for payload, key in zip(payloads, keys):
        producer.send_payload(payload, key)
    producer.close()


def consume_all(view, client, store, n_messages):
    with Ingestion(view, client, store, batch_timeout_ms=20) as reader:
        reader.run(until=lambda ingestion: ingestion.stats.messages >= n_messages,
                   idle_timeout_s=60)
    return reader


def assert_store_matches_pandas(store, events):
    expected = pd.DataFrame(events).groupby("user").agg(
        total_readtime=("readtime", "sum"), reads=("readtime", "size"),
        newest=("ts", "max"))
    records = store.get_many("user_reading", expected.index.to_numpy())
    got = pd.DataFrame([{"total_readtime": r["total_readtime"], "reads": r["reads"],
                         "newest": r["_event_time"]} for r in records], index=expected.index)
    assert store.count("user_reading") == len(expected)
    np.testing.assert_array_equal(got["reads"], expected["reads"])
    np.testing.assert_array_equal(got["newest"], expected["newest"])
    np.testing.assert_allclose(got["total_readtime"], expected["total_readtime"], rtol=1e-9)
    # a user who never read anything is a null record, never zeros
    assert store.get("user_reading", N_USERS + 1) is None


def test_sum_and_count_per_user_equal_pandas(pulsar_broker, pulsar_client, topic_name, tmp_path):
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    payloads, keys, events = generate_events(N_EVENTS, N_USERS, seed=1)
    produce(pulsar_client, topic_name, payloads, keys)

    with LmdbStore(tmp_path / "store") as store:
        reader = consume_all(view_on(topic_name), pulsar_client, store, N_EVENTS)
        assert reader.stats.events == N_EVENTS and reader.stats.rejected == 0
        assert_store_matches_pandas(store, events)


def test_malformed_events_are_counted_dead_lettered_and_harmless(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    payloads, keys, events = generate_events(N_EVENTS, N_USERS, seed=2,
                                             malformed_fraction=0.01)
    n_bad = N_EVENTS - len(events["user"])
    assert 1500 < n_bad < 2500
    dead_letters = pulsar_client.subscribe(
        dead_letter_topic(topic_name), "check",
        initial_position=pulsar.InitialPosition.Earliest)
    produce(pulsar_client, topic_name, payloads, keys)

    with LmdbStore(tmp_path / "store") as store:
        reader = consume_all(view_on(topic_name), pulsar_client, store, N_EVENTS)
        assert reader.stats.rejected == n_bad
        assert reader.stats.events == N_EVENTS - n_bad
        assert_store_matches_pandas(store, events)

    reasons = {}
    for _ in range(n_bad):
        message = dead_letters.receive(timeout_millis=10_000)
        reason = message.properties()["reason"]
        reasons[reason] = reasons.get(reason, 0) + 1
        assert message.properties()["source_topic"].startswith(
            f"persistent://public/default/{topic_name}-partition-")
    assert sum(reasons.values()) == n_bad
    assert any("missing field 'readtime'" in r for r in reasons)
    assert any("'readtime'" in r and "expected float64" in r for r in reasons)
    assert any("msgpack" in r for r in reasons)
    assert any("event time 9223372036854775807 is outside" in r for r in reasons)
    dead_letters.close()


class FlakyStore:
    """An LmdbStore whose first ``failures`` writes fail, as a store that is down."""

    def __init__(self, store, failures):
        self.store, self.failures = store, failures

    def write(self, *args, **options):
        if self.failures:
            self.failures -= 1
            raise OSError("store unavailable")
        return self.store.write(*args, **options)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_failing_store_is_retried_and_nothing_is_lost(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    payloads, keys, events = generate_events(20_000, 1_000, seed=3)
    produce(pulsar_client, topic_name, payloads, keys)
    with LmdbStore(tmp_path / "store") as store:
        flaky = FlakyStore(store, failures=4)
        reader = consume_all(view_on(topic_name), pulsar_client, flaky, 20_000)
        assert reader.stats.store_retries == 4
        expected = pd.DataFrame(events).groupby("user")["readtime"].agg(["sum", "size"])
        records = store.get_many("user_reading", expected.index.to_numpy())
        np.testing.assert_array_equal([r["reads"] for r in records], expected["size"])
        np.testing.assert_allclose([r["total_readtime"] for r in records], expected["sum"])


def test_string_keys_the_store_cannot_hold_are_dead_lettered(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    from tally.core.definitions import Entity, Feature, FeatureView, Source
    pulsar_broker.create_partitioned_topic(topic_name, 2)
    source = Source("named", topic_name, schema={"name": "string", "ts": "int64"})
    view = FeatureView("named_counts", Entity("name", "string"), source,
                       [Feature("n", "count")])
    producer = EventProducer(pulsar_client, topic_name, "name")
    for name in ["ann", "", "x" * 600, "ann", "bé"]:
        producer.send({"name": name, "ts": 1_732_780_800_000})
    producer.close()
    with LmdbStore(tmp_path / "store") as store:
        reader = consume_all(view, pulsar_client, store, 5)
        assert reader.stats.rejected == 2
        assert store.get_many("named_counts", ["ann", "bé", ""])[0]["n"] == 2
        assert store.get("named_counts", "bé")["n"] == 1
        assert set(reader.stats.reject_reasons) == {
            "field 'name': an entity key must be 1 to 511 bytes of UTF-8"}


def test_a_view_keyed_by_another_field_than_the_topic_is_refused_not_split(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    """The topic is keyed by user; a view keyed by article would keep a
    partial state per partition, each overwriting the others' records. Its
    events on another partition than their article's are dead-lettered with
    the reason; what it serves is exactly the events it kept."""
    from tally.core.definitions import Entity, Feature, FeatureView
    from tally.service.pulsar.producer import partitions_of
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    payloads, keys, events = generate_events(20_000, 1_000, seed=4)
    produce(pulsar_client, topic_name, payloads, keys)
    source = dataclasses.replace(read_events, topic=topic_name)
    by_article = FeatureView("by_article", Entity("article"), source,
                             [Feature("reads", "count")])
    frame = pd.DataFrame(events)
    on_own = partitions_of(frame["article"].to_numpy(), 4) == \
        partitions_of(frame["user"].to_numpy(), 4)
    dead_letters = pulsar_client.subscribe(dead_letter_topic(topic_name), "check",
                                           initial_position=pulsar.InitialPosition.Earliest)
    with LmdbStore(tmp_path / "store") as store:
        reader = consume_all(by_article, pulsar_client, store, 20_000)
        assert reader.stats.rejected == int((~on_own).sum()) > 10_000
        kept = frame[on_own].groupby("article").size()
        records = store.get_many("by_article", kept.index.to_numpy())
        np.testing.assert_array_equal([r["reads"] for r in records], kept.to_numpy())
    reason = dead_letters.receive(timeout_millis=10_000).properties()["reason"]
    assert reason.startswith("misrouted: key 'article' belongs to partition ")
    assert "produce the topic keyed by 'article'" in reason
    dead_letters.close()
