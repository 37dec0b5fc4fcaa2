"""Several deployments on one cluster, and what `tally serve` says: two serves
with different stores on the same subscription names share the partitions
out -- each stands by for the other's and warns, naming the subscription and
the other store, in its JSON log and in /metrics; a serve with its own
--subscription-prefix owns every partition for its own store."""
import json
import re
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from tally.service.pulsar.producer import EventProducer
from tally.service.quickstart import generate_events
from test_service import wait_for

pytestmark = pytest.mark.pulsar

DEFINITIONS = """
from tally.core.definitions import Entity, Feature, FeatureView, Source

reads = Source("reads", {topic!r},
               schema={{"user": "int64", "article": "int64", "readtime": "float64", "ts": "int64"}})
view = FeatureView("dep_reading", Entity("user"), reads, features=[Feature("reads", "count")])
"""


def serve(broker, tmp_path, definitions, name, prefix, metrics="off", log_format="json"):
    log = open(tmp_path / f"{name}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", str(definitions), "--pulsar",
         broker.service_url, "--admin", broker.admin_url, "--store", str(tmp_path / name),
         "--checkpoints", str(tmp_path / f"{name}-checkpoints"), "--name", name,
         "--subscription-prefix", prefix, "--metrics", metrics, "--log-format", log_format,
         "--checkpoint-interval", "0.5"], stdout=log, stderr=subprocess.STDOUT)
    return process, tmp_path / f"{name}.log"


def json_lines(path):
    """The log's lines, every one a JSON object (the client logs warnings only,
    and none here)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def active_partitions(log):
    return {e["partition"] for e in json_lines(log) if "is the active consumer" in e["message"]}


def standing_by(log):
    return [e for e in json_lines(log) if e["level"] == "WARNING" and
            "standing by" in e["message"]]


def test_a_second_deployment_on_the_same_subscription_warns_and_a_prefix_separates_them(
        pulsar_broker, pulsar_client, topic_name, tmp_path):
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    definitions = tmp_path / "defs.py"
    definitions.write_text(textwrap.dedent(DEFINITIONS.format(topic=topic_name)))
    payloads, keys, _ = generate_events(2000, 100, seed=2)
    producer = EventProducer(pulsar_client, topic_name, "user")
    for payload, key in zip(payloads, keys):
        producer.send_payload(payload, key)
    producer.close()
    processes = []
    try:
        first, first_log = serve(pulsar_broker, tmp_path, definitions, "a", "prod")
        processes.append(first)
        wait_for(lambda: active_partitions(first_log) == {0, 1, 2, 3})
        second, second_log = serve(pulsar_broker, tmp_path, definitions, "b", "prod",
                                   metrics="127.0.0.1:19473")
        third, third_log = serve(pulsar_broker, tmp_path, definitions, "c", "staging")
        processes += [second, third]
        # Pulsar shares the partitions out between a and b: each stands by
        # for the other's and warns, naming the subscription and the store
        warnings = wait_for(lambda: len(standing_by(first_log) + standing_by(second_log)) == 4
                            and standing_by(first_log) + standing_by(second_log))
        assert sorted(w["partition"] for w in warnings) == [0, 1, 2, 3]
        for warning in warnings:
            assert warning["subscription"].startswith("prod.dep_reading.")
            other = {"a": "b", "b": "a"}[warning["active_consumer"]]
            assert warning["store"] == str(tmp_path / warning["active_consumer"])
            assert str(tmp_path / other) in warning["message"]
            assert "--subscription-prefix" in warning["message"]
        b_standing = {w["partition"] for w in standing_by(second_log)}
        metrics = urllib.request.urlopen("http://127.0.0.1:19473/metrics").read().decode()
        standby = [line for line in metrics.splitlines()
                   if line.startswith("tally_partition_standby{")
                   and float(line.rsplit(" ", 1)[1]) == 1]
        assert len(standby) == len(b_standing) > 0, metrics
        assert all('active_consumer="a"' in line and 'subscription="prod.dep_reading.' in line
                   for line in standby), standby
        assert re.search(r'tally_subscription\{[^}]*subscription="prod\.dep_reading\.', metrics)
        # the other prefix: its own subscription, every partition its own
        wait_for(lambda: active_partitions(third_log) == {0, 1, 2, 3})
        assert not standing_by(third_log)
        started = [e for e in json_lines(third_log) if "partition workers" in e["message"]]
        assert started[0]["subscription"].startswith("staging.dep_reading.")
        for entry in json_lines(second_log) + json_lines(third_log):   # every line is JSON
            assert {"time", "level", "logger", "message"} <= set(entry)
        assert any("restored checkpoint" in e["message"] and e["checkpoint"] == 1
                   for e in json_lines(third_log))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
