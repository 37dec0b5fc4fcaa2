"""Exactly-once ingestion of one partition: state and position checkpointed
together, acknowledgement only after the checkpoint that covers a message.

A worker owns one partition topic (``<topic>-partition-<i>``) of one view
through a Failover subscription shared by every ``tally serve`` process:
Pulsar makes one consumer active per partition and moves the partition to
another when its owner dies. Before folding a batch the worker makes sure its
state is the partition's latest checkpoint (restoring it on first use, or when
another process has checkpointed since -- it owned the partition meanwhile),
skips messages at or before the checkpoint's position (Pulsar redelivers
everything after the last acknowledgement, which can be older than the
checkpoint if a crash came between the two), and folds the rest.

A worker is composed of the steps of ingestion: ``Fold`` (decode + apply),
``RecordWriter`` (the online store, with asynchronous backoff),
``DeadLetters`` and the ``CheckpointStore``. Records are a function of the
state, so rewriting them after a replay converges to the same values.
"""
import asyncio
import bisect
import logging
import time

import numpy as np

from tally.core.definitions import state_hash
from tally.core.materialize import next_expiry, online_schema
from tally.core.record import INT64_MAX
from tally.core.view import EVENT_TIME, ViewState
from tally.service.ingest.checkpoint import CheckpointConflict
from tally.service.ingest.dead_letters import DeadLetterError, DeadLetters
from tally.service.ingest.fold import Fold, IngestStats
from tally.service.ingest.writer import RecordWriter, WriteAbandoned
from tally.service.pulsar.client import first_message_position, raw, subscribe_failover
from tally.service.pulsar.topics import (END_OF_ENTRY, NO_POSITION, message_position,
                                         message_times, partition_topic)

log = logging.getLogger("tally.partition")
SEEK_TIMEOUT_S = 30.0
REACKNOWLEDGE_S = 5.0
# Empty receives in a row after which a partition has read all there is.
IDLE_BATCHES_CAUGHT_UP = 5


def wall_clock_ms():
    return int(time.time() * 1000)


