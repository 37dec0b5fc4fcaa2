"""Writing the online records of the entities a batch touched.

Records are a function of the state, so a write that fails loses nothing:
the writer waits and writes again. It waits asynchronously (``asyncio.sleep``),
so one store outage pauses the partitions that write, never the event loop:
``/health``, ``/metrics``, the other views and SIGTERM keep being served.
"""
import asyncio
import logging

import numpy as np

from tally.core.materialize import records_for
from tally.core.view import EVENT_TIME

log = logging.getLogger("tally.ingest")

FIRST_RETRY_S = 0.05
MAX_RETRY_S = 30.0


class WriteAbandoned(Exception):
    """The service is stopping while the store still fails: the batch's
    records were not written (so its messages must not be acknowledged)."""


class RecordWriter:
    """Writes one view version's records into the online store."""

    def __init__(self, view, store, schema, serving, clock, stats):
        self.view, self.store, self.schema = view, store, schema
        self.clock, self.stats = clock, stats
        # A candidate writes into its own records, served once promoted.
        self.version = None if serving else schema.version
        store.register_view(schema, current=serving)

    async def write(self, state, slots, stopping=None):
        """Write the records of ``slots``, retrying with backoff while the
        store fails; raises WriteAbandoned if ``stopping()`` becomes true."""
        keys = state.index.keys_of(slots)
        delay = FIRST_RETRY_S
        while True:
            now = self.clock()
            try:
                self.store.write(self.view.name, keys,
                                 records_for(state, self.schema, slots, now, now),
                                 version=self.version)
                break
            except Exception as error:          # any store failure: wait, then retry
                self.stats.store_retries += 1
                log.warning("%s: online store write failed (%s); retrying in %.2f s",
                            self.view.name, error, delay)
                if stopping is not None and stopping():
                    raise WriteAbandoned(str(error)) from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)
        self._observe(state, slots, now)

    def _observe(self, state, slots, now):
        if not len(slots):
            return
        newest, _ = state.arenas[EVENT_TIME].read(slots, now)
        newest = int(np.nanmax(newest))
        self.stats.watermark_ms = max(newest, self.stats.watermark_ms or newest)
        self.stats.freshness_ms = now - newest
