"""A brute-force, pure-Python reference of every aggregation and window.

It keeps every event and recomputes each value from its definition, sharing
no code with the Cython arenas: the tests use it as their oracle.

Semantics (the same contract as ``tally.core.arena``):

* a window of ``window_ms`` with hop ``hop_ms`` read as of ``t`` covers the
  events whose epoch ``ts // hop_ms`` lies in ``(t // hop_ms - window_ms //
  hop_ms, t // hop_ms]``; lifetime (``window_ms == 0``) covers every event;
* the ring keeps ``window + ceil(lateness / hop)`` hops behind the entity's
  newest event; an event older than that when it arrives is dropped;
* NaN values are nulls and are skipped (count counts every event);
* first/last order by event time; among equal times the earliest/latest
  arrival wins; last_n lists the newest first and never drops an event as
  late (its window only filters what it reads);
* distinct_count and top_k are exact here (the count of distinct values, and
  a dict of every value's count): the tests check the arenas' approximations
  against them within the documented bounds.
"""
import math
from dataclasses import dataclass, field


@dataclass
class ReferenceEntity:
    events: list = field(default_factory=list)     # accepted (ts, value, arrival)
    newest_epoch: int = None


class ReferenceFeature:
    def __init__(self, aggregation, window_ms=0, hop_ms=0, lateness_ms=0, param=None):
        self.aggregation = aggregation
        self.param = param
        self.hop_ms = hop_ms if window_ms else 0
        self.window_tiles = window_ms // hop_ms if window_ms else 1
        lateness_tiles = -(-lateness_ms // hop_ms) if window_ms else 0
        self.ring_tiles = self.window_tiles + lateness_tiles
        self.entities = {}
        self.late_dropped = 0
        self._arrivals = 0

    def update(self, key, ts, value=math.nan, applies=True):
        entity = self.entities.setdefault(key, ReferenceEntity())
        if not applies or (self.aggregation != "count" and math.isnan(value)):
            return
        self._arrivals += 1
        if self.hop_ms:
            epoch = ts // self.hop_ms
            too_late = (entity.newest_epoch is not None
                        and epoch <= entity.newest_epoch - self.ring_tiles)
            if too_late and self.aggregation != "last_n":
                self.late_dropped += 1
                return
            if entity.newest_epoch is None or epoch > entity.newest_epoch:
                entity.newest_epoch = epoch
        entity.events.append((ts, value, self._arrivals))

    def in_window(self, entity, as_of):
        if not self.hop_ms or not entity.events:
            return list(entity.events)
        current = as_of // self.hop_ms
        oldest = current - self.window_tiles
        if self.aggregation != "last_n":      # last_n keeps no ring of tiles
            oldest = max(oldest, entity.newest_epoch - self.ring_tiles)
        return [e for e in entity.events if oldest < e[0] // self.hop_ms <= current]

    def read(self, key, as_of):
        """The value as of ``as_of``, or None where the arena reports invalid."""
        entity = self.entities.get(key)
        if entity is None:
            return None
        events = self.in_window(entity, as_of)
        values = [v for _, v, _ in events]
        agg = self.aggregation
        if agg == "count":
            return len(events)
        if agg == "sum":
            return math.fsum(values)
        if agg == "last_n":
            newest_first = sorted(events, key=lambda e: (e[0], e[2]), reverse=True)
            return [v for _, v, _ in newest_first[:self.param]]
        if agg == "distinct_count":
            return len({v + 0.0 for v in values})
        if agg == "top_k":
            counts = {}
            for v in values:
                counts[v + 0.0] = counts.get(v + 0.0, 0) + 1
            return counts
        if not events:
            return None
        if agg == "mean":
            return math.fsum(values) / len(values)
        if agg == "min":
            return min(values)
        if agg == "max":
            return max(values)
        if agg == "first":
            return min(events, key=lambda e: (e[0], e[2]))[1]
        if agg == "last":
            return max(events, key=lambda e: (e[0], e[2]))[1]
        raise ValueError(f"unknown aggregation {agg!r}")
