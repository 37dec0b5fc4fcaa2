"""Ingest one view from a script: the production path, without a service.

``Ingestion(view, client, store).run(until=...)`` runs one
:class:`PartitionWorker` per partition of the view's topic -- the same
workers ``tally serve`` runs, with their checkpoints (in a temporary
directory unless one is given) -- on uvloop until ``until(ingestion)`` is
true or no message has come for ``idle_timeout_s``. The quick start and the
ingest benchmark use it, so the rate they report is the rate production gets.
A view with joins gets the same dimension feeds as in ``tally serve``.
"""
import asyncio
import concurrent.futures
import os
import shutil
import socket
import tempfile
import time

from tally.service.ingest.checkpoint import CheckpointStore
from tally.service.ingest.dimensions import DimensionFeed
from tally.service.ingest.fold import IngestStats
from tally.service.ingest.partition import PartitionWorker, drive
from tally.service.pulsar.client import partition_topics


class Ingestion:
    """One view ingested by one PartitionWorker per partition."""

    def __init__(self, view, client, store, checkpoint_dir=None, subscription="tally",
                 **worker_options):
        self.view = view
        self._own_dir = checkpoint_dir is None
        self.checkpoint_dir = checkpoint_dir or tempfile.mkdtemp(prefix="tally-checkpoints-")
        self.checkpoints = CheckpointStore(self.checkpoint_dir)
        name = f"{socket.gethostname()}-{os.getpid()}"
        topics = partition_topics(client, view.source.topic)
        self.feeds = [DimensionFeed(join, client) for join in view.joins]
        self.workers = [
            PartitionWorker(view, index, client, store, self.checkpoints, name,
                            subscription=subscription, topic=topic, n_partitions=len(topics),
                            dimensions=self.feeds, **worker_options)
            for index, topic in enumerate(topics)]

    @property
    def stats(self):
        """The counters of every partition, summed."""
        total = IngestStats()
        for worker in self.workers:
            total.add(worker.stats)
        return total

    @property
    def entities(self):
        return sum(len(worker.state) for worker in self.workers)

    def run(self, until=None, idle_timeout_s=None):
        """Ingest until ``until(self)`` or ``idle_timeout_s`` without messages."""
        import uvloop
        uvloop.run(self._run(until, idle_timeout_s))
        return self

    async def _run(self, until, idle_timeout_s):
        last_message = [time.monotonic()]
        seen = [0]

        def keep_going():
            messages = sum(w.stats.messages for w in self.workers)
            if messages != seen[0]:
                seen[0], last_message[0] = messages, time.monotonic()
            if until is not None and until(self):
                return False
            return idle_timeout_s is None or time.monotonic() - last_message[0] <= idle_timeout_s

        done = asyncio.Event()
        threads = len(self.workers) + len(self.feeds)
        with concurrent.futures.ThreadPoolExecutor(threads, "tally-receive") as pool:
            feeds = [asyncio.get_running_loop().create_task(feed.run(pool, done.is_set))
                     for feed in self.feeds]
            await asyncio.gather(*(drive(w, pool, keep_going, fold_last=True)
                                   for w in self.workers))
            done.set()
            await asyncio.gather(*feeds)

    def close(self):
        for worker in self.workers:
            worker.close()
        for feed in self.feeds:
            feed.close()
        if self._own_dir:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
