"""Topic names and message positions: how Tally names what it reads.

A partitioned topic ``read_events`` has partition topics
``read_events-partition-<i>``; Tally shards state by partition, so every
module that opens one names it with :func:`partition_topic`. A message's
position within its partition is the triple (ledger, entry, batch index),
compared as a tuple: :func:`position` builds it from a message id (raw ids
and the client's wrapper class do not compare with each other).
"""
import urllib.parse

import numpy as np

from tally.core.definitions import state_hash
from tally.service import config

PARTITION_SEPARATOR = "-partition-"
# A batch index that sorts after every message of an entry.
END_OF_ENTRY = (1 << 31) - 1
NO_POSITION = (-1, -1, -1)


def partition_topic(topic, partition):
    """The name of partition ``partition`` of ``topic``."""
    return f"{topic}{PARTITION_SEPARATOR}{partition}"


def partition_index(name):
    """The partition number in a partition topic's name, or None for a topic
    that is not a partition."""
    _, separator, tail = name.rpartition(PARTITION_SEPARATOR)
    return int(tail) if separator and tail.isdigit() else None


def position(message_id):
    """(ledger, entry, batch index) of a message id."""
    return (message_id.ledger_id(), message_id.entry_id(), message_id.batch_index())


def message_position(message):
    """(ledger, entry, batch index): the order of messages within a partition."""
    return position(message.message_id())


# A message's own times (Pulsar metadata, epoch ms), as a source names them:
# the event timestamp its producer set (0 if none) and the broker's publish time.
_MESSAGE_TIMES = {"@event_time": "event_timestamp", "@publish_time": "publish_timestamp"}


def message_times(messages, source):
    """The times the source takes from its messages rather than their payloads
    (``Source.message_time_fields``): name -> int64 array, one per message."""
    return {name: np.fromiter((getattr(m, _MESSAGE_TIMES[name])() for m in messages),
                              np.int64, len(messages))
            for name in source.message_time_fields}


# The same times as the stored entries hold them (``tally.core.entries``)
_ENTRY_TIMES = {"@event_time": "event_time", "@publish_time": "publish_time"}


def entry_message_times(times, source):
    """``message_times`` of messages decoded from stored entries."""
    return {name: times[_ENTRY_TIMES[name]] for name in source.message_time_fields}


def rest_path(topic):
    """``/admin/v2/persistent/<tenant>/<ns>/<name>`` for "name",
    "tenant/ns/name" or "persistent://tenant/ns/name"."""
    scheme, separator, rest = topic.partition("://")
    if not separator:
        scheme, rest = "persistent", topic
    if scheme != "persistent":
        raise ValueError(f"only persistent topics are supported: {topic!r}")
    parts = rest.split("/")
    if len(parts) == 1:
        parts = ["public", "default", parts[0]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"not a topic name: {topic!r}")
    return "/admin/v2/persistent/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


def subscription_for(view, prefix=None):
    """One subscription per view state: a new version computes alongside the
    old. ``prefix`` names the deployment (``--subscription-prefix``, default:
    the ``subscription_prefix`` setting): two deployments on one cluster with
    one prefix would share the partitions, each standing by for the other's."""
    if prefix is None:
        prefix = config.default("subscription_prefix")
    return f"{prefix}.{view.name}.{state_hash(view)[:16]}"
