"""Pulsar clients, and the one module that reaches into the client's internals.

The Python client wraps every message of a batch receive in an extra Python
object (~0.45 us each), a measurable share of the per-event budget, so the
hot paths use the underlying ``_pulsar`` objects; those private attributes are
touched here only (``raw``).
"""
import pulsar

from tally.core.errors import TallyError
from tally.service.pulsar.cluster import as_cluster
from tally.service.pulsar.topics import partition_index, position


class TopicError(TallyError, ValueError):
    """A topic is missing or not shaped as Tally needs it (partitioned)."""


def connect(cluster, log_level=pulsar.LoggerLevel.Warn, **options):
    """A client of ``cluster`` (a ``Cluster``, or a service URL for a broker
    that needs no credentials) with its authentication and TLS; it logs
    warnings and errors only: the C++ client logs every producer and consumer
    open and close at INFO, which buries Tally's output."""
    cluster = as_cluster(cluster)
    return pulsar.Client(cluster.service_url, logger=pulsar.ConsoleLogger(log_level),
                         **{**cluster.client_options(), **options})


def raw(handle):
    """The ``_pulsar`` object behind a consumer, reader or producer."""
    for attribute in ("_consumer", "_reader", "_producer"):
        inner = getattr(handle, attribute, None)
        if inner is not None:
            return inner
    raise TypeError(f"{type(handle).__name__} wraps no _pulsar handle")


def partition_topics(client, topic, require_partitioned=False):
    """The partition topics of ``topic`` in partition order (the topic itself
    when it is not partitioned, unless ``require_partitioned``)."""
    names = client.get_topic_partitions(topic)
    by_index = {partition_index(name): name for name in names}
    if None in by_index:
        if require_partitioned:
            raise TopicError(f"topic {topic!r} is not partitioned; Tally shards state by "
                             "partition: create it with partitions (e.g. tally create-topic "
                             f"{topic} --partitions 4)")
        return names
    if sorted(by_index) != list(range(len(names))):
        raise TopicError(f"unexpected partitions of {topic!r}: {names}")
    return [by_index[i] for i in range(len(names))]


def first_message_position(client, topic, timeout_ms=10_000):
    """(ledger, entry, batch index) of a partition's earliest retained
    message, or None if it has none."""
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    try:
        if not reader.has_message_available():
            return None
        return position(raw(reader).read_next(timeout_ms).message_id())
    finally:
        reader.close()


def last_message_position(client, topic):
    """(ledger, entry, batch index) of a partition's last message now, or None
    if it is empty: a reader started inclusively at ``latest`` is positioned
    on the last message."""
    reader = client.create_reader(topic, pulsar.MessageId.latest,
                                  start_message_id_inclusive=True)
    try:
        if not reader.has_message_available():
            return None
        return position(raw(reader).read_next(30_000).message_id())
    finally:
        reader.close()


def subscribe_failover(client, topic, subscription, consumer_name=None, batch_size=1000,
                       batch_timeout_ms=10, properties=None):
    """A Failover consumer of one (partition) topic that receives in batches of
    up to ``batch_size`` messages or ``batch_timeout_ms``, from the earliest
    message when the subscription is new; ``properties``: the consumer's
    metadata, shown to other consumers in the topic's stats."""
    return client.subscribe(
        topic, subscription, consumer_name=consumer_name, properties=properties or {},
        consumer_type=pulsar.ConsumerType.Failover,
        initial_position=pulsar.InitialPosition.Earliest,
        # the client caps a batch at the receiver queue size
        receiver_queue_size=batch_size,
        batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(
            batch_size, 64 << 20, batch_timeout_ms))
