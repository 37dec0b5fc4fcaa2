"""Writing the online records of the entities a batch touched.

Records are a function of the state, so a write that fails loses nothing:
the writer waits and writes again. It waits asynchronously (``asyncio.sleep``),
so one store outage pauses the partitions that write, never the event loop:
``/health``, ``/metrics``, the other views and SIGTERM keep being served.
"""
import asyncio
import errno
import logging
import os
import time

import numpy as np

from tally.core.materialize import records_for
from tally.core.view import EVENT_TIME
from tally.service.store import is_permanent

log = logging.getLogger("tally.ingest")

FIRST_RETRY_S = 0.05
MAX_RETRY_S = 30.0
# Fault injection for tests: while this file exists, every write fails as on
# a full volume (``TALLY_FAIL_STORE_WHILE=/path/to/flag``).
_FAIL_WHILE = os.environ.get("TALLY_FAIL_STORE_WHILE")


class WriteAbandoned(Exception):
    """The service is stopping while the store still fails: the batch's
    records were not written (so its messages must not be acknowledged)."""


class RecordWriter:
    """Writes one view version's records into the online store.

    A store error is transient unless the store says it is permanent
    (``tally.service.store.is_permanent``: a record too large, a TTL the
    namespace forbids): transient ones are waited out, a permanent one is
    narrowed to the entities it concerns, each of which is reported to
    ``on_refused(key, error)`` (a metric, a log line, a dead letter) and
    never written again -- the others are."""

    def __init__(self, view, store, schema, serving, clock, stats, on_refused=None):
        self.view, self.store, self.schema = view, store, schema
        self.clock, self.stats = clock, stats
        self.on_refused = on_refused
        self.failing = None             # (since, error) while the store keeps failing
        # A candidate writes into its own records, served once promoted.
        self.version = None if serving else schema.version
        store.register_view(schema, current=serving, expiry_ms=view.online_expiry)

    async def write(self, state, slots, stopping=None):
        """Write the records of ``slots``, retrying with backoff while the
        store fails; raises WriteAbandoned if ``stopping()`` becomes true."""
        try:
            now = await self._write_retrying(state, slots, stopping)
        except Exception as error:
            if not is_permanent(error):
                raise
            now = await self._write_one_by_one(state, slots, stopping)
        self._observe(state, slots, now)

    async def _write_retrying(self, state, slots, stopping):
        keys = state.index.keys_of(slots)
        delay = FIRST_RETRY_S
        while True:
            now = self.clock()
            try:
                if _FAIL_WHILE and os.path.exists(_FAIL_WHILE):
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                await self._write(self.view.name, keys,
                                  records_for(state, self.schema, slots, now, now),
                                  version=self.version)
                self.failing = None
                return now
            except Exception as error:          # a store failure: wait, unless permanent
                if is_permanent(error):
                    raise
                if self.failing is None:
                    self.failing = (time.monotonic(), error)
                self.stats.store_retries += 1
                log.warning("%s: online store write failed (%s); retrying in %.2f s",
                            self.view.name, error, delay)
                if stopping is not None and stopping():
                    raise WriteAbandoned(str(error)) from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)

    async def _write_one_by_one(self, state, slots, stopping):
        """After a permanent refusal: each entity alone, so only the records
        the store refuses are left out."""
        now = self.clock()
        for slot in slots:
            one = np.array([slot])
            try:
                now = await self._write_retrying(state, one, stopping)
            except Exception as error:
                if not is_permanent(error):
                    raise
                self._refused(state.index.keys_of(one)[0], error)
        return now

    async def _write(self, view, keys, records, version):
        """A store with blocking calls (Aerospike: round trips, retries) offers
        ``write_async``, which runs them off the event loop; LMDB's writes take
        microseconds and run inline."""
        write_async = getattr(self.store, "write_async", None)
        if write_async is not None:
            await write_async(view, keys, records, version=version)
        else:
            self.store.write(view, keys, records, version=version)

    def _refused(self, key, error):
        self.stats.store_refused += 1
        log.error("%s: the online store refused the record of entity %r for good (%s); "
                  "it is dead-lettered and not written", self.view.name, key, error)
        if self.on_refused is not None:
            self.on_refused(key, error)

    def _observe(self, state, slots, now):
        if not len(slots):
            return
        newest, _ = state.arenas[EVENT_TIME].read(slots, now)
        newest = int(np.nanmax(newest))
        self.stats.watermark_ms = max(newest, self.stats.watermark_ms or newest)
        self.stats.freshness_ms = now - newest
