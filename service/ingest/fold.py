"""Fold: a batch of payloads -> valid events -> the view state.

The one step between receiving messages and writing records, shared by the
partition workers and the bootstrap's readers: payloads are decoded by the
stream's rules (``tally.core.events``: a payload holding an invalid event is
refused whole, with the reason), encoded by the state (which refuses a string
whose 64-bit code another string has: its payload is refused whole too), the
valid events applied to the state.

A partition's state is only right if every event of an entity reaches the
same partition: the topic must be keyed by the view's key column, routed by
the scheme the source declares (``Source.routing``, see
``tally.core.routing``). A view keyed by another field -- ``article`` over a
topic keyed by ``user`` -- or producers hashing keys another way would leave a
partial state per partition, each overwriting the others' records. The
:class:`RoutingCheck` computes the partition of every event's key (the whole
key column, in C) and refuses the events on another one (dead letters with
the reason, counted), so a wrongly keyed view is never served silently.
"""
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from tally.core import events as rules
from tally.core.formats import schema_of
from tally.core.enrich import Enricher
from tally.core.routing import partitions_of

log = logging.getLogger("tally.ingest")


@dataclass
class IngestStats:
    """Counters of one partition's ingestion, read by ``/metrics``."""
    messages: int = 0
    events: int = 0
    rejected: int = 0
    batches: int = 0
    reject_reasons: dict = field(default_factory=dict)    # reason -> count
    started: float = field(default_factory=time.monotonic)
    watermark_ms: int = None          # newest event time written so far
    freshness_ms: int = None          # last write time minus its newest event time
    store_retries: int = 0
    checkpoints: int = 0
    corrupt_checkpoints: int = 0     # found corrupt, set aside, the one before restored
    dead_letter_failures: int = 0    # flushes that left dead letters unsent
    store_refused: int = 0           # entities whose records the store refused for good
    busy_seconds: float = 0.0
    join_misses: int = 0             # events a join found no dimension row for
    misrouted: int = 0               # events on another partition than their key routes to

    def record_rejects(self, rejects):
        self.rejected += len(rejects)
        for _, reason in rejects:
            self.reject_reasons[reason] = self.reject_reasons.get(reason, 0) + 1

    def add(self, other):
        """Fold another partition's counters into these (for a whole view)."""
        for name in ("messages", "events", "rejected", "batches", "store_retries",
                     "checkpoints", "corrupt_checkpoints", "dead_letter_failures",
                     "store_refused", "join_misses", "misrouted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, count in other.reject_reasons.items():
            self.reject_reasons[reason] = self.reject_reasons.get(reason, 0) + count
        self.busy_seconds += other.busy_seconds
        self.started = min(self.started, other.started)
        if other.watermark_ms is not None:
            self.watermark_ms = max(self.watermark_ms or other.watermark_ms, other.watermark_ms)
        return self

    def summary(self):
        elapsed = time.monotonic() - self.started
        return {"messages": self.messages, "events": self.events, "rejected": self.rejected,
                "batches": self.batches, "seconds": round(elapsed, 3),
                "events_per_s": round(self.events / elapsed) if elapsed else 0}


class Fold:
    """Decodes payloads of one view's source, enriches them with the view's
    joins (``tables``: the dimension tables, see ``tally.core.enrich``) and
    folds the valid events."""

    def __init__(self, view, stats, routing=None, tables=None):
        self.view = view
        self.stats = stats
        self.decode_schema = schema_of(view.source)
        self.routing = None if routing is None else RoutingCheck(view, *routing)
        self.enrich = Enricher(view, tables) if view.joins else None

    def __call__(self, state, payloads, message_times=None):
        """``(touched slots or None, rejects)``: apply the batch's valid events
        to ``state``; ``rejects`` are ``(payload index, reason)``;
        ``message_times``: see ``tally.core.events.decode_payloads``."""
        events = rules.decode_payloads(payloads, self.view.source, self.decode_schema,
                                       self.view.key_column, self.view.entity.key_type,
                                       message_times=message_times)
        touched = None
        if events.n_events and self.routing is not None:
            misrouted = self.routing.misrouted(events.columns[self.view.key_column])
            if misrouted:
                self.stats.misrouted += len(misrouted)
                events, _ = rules.refuse_events(events, misrouted)
        if events.n_events:
            columns, valid = events.columns, events.valid
            if self.enrich is not None:
                misses = self.enrich.misses
                columns, valid = self.enrich(columns, valid)
                self.stats.join_misses += self.enrich.misses - misses
            batch = state.encode(columns, valid)
            if batch.refused:
                events, keep = rules.refuse_events(events, batch.refused)
                batch = batch.select(keep)
            touched = state.fold(batch) if len(batch) else None
        n_events = events.n_events
        self.stats.messages += len(payloads)
        self.stats.events += n_events
        self.stats.batches += 1
        self.stats.record_rejects(events.rejects)
        return touched, events.rejects


class RoutingCheck:
    """Finds the events of a batch that are on the wrong partition for their
    entity key by the source's routing (see the module docstring)."""

    def __init__(self, view, partition, n_partitions):
        self.view, self.partition, self.n_partitions = view, partition, n_partitions
        self.routing = view.source.routing
        self.misrouted_events = 0

    def misrouted(self, keys):
        """{event row: reason} of the rows of ``keys`` not on this partition."""
        if self.n_partitions <= 1 or not len(keys):
            return {}
        owners = partitions_of(keys, self.n_partitions, self.routing)
        rows = np.flatnonzero(owners != self.partition)
        if not len(rows):
            return {}
        if not self.misrouted_events:
            log.error("view %r partition %d: events keyed by %r arrive on other partitions "
                      "than their key routes to by %s; they are refused (dead letters) -- key "
                      "the topic's messages by %r and route them by the source's routing",
                      self.view.name, self.partition, self.view.key_column, self.routing,
                      self.view.key_column)
        self.misrouted_events += len(rows)
        return {int(row): self._reason(owners[row]) for row in rows}

    @property
    def seen_misrouted(self):
        return self.misrouted_events > 0

    def _reason(self, owner):
        return (f"misrouted: key {self.view.key_column!r} belongs to partition {owner} of "
                f"{self.n_partitions}, not {self.partition}, by the source's {self.routing} "
                f"routing; produce the topic keyed by {self.view.key_column!r} and routed by "
                f"{self.routing}, or the view's state would be split")
