"""A cluster as production runs one: TLS only, a trusted client certificate
on every connection (mTLS) and token authentication (``LocalPulsar(secure=
True)``). Unauthenticated clients are refused on both protocols; with the
credentials configured once in tally.toml, `tally create-topic`, `tally serve`
(its bootstrap readers included) and `tally training-set` compute what pandas
computes from the same events; OAuth2 client credentials work on both
protocols too."""
import http.server
import json
import signal
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tally.service.pulsar.admin import Admin, PulsarAdminError
from tally.service.pulsar.client import connect
from tally.service.pulsar.cluster import Cluster
from tally.service.pulsar.local import LocalPulsar
from tally.service.pulsar.producer import EventProducer
from tally.service.pulsar.security import hs256_token
from tally.service.quickstart import generate_events
from tally.service.store.lmdb import LmdbStore
from test_service import wait_for

pytestmark = pytest.mark.pulsar

REFUSAL_TIMEOUT_S = 3
DEFINITIONS = """
from tally.core.definitions import Entity, Feature, FeatureView, Source
reads = Source("reads", {topic!r}, schema={{"user": "int64", "article": "int64",
               "readtime": "float64", "ts": "int64"}}, timestamp_field="ts")
secure_reads = FeatureView("secure_reads", Entity("user"), reads,
                           [Feature("reads", "count"), Feature("total", "sum", "readtime")])
"""


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    broker = LocalPulsar(data_dir=tmp_path_factory.mktemp("secure-pulsar"), secure=True)
    broker.start(timeout=180)
    yield broker
    broker.stop()


def user_cluster(broker, subject="tally-user"):
    """The broker's URLs, CA and client certificate with a token of an
    ordinary (not super-user) role."""
    return broker.cluster.replace(token=broker.credentials.token(subject))


def refuses_producer(cluster, topic, timeout_s=REFUSAL_TIMEOUT_S):
    client = connect(cluster, operation_timeout_seconds=timeout_s)
    try:
        client.create_producer(topic)
        return False
    except Exception:                         # the client says Timeout or AuthenticationError
        return True
    finally:
        client.close()


def test_unauthenticated_clients_are_refused(secure_broker):
    topic = "secure-refusals"
    secure_broker.create_partitioned_topic(topic, 2)
    cluster = user_cluster(secure_broker)
    forged = cluster.replace(token=hs256_token(b"not the broker's key" * 2, "tally-user"))
    no_credentials = Cluster(cluster.service_url, cluster.admin_url,
                             tls_ca_file=cluster.tls_ca_file)
    # binary protocol: neither a certificate nor a token, or a forged token
    assert refuses_producer(no_credentials, topic)
    assert refuses_producer(forged, topic)
    assert not refuses_producer(cluster, topic, timeout_s=30)
    # admin REST: no client certificate fails the handshake; a forged token is 401
    with pytest.raises(PulsarAdminError) as no_certificate:
        Admin(no_credentials, timeout=REFUSAL_TIMEOUT_S).partition_count(topic)
    assert no_certificate.value.status == 0
    with pytest.raises(PulsarAdminError) as bad_token:
        Admin(forged, timeout=REFUSAL_TIMEOUT_S).partition_count(topic)
    assert bad_token.value.status == 401
    with pytest.raises(PulsarAdminError):      # plain HTTP on the TLS port
        Admin(cluster.admin_url.replace("https:", "http:"),
              timeout=REFUSAL_TIMEOUT_S).partition_count(topic)
    assert Admin(cluster).partition_count(topic) == 2


def write_project(directory, broker, topic):
    """tally.toml with the cluster's URLs and credentials, and a definitions file."""
    cluster = user_cluster(broker)
    (directory / "token.jwt").write_text(cluster.token + "\n")
    (directory / "tally.toml").write_text(f"""
pulsar = "{cluster.service_url}"
admin = "{cluster.admin_url}"
store = "store"
checkpoints = "checkpoints"
metrics = "off"
subscription_prefix = "secure-test"

[auth]
token_file = "token.jwt"

[tls]
ca_file = "{cluster.tls_ca_file}"
cert_file = "{cluster.tls_cert_file}"
key_file = "{cluster.tls_key_file}"
""")
    (directory / "views.py").write_text(DEFINITIONS.format(topic=topic))
    return cluster


