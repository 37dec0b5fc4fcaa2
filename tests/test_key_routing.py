"""Key routing on a real broker: events routed by Java's string hash reach a
view whose source declares it (served exactly) and are dead-lettered, naming
the scheme, by a view whose source declares murmur3 -- never folded into the
wrong partition's state. Oracles: pandas, and a Python String.hashCode."""
import dataclasses
import time

import numpy as np
import pandas as pd
import pulsar
import pytest

from tally.service.ingest.dead_letters import dead_letter_topic
from tally.service.ingest.run import Ingestion
from tally.service.pulsar.producer import EventProducer
from tally.service.quickstart import generate_events, read_events, user_reading
from test_routing import oracle_partition

pytestmark = pytest.mark.pulsar
N_EVENTS, N_USERS = 20_000, 1_000


def view_on(topic, routing):
    source = dataclasses.replace(read_events, topic=topic, routing=routing)
    return dataclasses.replace(user_reading, source=source)


def produce_java_routed(client, topic):
    """The events of a Java producer with the default JavaStringHash."""
    payloads, keys, events = generate_events(N_EVENTS, N_USERS, seed=7)
    producer = EventProducer(client, topic, "user", routing="java_string_hash")
    for payload, key in zip(payloads, keys):
        producer.send_payload(payload, key)
    producer.close()
    return pd.DataFrame(events)


def served(store, users):
    records = store.get_many("user_reading", users)
    return pd.DataFrame([{"reads": r["reads"], "total_readtime": r["total_readtime"]}
                         for r in records], index=users)


def assert_served_equals(store, frame):
    expected = frame.groupby("user").agg(reads=("readtime", "size"),
                                         total_readtime=("readtime", "sum"))
    got = served(store, expected.index.to_numpy())
    assert store.count("user_reading") == len(expected)
    np.testing.assert_array_equal(got["reads"], expected["reads"])
    np.testing.assert_allclose(got["total_readtime"], expected["total_readtime"], rtol=1e-9)


def consume(view, client, store):
    with Ingestion(view, client, store, batch_timeout_ms=20) as reader:
        reader.run(until=lambda ingestion: ingestion.stats.messages >= N_EVENTS,
                   idle_timeout_s=60)
    return reader


def test_java_routed_events_on_a_murmur3_source_are_dead_lettered(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    from tally.service.store.lmdb import LmdbStore
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    frame = produce_java_routed(pulsar_client, topic_name)
    java = frame["user"].map(lambda u: oracle_partition(u, 4, "java_string_hash"))
    murmur = frame["user"].map(lambda u: oracle_partition(u, 4, "murmur3"))
    agree = (java == murmur).to_numpy()
    dead_letters = pulsar_client.subscribe(dead_letter_topic(topic_name), "check",
                                           initial_position=pulsar.InitialPosition.Earliest)
    with LmdbStore(tmp_path / "store") as store:
        reader = consume(view_on(topic_name, "murmur3"), pulsar_client, store)
        assert reader.stats.rejected == reader.stats.misrouted == int((~agree).sum()) > 10_000
        assert reader.stats.events == int(agree.sum())
        assert_served_equals(store, frame[agree])         # exactly the events kept
    reason = dead_letters.receive(timeout_millis=10_000).properties()["reason"]
    assert reason.startswith("misrouted: key 'user' belongs to partition ")
    assert "by the source's murmur3 routing" in reason
    dead_letters.close()


def test_a_source_declared_java_string_hash_is_served_exactly(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    from tally.service.store.lmdb import LmdbStore
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    frame = produce_java_routed(pulsar_client, topic_name)
    with LmdbStore(tmp_path / "store") as store:
        reader = consume(view_on(topic_name, "java_string_hash"), pulsar_client, store)
        assert reader.stats.rejected == reader.stats.misrouted == 0
        assert_served_equals(store, frame)


def test_the_messages_own_times_are_the_event_times_online_and_in_training(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    """A source whose event time is the message's event timestamp (or its
    publish time): the payloads carry no time; the stream folds each event at
    its message's time and a training set read from the topic sees the same."""
    import msgpack

    from tally.core.definitions import Entity, Feature, FeatureView, Source
    from tally.service.history.topic import PulsarTopic
    from tally.service.store.lmdb import LmdbStore
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    rng = np.random.default_rng(3)
    users = rng.integers(0, 200, 3000)
    times = int(time.time() * 1000) - rng.integers(3_600_000, 86_400_000, 3000)
    producer = EventProducer(pulsar_client, topic_name, "user")
    for user, ts in zip(users.tolist(), times.tolist()):
        producer.send_payload(msgpack.packb({"user": user, "x": 1.0}), user, event_time=ts)
    producer.close()
    frame = pd.DataFrame({"user": users, "ts": times})
    for field in ("@event_time", "@publish_time"):
        source = Source("s", topic_name, {"user": "int64", "x": "float64"},
                        timestamp_field=field)
        view = FeatureView("v", Entity("user"), source, [Feature("n", "count")])
        read = pd.DataFrame(_concat(PulsarTopic(pulsar_client).batches(source,
                                                                       ["user", field])))
        with LmdbStore(tmp_path / field) as store:
            with Ingestion(view, pulsar_client, store, batch_timeout_ms=20,
                           subscription=field[1:]) as reader:
                reader.run(until=lambda i: i.stats.messages >= len(users), idle_timeout_s=60)
            assert reader.stats.rejected == 0
            newest = read.groupby("user")[field].max()
            records = store.get_many("v", newest.index.to_numpy())
            assert [r["_event_time"] for r in records] == newest.tolist()
            assert [r["n"] for r in records] == read.groupby("user").size().tolist()
        if field == "@event_time":
            assert sorted(read[field]) == sorted(times.tolist())
        else:                   # the broker's clock, after the producer's event times
            assert (read[field] > frame["ts"].max()).all()


def _concat(batches):
    parts = list(batches)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
