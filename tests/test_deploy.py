"""The feature deployment cycle: ``tally serve --registry`` picks up a new view
version applied while it runs, computes it alongside the serving version from
the topic's history, and switches once it has caught up — no restart."""
import dataclasses
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tally.core.definitions import Entity, Feature, FeatureView, Source
from tally.service.store.lmdb import LmdbStore
from tally.service.pulsar.producer import EventProducer
from tally.service.pulsar.local import free_loopback_ports
from tally.service.quickstart import generate_events
from tally.service.registry import Registry
from test_service import wait_for

pytestmark = pytest.mark.pulsar


def view_on(topic, features):
    source = Source("reads", topic, schema={"user": "int64", "article": "int64",
                                            "readtime": "float64", "ts": "int64"})
    return FeatureView("deployed", Entity("user"), source, features)


def produce(client, topic, payloads, keys):
    producer = EventProducer(client, topic, "user")
    for payload, key in zip(payloads, keys):
        producer.send_payload(payload, key)
    producer.close()


def records(store_path, users):
    with LmdbStore(store_path) as store:
        return store.get_many("deployed", users)


def bootstrap_units(port, version):
    """{'done': n, 'total': n} of a version's bootstrap, from /metrics."""
    import re
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = (rf'^tally_bootstrap_units{{state="(\w+)",version="{version}",view="deployed"}} '
               r'(\S+)$')
    return {state: int(float(value)) for state, value in re.findall(pattern, text, re.M)}


@pytest.mark.parametrize("bootstrap", [False, True], ids=["subscription", "bootstrap"])
def test_new_version_is_computed_alongside_and_promoted_without_restart(
        pulsar_broker, pulsar_client, topic_name, tmp_path, bootstrap):
    """Without the admin URL a new version reads history through its own
    subscription; with it, parallel readers bootstrap it, then it streams."""
    topic_name = f"{topic_name[:50]}-{'b' if bootstrap else 's'}"
    metrics_port = free_loopback_ports(1)[0]
    pulsar_broker.create_partitioned_topic(topic_name, 4)
    registry_path = tmp_path / "registry.db"
    store_path = tmp_path / "store"
    v1 = view_on(topic_name, [Feature("reads", "count")])
    with Registry(str(registry_path)) as registry:
        registry.apply([v1])
    payloads, keys, events = generate_events(40_000, 2_000, seed=5)
    produce(pulsar_client, topic_name, payloads[:20_000], keys[:20_000])

    service = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "--registry", str(registry_path),
         "--pulsar", pulsar_broker.service_url, "--store", str(store_path),
         "--checkpoints", str(tmp_path / "ckpt"), "--checkpoint-interval", "0.5",
         "--metrics", f"127.0.0.1:{metrics_port}" if bootstrap else "off"]
        + (["--admin", pulsar_broker.admin_url, "--bootstrap-readers", "2"] if bootstrap else []),
        stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT)
    try:
        first = pd.DataFrame({k: v[:len(v)] for k, v in events.items()}).iloc[:20_000]
        users = np.unique(first["user"])
        wait_for(lambda: sum(r["reads"] for r in records(store_path, users) if r) == 20_000,
                 90, "v1 did not count the first 20,000 events")

        # v2 adds a feature; it must be computed from all of history
        v2 = dataclasses.replace(v1, features=(Feature("reads", "count"),
                                               Feature("total", "sum", "readtime")))
        with Registry(str(registry_path)) as registry:
            registry.apply([v2])
            assert registry.deployments()[0].candidate.version == 2
        # until it is promoted, v1 keeps serving
        assert set(records(store_path, users[:1])[0]) >= {"reads"}
        produce(pulsar_client, topic_name, payloads[20_000:], keys[20_000:])

        def promoted():
            with Registry(str(registry_path)) as registry:
                return registry.deployments()[0].current.version == 2
        wait_for(promoted, 120, "v2 was not promoted")
        expected = pd.DataFrame(events).groupby("user")["readtime"].agg(["size", "sum"])
        wait_for(lambda: [r["reads"] for r in records(store_path, expected.index.to_numpy())]
                 == expected["size"].tolist(), 60, "v2 did not count every event")
        got = records(store_path, expected.index.to_numpy())
        assert all(r["_view_version"] == 2 for r in got)
        np.testing.assert_allclose([r["total"] for r in got], expected["sum"], rtol=1e-9)
        log = (tmp_path / "serve.log").read_text()
        assert ("bootstrapped deployed@v2" in log) == bootstrap
        if bootstrap:
            units = bootstrap_units(metrics_port, version=2)
            assert units["done"] == units["total"] > 0
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0
