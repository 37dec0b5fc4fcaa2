"""The dead-letter topic: every payload a view refuses, with the reason."""


def dead_letter_topic(topic):
    return f"{topic}-dlq"


class DeadLetters:
    """Sends refused payloads to ``<topic>-dlq`` with their reason and origin."""

    def __init__(self, client, topic):
        self.topic = dead_letter_topic(topic)
        self.producer = client.create_producer(self.topic, batching_enabled=True)

    def send(self, messages, payloads, rejects):
        """``rejects``: ``(index, reason)`` into ``messages``/``payloads``."""
        for index, reason in rejects:
            self.producer.send_async(
                payloads[index], None,
                properties={"reason": reason, "source_topic": messages[index].topic_name(),
                            "message_id": str(messages[index].message_id())})

    def flush(self):
        self.producer.flush()

    def close(self):
        self.producer.close()
