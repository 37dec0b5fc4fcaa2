"""The dead-letter topic: every payload a view refuses, with the reason.

A dead letter is ``<topic>-dlq``'s message holding the refused payload, with
the properties ``reason``, ``view`` (the view that refused it: every view of
a source judges its events), ``source_topic`` and ``message_id`` (where the
payload lies in the source). A payload too large to be sent again with its
properties is cut to ``MAX_PAYLOAD_BYTES`` and marked ``truncated_from``. An
entity's update that the online store refused for good is dead-lettered too
(``kind`` = ``record``, a msgpack map of view, key and error).

No dead letter is lost: every send reports back, failed ones are sent
again at the next :meth:`DeadLetters.flush`, and the worker checkpoints (so
acknowledges the source messages) only after a flush that left none
behind. Delivery is at least once: after a crash the messages since the last
checkpoint are read again and refused again, so a dead letter can appear
twice; ``view`` + ``source_topic`` + ``message_id`` identify it.
"""
import threading

import msgpack
import pulsar

from tally.core.errors import TallyError

MAX_PAYLOAD_BYTES = 1 << 20          # well inside the broker's 5 MiB message limit
MAX_PENDING = 10_000
FLUSH_ATTEMPTS = 3
SEND_TIMEOUT_MS = 10_000


class DeadLetterError(TallyError, RuntimeError):
    """Dead letters could not be persisted; their source messages stay unacknowledged."""


def dead_letter_topic(topic):
    return f"{topic}-dlq"


class DeadLetters:
    """Sends refused payloads to ``<topic>-dlq``; see the module docstring."""

    def __init__(self, client, topic, view):
        self.topic = dead_letter_topic(topic)
        self.view = view
        self.producer = client.create_producer(
            self.topic, batching_enabled=True, block_if_queue_full=True,
            max_pending_messages=MAX_PENDING,
            # a send the broker cannot take fails within this (and is sent again)
            # instead of holding a checkpoint's flush for the client's default
            send_timeout_millis=SEND_TIMEOUT_MS)
        self._lock = threading.Lock()
        self._failed = []                 # (payload, properties, result) to send again
        self.sent = 0
        self.unflushed = 0                # sent since the last flush
        self.failures = 0

    def send(self, messages, payloads, rejects):
        """``rejects``: ``(index, reason)`` into ``messages``/``payloads``."""
        for index, reason in rejects:
            payload = payloads[index]
            properties = {"reason": reason, "view": self.view,
                          "source_topic": messages[index].topic_name(),
                          "message_id": str(messages[index].message_id())}
            if len(payload) > MAX_PAYLOAD_BYTES:
                properties["truncated_from"] = str(len(payload))
                payload = payload[:MAX_PAYLOAD_BYTES]
            self._send(payload, properties)

    def send_refused_record(self, key, error):
        """The update of one entity that the online store refused for good."""
        reason = f"the online store refused the record: {error}"
        payload = msgpack.packb({"view": self.view, "key": key, "error": str(error)},
                                default=str)
        self._send(payload, {"reason": reason, "view": self.view, "kind": "record"})

    def _send(self, payload, properties):
        def sent(result, _message_id):
            if result != pulsar.Result.Ok:
                with self._lock:
                    self._failed.append((payload, properties, result))
        self.sent += 1
        self.unflushed += 1
        self.producer.send_async(payload, sent, properties=properties)

    def flush(self):
        """Wait until every dead letter so far is persisted, sending failed
        ones again; raises DeadLetterError if some still fail."""
        if not self.unflushed and not self._failed:
            return                        # nothing in flight: no wait on the broker
        self.unflushed = 0
        for _ in range(FLUSH_ATTEMPTS):
            self._flush_producer()
            with self._lock:
                failed, self._failed = self._failed, []
            if not failed:
                return
            self.failures += len(failed)
            for payload, properties, _ in failed:
                self._send(payload, properties)
        self._flush_producer()
        with self._lock:
            if self._failed:
                raise DeadLetterError(f"{len(self._failed)} dead letters to {self.topic} "
                                      f"failed ({self._failed[0][2]}); their source messages "
                                      "stay unacknowledged")

    def _flush_producer(self):
        try:
            self.producer.flush()
        except Exception:        # the sends' own callbacks say which failed
            pass

    def close(self):
        self.producer.close()
