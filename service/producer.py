"""Producing events to a source topic: msgpack maps keyed by entity."""
import msgpack
import pulsar


class EventProducer:
    """Sends events (dicts) to a topic, each keyed by its entity so that one
    entity's events land on one partition, in order."""

    def __init__(self, client, topic, key_field):
        self.key_field = key_field
        self.producer = client.create_producer(
            topic, batching_enabled=True, batching_max_messages=1000,
            batching_max_publish_delay_ms=5, block_if_queue_full=True,
            max_pending_messages=50_000)

    def send(self, event):
        self.send_payload(msgpack.packb(event), event[self.key_field])

    def send_payload(self, payload, key):
        """Send raw bytes (also for deliberately malformed test events)."""
        self.producer.send_async(payload, _raise_on_failure, partition_key=str(key))

    def flush(self):
        self.producer.flush()

    def close(self):
        self.producer.flush()
        self.producer.close()


def _raise_on_failure(result, _message_id):
    if result != pulsar.Result.Ok:
        raise RuntimeError(f"failed to publish an event: {result}")
