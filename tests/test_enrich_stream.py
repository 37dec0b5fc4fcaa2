"""Enrichment joins on a real broker: ``tally serve`` joins each read with
its article's row as of the read's time, from the articles changelog topic;
the served records equal the training set read from the same topics, and
both equal the oracle of tests/test_enrich.py (a scan + pandas)."""
import textwrap
import urllib.request

import msgpack
import numpy as np
import pandas as pd
import pulsar
import pytest

from tally import PulsarTopic, training_set
from tally.service.ingest.dead_letters import dead_letter_topic
from tally.service.pulsar.producer import EventProducer
from tally.service.registry import load_file
from tally.service.store.lmdb import LmdbStore

from test_enrich import check_row, enriched_oracle, make_data, oracle_row
from test_service import Deployment, free_port, stop, wait_for

pytestmark = pytest.mark.pulsar

DEFINITIONS = """
from tally import Entity, Feature, FeatureView, Join, Source
WIDE = dict(earliest_event_time=-2**62, max_event_time_ahead=2**62)
articles = Source("articles", {articles!r}, {{"article": "int64", "category": "string",
                  "content_length": "int64", "ts": "int64"}}, **WIDE)
reads = Source("read_events", {reads!r}, {{"user": "int64", "article": "int64",
               "readtime": "float64", "ts": "int64"}}, **WIDE)
view = FeatureView("user_taste", Entity("user"), reads, [
    Feature("total_length", "sum", "content_length"),
    Feature("sports_reads", "count", filter="category = 'sports'"),
    Feature("last_category", "last", "category"),
    Feature("top_category", "top_k", "category", k=2),
    Feature("known_reads", "count", filter="category IS NOT NULL"),
], joins=[Join(articles, on="article")])
"""
FEATURES = ["total_length", "sports_reads", "last_category", "top_category", "known_reads"]


def test_served_enriched_features_equal_the_training_set_and_pandas(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    articles, reads = f"{topic_name}-articles", f"{topic_name}-reads"
    pulsar_broker.create_partitioned_topic(articles, 2)
    pulsar_broker.create_partitioned_topic(reads, 2)
    definitions = tmp_path / "defs.py"
    definitions.write_text(textwrap.dedent(DEFINITIONS.format(articles=articles, reads=reads)))
    view = next(d for d in load_file(str(definitions)) if getattr(d, "kind", "") == "view")
    dims, events = make_data(11, n_events=4000)

    # the changelog first (in its order), with one malformed row
    producer = EventProducer(pulsar_client, articles, "article")
    for row in dims.to_dict("records"):
        producer.send({k: (v if k == "category" else int(v)) for k, v in row.items()})
    producer.send_payload(msgpack.packb({"article": 1, "category": "x"}), 1)  # no ts, no length
    producer.flush()
    producer.close()

    deployment = Deployment(pulsar_broker, pulsar_client, reads, tmp_path, definitions, view)
    port = free_port()
    process = deployment.start("a", metrics=f"127.0.0.1:{port}")
    try:
        deployment.wait_until_serving()
        producer = EventProducer(pulsar_client, reads, "user")
        for row in events.to_dict("records"):
            producer.send({k: (float(v) if k == "readtime" else int(v)) for k, v in row.items()})
        producer.flush()
        producer.close()
        deployment.wait_until_caught_up()
        users = np.array(sorted(events.user.unique()))

        def all_served():            # acknowledged means checkpointed, after the write
            with LmdbStore(deployment.store) as store:
                return all(r is not None for r in store.get_many(view.name, users))
        wait_for(all_served, 60)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        stop(process)

    enriched = enriched_oracle(dims, events)
    misses = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("tally_join_misses_total{"))
    assert misses == int(enriched.category.isna().sum())
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                   if not line.startswith("#"))
    assert float(samples['tally_dimension_dead_letters_total{dimension="articles"}']) == 1
    assert float(samples['tally_dimension_rows_total{dimension="articles"}']) == len(dims)
    dead = pulsar_client.subscribe(dead_letter_topic(articles), "check",
                                   initial_position=pulsar.InitialPosition.Earliest)
    letter = dead.receive(timeout_millis=10_000)
    assert "field" in letter.properties()["reason"]
    dead.close()

    end = int(events.ts.max())
    with LmdbStore(deployment.store) as store:
        records = store.get_many(view.name, users)
    spine = pd.DataFrame({"user": users, "ts": [end] * len(users)})
    offline = training_set(spine, [view], pulsar=PulsarTopic(pulsar_broker.service_url))
    for user, record, row in zip(users.tolist(), records, offline.to_pylist()):
        expected = oracle_row(enriched, user, end)
        online = {name: record[name] for name in FEATURES}
        check_row(online, {k: expected[k] for k in FEATURES}, ("online", user))
        check_row(row, {k: expected[k] for k in FEATURES}, ("offline", user))
        assert online["last_category"] == row["last_category"]
        assert [tuple(p) for p in online["top_category"] or []] == \
            [(p["value"], p["count"]) for p in row["top_category"] or []]
