"""Dimension feeds: the tables that enrichment joins read, kept from their
changelog topics inside ``tally serve`` (semantics: ``tally.core.enrich``).

Each serve process keeps a whole copy of every dimension its views join
(a dimension is small next to its events: articles, not reads), read by a
Pulsar Reader per partition from the earliest message on. Nothing of it is
checkpointed: on start the feed reads the changelog again, which gives the
same table, so the topic must retain its history (no compaction: a version
compacted away would be missing for events of its time).

A partition worker folds a batch only once the feed is *synced after* the
batch was received: a drain that began later found nothing more to read,
so every row published before the batch's events is in the table. The first
sync (the whole changelog) is waited for without limit -- no event is joined
with a partial table -- and later ones up to ``SYNC_TIMEOUT_S``, after which
the batch is folded with the table as it is, counted and logged (a broker
that stops serving the dimension must not stop the views). Malformed rows
go to ``<topic>-dlq`` with the reason, like events.
"""
import asyncio
import logging
import time

from tally.core import events as rules
from tally.core.enrich import DimensionTable
from tally.service.ingest.dead_letters import DeadLetters
from tally.service.pulsar.client import partition_topics, raw
from tally.service.pulsar.topics import message_times

log = logging.getLogger("tally.dimensions")
SYNC_TIMEOUT_S = 5.0
IDLE_POLL_S = 0.5            # with no worker waiting, how often the changelog is read
DRAIN_MESSAGES = 50_000      # messages per drain: a long changelog loads in steps
READ_TIMEOUT_MS = 10_000


class DimensionFeed:
    """One dimension table, fed from its changelog topic."""

    def __init__(self, join, client):
        self.dimension, self.key = join.dimension, join.key
        self.table = DimensionTable(join.dimension, join.key)
        import pulsar
        self.readers = [client.create_reader(topic, pulsar.MessageId.earliest)
                        for topic in partition_topics(client, join.dimension.topic)]
        self.dead_letters = DeadLetters(client, join.dimension.topic,
                                        f"dimension {join.dimension.name}")
        self.synced_at = None      # monotonic: every row published before it is in the table
        self.rows = self.rejected = 0
        self.unsynced_batches = 0  # batches folded without waiting out a sync
        self.error = None          # (since, error) while the changelog cannot be read
        self._loop = None          # the events below belong to one event loop

    def _bind(self):
        """Events for the running loop (a script may run the feed on several)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._wanted, self._advanced = loop, asyncio.Event(), asyncio.Event()

    @property
    def name(self):
        return self.dimension.name

    async def run(self, pool, stopping):
        """Read the changelog until ``stopping()``: at once while a worker
        waits for a sync, else every IDLE_POLL_S."""
        loop = asyncio.get_running_loop()
        self._bind()
        while not stopping():
            try:
                started, messages, complete = await loop.run_in_executor(pool, self._drain)
            except Exception as error:               # the client's own: it reconnects
                if self.error is None:
                    log.error("dimension %r: reading %s failed (%s); retrying", self.name,
                              self.dimension.topic, error)
                    self.error = (time.monotonic(), error)
                await asyncio.sleep(0.5)
                continue
            self.error = None
            if messages:
                self._apply(messages)
            if complete:
                first = self.synced_at is None
                self.synced_at = started
                if first:
                    log.info("dimension %r: loaded %d rows of %d keys", self.name,
                             self.rows, len(self.table))
                self._advanced.set()
                self._advanced = asyncio.Event()
            if complete and not self._wanted.is_set():
                try:
                    await asyncio.wait_for(self._wanted.wait(), IDLE_POLL_S)
                except asyncio.TimeoutError:
                    pass
            self._wanted.clear()

    def _drain(self):
        """On a thread: the messages available now. ``complete``: all of them."""
        if self.dead_letters.unflushed:
            self.dead_letters.flush()          # those that failed are sent again
        started = time.monotonic()
        messages = []
        for reader in self.readers:
            receiver = raw(reader)
            while len(messages) < DRAIN_MESSAGES and reader.has_message_available():
                messages.append(receiver.read_next(READ_TIMEOUT_MS))
        return started, messages, len(messages) < DRAIN_MESSAGES

    def _apply(self, messages):
        payloads = [m.data() for m in messages]
        events = rules.decode_payloads(payloads, self.dimension, key_column=self.key,
                                       key_type=self.dimension.field_type(self.key),
                                       message_times=message_times(messages, self.dimension))
        if events.rejects:
            self.rejected += len(events.rejects)
            self.dead_letters.send(messages, payloads, events.rejects)
        self.table.add(events.columns, events.valid)
        self.rows += events.n_events

    async def synced(self, since):
        """Wait until the table holds every row published before ``since``
        (monotonic); the first load without limit, then SYNC_TIMEOUT_S.
        Returns whether it does."""
        self._bind()
        deadline = None if self.synced_at is None else time.monotonic() + SYNC_TIMEOUT_S
        if self.synced_at is None:
            log.info("dimension %r: waiting for its changelog to load", self.name)
        while self.synced_at is None or self.synced_at < since:
            self._wanted.set()
            advanced = self._advanced
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(advanced.wait(), timeout)
            except asyncio.TimeoutError:
                self.unsynced_batches += 1
                if self.unsynced_batches == 1 or self.unsynced_batches % 1000 == 0:
                    log.warning("dimension %r: not synced within %.0f s; batches are "
                                "joined with the table as it is (%d so far)", self.name,
                                SYNC_TIMEOUT_S, self.unsynced_batches)
                return False
            if deadline is None and self.synced_at is not None:
                deadline = time.monotonic() + SYNC_TIMEOUT_S
        return True

    def problems(self):
        """For /health: the changelog unreadable for long."""
        if self.error is not None and time.monotonic() - self.error[0] > SYNC_TIMEOUT_S:
            return [f"dimension {self.name!r}: its changelog {self.dimension.topic} cannot "
                    f"be read for {time.monotonic() - self.error[0]:.0f} s ({self.error[1]})"]
        return []

    def close(self):
        for reader in self.readers:
            reader.close()
        self.dead_letters.close()
