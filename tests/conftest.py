"""Shared fixtures: one real Pulsar broker per test run, and hypothesis profiles."""
import os

import pytest
from hypothesis import HealthCheck, settings

# "ci" keeps the default run fast; HYPOTHESIS_PROFILE=thorough (tox -e thorough)
# explores far more cases. Hypothesis prints the seed of every failure.
settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def pulsar_broker(tmp_path_factory):
    """A real Apache Pulsar standalone on loopback, shared by the whole run."""
    from tally.service.pulsar.local import LocalPulsar
    broker = LocalPulsar(data_dir=tmp_path_factory.mktemp("pulsar"))
    broker.start(timeout=180)
    yield broker
    broker.stop()


@pytest.fixture
def pulsar_client(pulsar_broker):
    from tally.service.pulsar.client import connect
    client = connect(pulsar_broker.service_url, operation_timeout_seconds=30)
    yield client
    client.close()


@pytest.fixture
def topic_name(request):
    """A topic name unique to the test, so tests never see each other's events."""
    return "t-" + request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:60]
