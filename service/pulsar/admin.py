"""The broker's admin REST API: the one client every part of Tally uses.

Tally asks the admin API what the binary protocol cannot tell: a topic's
partition count without a client, the ledger lists of a partition (internal
stats, for the bootstrap's plan), subscriptions created at an exact entry,
topic creation, offloading, and where offloaded ledgers went (their UUIDs and
the applied offload policies, for a reader of the tier).
"""
import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from tally.core.errors import TallyError
from tally.service.pulsar.cluster import Cluster, ClusterConfigError
from tally.service.pulsar.topics import (PARTITION_SEPARATOR, partition_index, partition_topic,
                                         rest_path)


class PulsarAdminError(TallyError, RuntimeError):
    """An admin REST call answered with an HTTP error, or the broker is unreachable."""

    def __init__(self, method, url, status, body):
        super().__init__(f"{method} {url} -> HTTP {status}: {body.strip()[:500]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class OffloadedLedger:
    """A ledger whose offload is complete. The S3 offloader wrote it as the
    objects ``<uuid>-ledger-<ledger_id>`` (data) and ``...-index``."""

    ledger_id: int
    entries: int
    size: int
    uuid: str


class Admin:
    """The admin REST API of one cluster: a ``Cluster`` (its ``admin_url``,
    authentication and TLS), or an admin URL like http://127.0.0.1:8080 for
    a broker that needs no credentials."""

    def __init__(self, cluster, timeout=30.0):
        self.cluster = cluster if isinstance(cluster, Cluster) else Cluster(admin_url=cluster)
        if not self.cluster.admin_url:
            raise ClusterConfigError("no admin URL: give --admin, $TALLY_ADMIN or `admin` "
                                     "in tally.toml")
        self.url = self.cluster.admin_url.rstrip("/")
        self.timeout = timeout
        self._ssl_context = self.cluster.ssl_context()

    def request(self, method, path, body=None, timeout=None):
        """One call; JSON in and out (None for an empty answer)."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        request.add_header("Accept", "application/json")
        for name, value in self.cluster.http_headers().items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout,
                                        context=self._ssl_context) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise PulsarAdminError(method, url, error.code,
                                   error.read().decode(errors="replace")) from None
        # URLError, TLS refused after the handshake, or not HTTP (http:// on a TLS port)
        except (OSError, http.client.HTTPException) as error:
            raise PulsarAdminError(method, url, 0, f"cannot reach the broker: "
                                   f"{getattr(error, 'reason', error)}") from None
        return json.loads(payload) if payload.strip() else None

    def partition_count(self, topic):
        """The partitions of ``topic``; 0 for a non-partitioned or missing topic."""
        try:
            metadata = self.request("GET", f"{rest_path(topic)}/partitions")
        except PulsarAdminError as error:
            if error.status == 404:          # 4.0 answers 404 where older brokers said 0
                return 0
            raise
        return metadata["partitions"]

    def create_partitioned_topic(self, topic, partitions):
        self.request("PUT", f"{rest_path(topic)}/partitions", int(partitions))

    def internal_stats(self, topic):
        """Managed-ledger stats of one (partition) topic: ``ledgers``
        [{ledgerId, entries, size, offloaded}], ``lastConfirmedEntry``, ..."""
        return self.request("GET", f"{rest_path(topic)}/internalStats")

    def internal_info(self, topic):
        """The managed ledger of one (partition) topic as its metadata holds it:
        ``ledgers`` [{ledgerId, entries, size, timestamp, isOffloaded,
        offloadedContextUuid}] (isOffloaded: an offload was started), ``cursors``, ..."""
        return self.request("GET", f"{rest_path(topic)}/internal-info")

    def offloaded_ledgers(self, topic):
        """The ledgers of one (partition) topic whose offload is complete, oldest first."""
        # internal-info says isOffloaded from the moment an offload starts (the
        # ledger has an offload context); internal stats say offloaded once it
        # is complete. Stats first: a ledger complete then keeps its context's
        # UUID, while one still being offloaded may retry under a new UUID.
        complete = {ledger["ledgerId"] for ledger in self.internal_stats(topic)["ledgers"]
                    if ledger["offloaded"]}
        # internal-info lists the ledgers in no particular order.
        return sorted((OffloadedLedger(ledger["ledgerId"], ledger["entries"], ledger["size"],
                                       ledger["offloadedContextUuid"])
                       for ledger in self.internal_info(topic)["ledgers"]
                       if ledger["ledgerId"] in complete), key=lambda ledger: ledger.ledger_id)

    def offload_policies(self, topic):
        """The offload policies that apply to one (partition) topic: its own,
        else its namespace's, else the broker's config, key by key
        (``managedLedgerOffloadDriver``, ``s3ManagedLedgerOffloadBucket``,
        ``s3ManagedLedgerOffloadRegion``, ``s3ManagedLedgerOffloadServiceEndpoint``, ...).
        A partition has its partitioned topic's policies (the broker refuses to
        be asked about a partition)."""
        if partition_index(topic) is not None:
            topic = topic.rpartition(PARTITION_SEPARATOR)[0]
        return self.request("GET", f"{rest_path(topic)}/offloadPolicies?applied=true")

    def topic_stats(self, topic):
        """The stats of one (partition) topic: ``subscriptions`` {name:
        {activeConsumerName, consumers [{consumerName, metadata}], msgBacklog}}, ..."""
        return self.request("GET", f"{rest_path(topic)}/stats")

    def partition_stats(self, topic, partitions):
        """Each partition's internal stats: its ledgers and last confirmed entry."""
        return {p: self.internal_stats(partition_topic(topic, p)) for p in partitions}

    def create_subscription(self, topic, subscription, ledger, entry):
        """A durable subscription whose first message is the entry (ledger, entry)."""
        self.request("PUT", f"{rest_path(topic)}/subscription/{subscription}",
                     {"ledgerId": ledger, "entryId": entry, "partitionIndex": -1,
                      "batchIndex": -1, "isExcluded": False})

    def unload(self, topic):
        """Unload one (partition) topic: its open ledger is closed, and the
        broker that loads it next opens a new one."""
        self.request("PUT", f"{rest_path(topic)}/unload")

    def offload(self, topic, before_ledger, timeout=60):
        """Offload every closed ledger of ``topic`` (one partition) older than
        ``before_ledger``, and wait until the offload has finished."""
        path = f"{rest_path(topic)}/offload"
        self.request("PUT", path, {"ledgerId": int(before_ledger), "entryId": 0,
                                   "partitionIndex": -1})
        deadline = time.monotonic() + timeout
        while True:
            status = self.request("GET", path)
            if status["status"] == "SUCCESS":
                return
            if status["status"] == "ERROR":
                raise PulsarAdminError("PUT", path, 500, status.get("lastError", ""))
            if time.monotonic() > deadline:
                raise TimeoutError(f"offload of {topic} still {status['status']}")
            time.sleep(0.2)