def tally(*args, cwd, **options):
    return subprocess.run([sys.executable, "-m", "tally", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300, **options)


def stored(store_path, users):
    with LmdbStore(store_path) as store:
        return store.get_many("secure_reads", users)


def test_serve_bootstrap_and_training_set_with_the_configured_token_over_tls(
        secure_broker, tmp_path):
    topic = "secure-reads"
    cluster = write_project(tmp_path, secure_broker, topic)
    created = tally("create-topic", topic, "--partitions", "2", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    payloads, keys, events = generate_events(30_000, 1_000, seed=17)
    frame = pd.DataFrame(events)
    client = connect(cluster)
    producer = EventProducer(client, topic, "user")
    for payload, key in zip(payloads[:20_000], keys[:20_000]):
        producer.send_payload(payload, key)
    producer.flush()

    # from a subdirectory: the project file is found walking up, its relative
    # paths resolved against its own directory; its admin URL makes the
    # service bootstrap the history with reader processes
    (tmp_path / "work").mkdir()
    log = open(tmp_path / "serve.log", "wb")
    service = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "../views.py", "--checkpoint-interval",
         "0.5", "--bootstrap-readers", "2"], cwd=tmp_path / "work", stdout=log,
        stderr=subprocess.STDOUT)
    try:
        def counts_equal(n):
            expected = frame.iloc[:n].groupby("user").size()
            return [r and r["reads"] for r in stored(tmp_path / "store", expected.index)] \
                == expected.tolist()
        wait_for(lambda: counts_equal(20_000), 120, "the bootstrap did not count 20,000 events")
        for payload, key in zip(payloads[20_000:], keys[20_000:]):
            producer.send_payload(payload, key)
        producer.flush()
        wait_for(lambda: counts_equal(30_000), 60, "the stream did not count every event")
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        producer.close()
        client.close()
    served_log = (tmp_path / "serve.log").read_text()
    assert "bootstrapped secure_reads@v1" in served_log, served_log
    expected = frame.groupby("user")["readtime"].agg(["size", "sum"])
    np.testing.assert_allclose([r["total"] for r in stored(tmp_path / "store", expected.index)],
                               expected["sum"], rtol=1e-9)
    # the service's subscriptions carry the configured prefix
    stats = Admin(cluster).request("GET", "/admin/v2/persistent/public/default/"
                                   f"{topic}-partition-0/stats")
    assert [s for s in stats["subscriptions"] if s.startswith("secure-test.secure_reads.")]

    spine = tmp_path / "spine.parquet"
    pq.write_table(pa.table({"user": expected.index.to_numpy(),
                             "ts": np.full(len(expected), frame["ts"].max() + 1)}), spine)
    for parallel in ([], ["--admin", cluster.admin_url, "--readers", "2"]):
        out = tmp_path / f"training{len(parallel)}.parquet"
        built = tally("training-set", "--spine", str(spine), "--features", "secure_reads",
                      "--definitions", "views.py", "--pulsar", cluster.service_url,
                      "--out", str(out), *parallel, cwd=tmp_path)
        assert built.returncode == 0, built.stderr
        trained = pq.read_table(out).to_pandas().set_index("user").loc[expected.index]
        np.testing.assert_array_equal(trained["reads"], expected["size"])
        np.testing.assert_allclose(trained["total"], expected["sum"], rtol=1e-9)


class Issuer(http.server.BaseHTTPRequestHandler):
    """An OAuth2 issuer for the client-credentials grant, handing out tokens
    the broker accepts (signed with its secret key)."""

    secret_key = b""
    grants = []

    def do_GET(self):
        if self.path != "/.well-known/openid-configuration":
            return self.send_error(404)
        host, port = self.server.server_address
        self._answer({"issuer": f"http://{host}:{port}",
                      "token_endpoint": f"http://{host}:{port}/token"})

    def do_POST(self):
        form = dict(urllib.parse.parse_qsl(
            self.rfile.read(int(self.headers["Content-Length"])).decode()))
        if (form.get("grant_type"), form.get("client_id"), form.get("client_secret")) != \
                ("client_credentials", "tally-app", "s3cret"):
            return self.send_error(401)
        Issuer.grants.append(form)
        self._answer({"access_token": hs256_token(self.secret_key, "tally-app"),
                      "token_type": "Bearer", "expires_in": 3600})

    def _answer(self, document):
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_oauth2_client_credentials_on_both_protocols(secure_broker, tmp_path):
    Issuer.secret_key, Issuer.grants = secure_broker.credentials.secret_key, []
    issuer = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Issuer)
    threading.Thread(target=issuer.serve_forever, daemon=True).start()
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"client_id": "tally-app", "client_secret": "s3cret"}))
    try:
        cluster = secure_broker.cluster.replace(
            token=None, oauth2_issuer_url=f"http://127.0.0.1:{issuer.server_address[1]}",
            oauth2_credentials_file=str(credentials), oauth2_audience="tally-test")
        topic = "secure-oauth2"
        Admin(cluster).create_partitioned_topic(topic, 2)
        assert Admin(cluster).partition_count(topic) == 2
        client = connect(cluster, operation_timeout_seconds=10)
        try:
            client.create_producer(topic).send(b"with an OAuth2 token")
        finally:
            client.close()
        # one grant for the REST calls (cached), one for the binary client
        assert len(Issuer.grants) == 2
        assert all(g["audience"] == "tally-test" for g in Issuer.grants)
    finally:
        issuer.shutdown()