class PartitionWorker:
    """Folds one partition of one view version into its state and records."""

    def __init__(self, view, partition, client, store, checkpoints, consumer_name,
                 subscription="tally", version=1, serving=True, checkpoint_interval_s=5.0,
                 batch_size=1000, batch_timeout_ms=10, clock=None, topic=None,
                 n_partitions=None, dimensions=(), properties=None):
        self.view, self.partition = view, partition
        self.store, self.checkpoints = store, checkpoints
        self.state_hash = state_hash(view)
        self.checkpoint_interval_s = checkpoint_interval_s
        self.clock = clock or wall_clock_ms
        self.stats = IngestStats()
        self.state = ViewState(view)
        self.schema = online_schema(view, version)
        # the feeds of the tables the view's joins read (tally.service.ingest.dimensions)
        self.dimensions = list(dimensions)
        # with n_partitions, events on the wrong partition for their key are refused
        self.fold = Fold(view, self.stats,
                         routing=None if n_partitions is None else (partition, n_partitions),
                         tables={(f.dimension.name, f.key): f.table for f in self.dimensions})
        self.dead_letters = DeadLetters(client, view.source.topic, view.name)
        self.writer = RecordWriter(view, store, self.schema, serving, self.clock, self.stats,
                                   on_refused=self.dead_letters.send_refused_record)
        self.client, self.topic = client, topic or partition_topic(view.source.topic, partition)
        self.subscription = subscription
        self.consumer = subscribe_failover(client, self.topic, subscription, consumer_name,
                                           batch_size, batch_timeout_ms, properties)
        self.receiver = raw(self.consumer)
        self.sequence = None            # the checkpoint our state stands on; None: not loaded
        self.seek_pending = False       # move the subscription to our position first
        self.seek_bound = None          # after a seek: batches starting later are stale
        self.seek_done = 0.0
        self.position = NO_POSITION
        self.checkpointed_position = NO_POSITION
        self.unacknowledged = None      # newest folded message, acked at the next checkpoint
        self.acknowledged, self.acknowledged_at = None, 0.0   # the newest acknowledgement
        self.last_checkpoint = time.monotonic()
        # when the last batch (empty ones too: receives return every batch
        # timeout) began: a worker whose receive or write never returns ages it
        self.last_batch = time.monotonic()
        self.idle_batches = 0           # consecutive empty receives: nothing waiting
        # said once per ownership (a restored checkpoint of another owner starts it again)
        self.said_receiving = self.said_caught_up = False
        windows = [f.window for f in view.features if f.window.size_ms]
        # entities whose newest event is older than this have empty windows
        self.expiry_horizon_ms = max((w.size_ms + w.hop_ms for w in windows), default=0) + \
            max((f.lateness_ms for f in view.features), default=0)
        self.next_rewrite = INT64_MAX if not windows else 0
        self.rewritten_once = False

    def close(self):
        self.consumer.close()
        self.dead_letters.close()

    def receive(self):
        """One batch of raw messages (blocking up to the batch timeout; run on
        a thread: the client releases the GIL while it waits). While the
        consumer reconnects (a seek, a broker restart) a receive can fail:
        that is an empty batch, logged, not a failure of the partition."""
        try:
            return self.receiver.batch_receive()
        except Exception as error:              # the client's own: it reconnects
            log.warning("%s partition %d: receive failed (%s)", self.view.name,
                        self.partition, error)
            time.sleep(0.1)
            return []

    async def process(self, messages, stopping=None):
        """Fold, write and (every checkpoint interval) checkpoint one batch;
        returns the number of messages. ``stopping()`` true abandons a write
        the store keeps refusing (then nothing is acknowledged)."""
        started = self.last_batch = time.monotonic()
        self.idle_batches = 0 if messages else self.idle_batches + 1
        self._log_progress(messages)
        try:
            if messages:
                await self._fold_fresh(messages, stopping)
            if self.sequence is not None:
                await self.rewrite_expired_windows(stopping)
        except WriteAbandoned as error:
            log.warning("%s partition %d: stopping with the store failing (%s); the last "
                        "batch is not acknowledged", self.view.name, self.partition, error)
            self.sequence, self.unacknowledged = None, None
            return len(messages)
        if self.unacknowledged is not None and \
                time.monotonic() - self.last_checkpoint >= self.checkpoint_interval_s:
            self.checkpoint()
        elif self.acknowledged is not None and \
                time.monotonic() - self.acknowledged_at >= REACKNOWLEDGE_S:
            self._acknowledge(self.acknowledged)
        self.stats.busy_seconds += time.monotonic() - started
        return len(messages)

    def _log_progress(self, messages):
        """Say when the partition starts receiving (this process is its active
        consumer) and when it has then caught up (nothing left to read)."""
        fields = {"view": self.view.name, "partition": self.partition,
                  "subscription": self.subscription}
        if messages and not self.said_receiving:
            self.said_receiving = True
            log.info("%s partition %d: receiving on subscription %s (this process owns the "
                     "partition)", self.view.name, self.partition, self.subscription,
                     extra=fields)
        elif self.said_receiving and not self.said_caught_up and \
                self.idle_batches == IDLE_BATCHES_CAUGHT_UP:
            self.said_caught_up = True
            log.info("%s partition %d: caught up (backlog 0) at position %s, %d events folded",
                     self.view.name, self.partition, self.position, self.stats.events,
                     extra=dict(fields, position=self.position, events=self.stats.events,
                                backlog=0))

    async def _fold_fresh(self, messages, stopping):
        if self.adopt_latest_checkpoint():         # another process owned it meanwhile
            self.seek_pending = True
        if self.seek_pending:
            if await self._follows_our_position(messages[0]):
                self.seek_pending = False      # nothing missed: no seek, no re-read
            else:
                await self._seek(messages[0])
                return
        if self.seek_bound is not None and self._before_the_seek(messages[0]):
            return                         # received before the seek took effect: dropped
        # a batch is in log order: bisect instead of a position per message
        split = bisect.bisect_right(messages, self.position, key=message_position)
        replayed, fresh = messages[:split], messages[split:]
        if replayed:
            self.acknowledge_replayed(replayed[-1])
        if not fresh:
            return
        payloads = [m.data() for m in fresh]
        for feed in self.dimensions:        # rows published before the batch are joined
            await feed.synced(self.last_batch)
        touched, rejects = self.fold(self.state, payloads,
                                     message_times(fresh, self.view.source))
        self.dead_letters.send(fresh, payloads, rejects)
        if touched is not None:
            await self.writer.write(self.state, touched, stopping)
        self.position = message_position(fresh[-1])
        self.unacknowledged = fresh[-1]

    async def rewrite_expired_windows(self, stopping=None):
        """Windows expire with time, also for entities with no new event: at
        each hop boundary rewrite the records whose windows may have changed
        (after a restart, all of them once)."""
        now = self.clock()
        if now < self.next_rewrite:
            return
        slots = np.arange(len(self.state))
        if self.rewritten_once:
            newest, seen = self.state.arenas[EVENT_TIME].read(slots, now)
            slots = slots[seen & (newest > now - self.expiry_horizon_ms)]
        if len(slots):
            await self.writer.write(self.state, slots, stopping)
        self.rewritten_once = True
        self.next_rewrite = next_expiry(self.view, now)

    def acknowledge_replayed(self, last_replayed):
        """Pulsar redelivers from the last acknowledgement, which can be older
        than the checkpoint (a crash between the two). Those messages are
        skipped; acknowledge them now, or with no newer message to follow they
        would stay in the backlog for ever."""
        if message_position(last_replayed) <= self.checkpointed_position:
            self._acknowledge(last_replayed)

    def start(self):
        """Restore the partition's newest valid checkpoint before anything is
        received (so every owned partition's windows expire from the start),
        and have the subscription moved to its position by the first batch:
        state and position always agree, whatever the acknowledgements say
        (a lost, corrupt or older checkpoint is read forward from its own
        position, an empty checkpoint directory from the earliest message).
        The seek waits for a batch because only the partition's active
        consumer receives one: a seek by an inactive Failover consumer in
        another process would disconnect the active one for nothing."""
        self.adopt_latest_checkpoint()
        self.seek_pending = True

    def adopt_latest_checkpoint(self):
        """Restore the newest valid checkpoint unless our state already is it.
        Returns None if nothing changed, else whether the subscription must be
        moved: when the newest checkpoint was corrupt, the one restored is older
        than the acknowledgements (its messages must be read again)."""
        latest = self.checkpoints.latest_sequence(self.view.name, self.state_hash,
                                                  self.partition)
        if latest == self.sequence:
            return None
        if self.sequence is not None and latest < self.sequence:
            # Our own newest checkpoint is gone (deleted, or set aside as
            # corrupt): nobody published since, so our state is still the
            # truth at our position; the next checkpoint publishes it again.
            log.warning("%s partition %d: checkpoint %d has disappeared; the state in memory "
                        "is checkpointed again", self.view.name, self.partition, self.sequence)
            self.sequence = latest
            self.last_checkpoint = 0.0
            return None
        restored = self.checkpoints.restore(self.view.name, self.state_hash, self.partition)
        self.stats.corrupt_checkpoints += len(restored.corrupt)
        if restored.sequence == 0:
            self.state, self.position = ViewState(self.view), NO_POSITION
        else:
            meta = restored.meta
            self.state = ViewState.from_arrays(self.view, meta["params"], restored.arrays)
            self.position = tuple(meta["position"])
            log.info("%s partition %d: restored checkpoint %d at position %s",
                     self.view.name, self.partition, restored.sequence, self.position,
                     extra={"view": self.view.name, "partition": self.partition,
                            "checkpoint": restored.sequence, "position": self.position})
        self.sequence = restored.sequence
        self.checkpointed_position = self.position
        self.said_receiving = self.said_caught_up = False
        self.unacknowledged = None
        self.rewritten_once = False
        return restored.sequence != latest

    async def _follows_our_position(self, first_received):
        """Whether the subscription surely delivers everything after our
        position: its first message is at or before our checkpoint's entry
        (what comes between is skipped), or, with no checkpoint, is the
        partition's earliest message. Otherwise (e.g. the next message after
        a clean stop, which cannot be told from a gap) the worker seeks."""
        first = message_position(first_received)
        if self.position != NO_POSITION:
            return first <= self.position[:2] + (END_OF_ENTRY,)
        earliest = await asyncio.get_running_loop().run_in_executor(
            None, first_message_position, self.client, self.topic)
        return earliest is not None and first[:2] == earliest[:2]

    async def _seek(self, first_received):
        """Move the subscription to our position (the earliest message with
        none) and drop this batch. A receive under way may still return
        messages from before the seek: those follow this batch, while the ones
        read again start at our position, so until a batch starts no later
        than both, batches are stale."""
        import pulsar
        if self.position == NO_POSITION:
            target, bound = pulsar.MessageId.earliest, message_position(first_received)
        else:
            target = pulsar.MessageId(-1, self.position[0], self.position[1], -1)
            bound = max(message_position(first_received), self.position[:2] + (END_OF_ENTRY,))
        deadline = time.monotonic() + SEEK_TIMEOUT_S
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.consumer.seek,
                                                                 target)
                break
            except Exception as error:          # the consumer reconnecting: try again
                if time.monotonic() > deadline:
                    raise
                log.warning("%s partition %d: seek failed (%s); retrying", self.view.name,
                            self.partition, error)
                await asyncio.sleep(0.5)
        self.seek_pending = False
        self.seek_bound, self.seek_done = bound, time.monotonic()

    def _before_the_seek(self, first):
        if message_position(first) <= self.seek_bound:
            self.seek_bound = None
            return False
        if time.monotonic() - self.seek_done > SEEK_TIMEOUT_S:
            log.error("%s partition %d: no message from before %s since the seek %.0f s ago; "
                      "going on from %s", self.view.name, self.partition, self.seek_bound,
                      SEEK_TIMEOUT_S, message_position(first))
            self.seek_bound = None
            return False
        return True

    def checkpoint(self):
        """Save state and position, then acknowledge everything they cover;
        False if no checkpoint was taken (it is tried again later)."""
        try:
            self.dead_letters.flush()    # dead letters are durable before their ack
        except DeadLetterError as error:
            self.stats.dead_letter_failures += 1
            log.error("%s partition %d: %s; the checkpoint waits", self.view.name,
                      self.partition, error)
            return False
        self.store.flush()
        try:
            self.checkpoints.save(
                self.view.name, self.state_hash, self.partition, self.sequence + 1,
                self.state.export_arrays(),
                {"params": self.state.describe(), "position": list(self.position),
                 "view": self.view.name, "partition": self.partition})
        except CheckpointConflict as conflict:
            # Another process owns the partition now; our state is stale.
            log.warning("%s", conflict)
            self.sequence, self.unacknowledged = None, None
            return False
        self.sequence += 1
        self.checkpointed_position = self.position
        self.stats.checkpoints += 1
        self.last_checkpoint = time.monotonic()
        if self.unacknowledged is not None:
            self._acknowledge(self.unacknowledged)
            self.unacknowledged = None
        return True


    def _acknowledge(self, message):
        """Acknowledge through ``message``. The client sends acknowledgements
        without confirmation and drops those pending when its connection
        breaks (a broker restart), and it may not deliver the messages again
        after reconnecting: so the newest acknowledgement is sent again every
        ``REACKNOWLEDGE_S`` while nothing newer comes (it is idempotent). A
        failed one is logged, not raised: it costs a re-read, never an event."""
        if self.acknowledged is None or \
                message_position(message) >= message_position(self.acknowledged):
            self.acknowledged = message
        self.acknowledged_at = time.monotonic()
        try:
            self.receiver.acknowledge_cumulative(message)
        except Exception as error:               # the client's own: it reconnects
            log.warning("%s partition %d: acknowledgement failed (%s); the messages are "
                        "read again and skipped", self.view.name, self.partition, error)


async def drive(worker, pool, keep_going, stopping=None, fold_last=False):
    """Run a worker while ``keep_going()``: receive the next batch on a thread
    of ``pool`` while this one is folded; checkpoint at the end. The batch
    received when ``keep_going()`` turns false is folded if ``fold_last``
    (the consumer lives on), else dropped unacknowledged: Pulsar delivers it
    again to whoever owns the partition next."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(pool, worker.start)
    receiving = loop.run_in_executor(pool, worker.receive)
    while keep_going():
        messages = await receiving
        receiving = loop.run_in_executor(pool, worker.receive)
        await worker.process(messages, stopping)
    last = await receiving
    if fold_last and last:
        await worker.process(last, stopping)
    if worker.unacknowledged is not None:
        worker.checkpoint()
