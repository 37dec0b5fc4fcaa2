"""``tally serve``: the streaming service.

One asyncio task (on uvloop) per (view, partition) drives a PartitionWorker:
receive a batch on a thread (the Pulsar client releases the GIL while it
waits), fold it on the loop, checkpoint every few seconds. Several processes
can run the same views: their workers share one Failover subscription per view
version, Pulsar assigns each partition to one of them, and a process that
gains a partition restores its checkpoint first.

SIGTERM or SIGINT: every worker finishes its batch, checkpoints, acknowledges,
and the process exits 0.
"""
import asyncio
import concurrent.futures
import logging
import os
import signal
import socket

from tally.core.definitions import FeatureView, state_hash
from tally.service.checkpoint import CheckpointStore
from tally.service.client import connect
from tally.service.lmdb_store import LmdbStore
from tally.service.partition import PartitionWorker

log = logging.getLogger("tally.serve")


def subscription_for(view):
    """One subscription per view state: a new version computes alongside the old."""
    return f"tally.{view.name}.{state_hash(view)[:16]}"


class StreamingService:
    def __init__(self, views, pulsar_url, store_path, checkpoint_dir, consumer_name=None,
                 checkpoint_interval_s=5.0, batch_size=1000):
        self.views = list(views)
        self.client = connect(pulsar_url)
        self.store = LmdbStore(store_path)
        self.checkpoints = CheckpointStore(checkpoint_dir)
        self.consumer_name = consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.workers = [
            PartitionWorker(view, partition, self.client, self.store, self.checkpoints,
                            self.consumer_name, subscription=subscription_for(view),
                            checkpoint_interval_s=checkpoint_interval_s,
                            batch_size=batch_size)
            for view in self.views
            for partition in range(_partition_count(self.client, view.source.topic))]
        self.stopping = None

    async def run(self):
        self.stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        with concurrent.futures.ThreadPoolExecutor(len(self.workers), "tally-receive") as pool:
            await asyncio.gather(*(self._drive(loop, pool, w) for w in self.workers))
        self.close()

    async def _drive(self, loop, pool, worker):
        while not self.stopping.is_set():
            messages = await loop.run_in_executor(pool, worker.receive)
            worker.process(messages)
        if worker.unacknowledged is not None:
            worker.checkpoint()

    def close(self):
        for worker in self.workers:
            worker.close()
        self.store.close()
        self.client.close()


def _partition_count(client, topic):
    partitions = client.get_topic_partitions(topic)
    if len(partitions) <= 1 and not partitions[0].rsplit("-partition-", 1)[-1].isdigit():
        raise ValueError(f"topic {topic!r} is not partitioned; tally serve shards state by "
                         "partition: create it with partitions (e.g. 4)")
    return len(partitions)


def main(argv=None):
    import argparse

    import uvloop

    from tally.service.registry import load_file

    parser = argparse.ArgumentParser(prog="tally serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("definitions", help="a .py or .sql file of feature views")
    parser.add_argument("--views", help="comma-separated view names (default: all)")
    parser.add_argument("--pulsar", default="pulsar://127.0.0.1:6650")
    parser.add_argument("--store", default=os.path.join(".tally", "store"))
    parser.add_argument("--checkpoints", default=os.path.join(".tally", "checkpoints"))
    parser.add_argument("--name", help="consumer name of this process (default host-pid)")
    parser.add_argument("--checkpoint-interval", type=float, default=5.0, metavar="SECONDS")
    args = parser.parse_args(argv)

    views = [d for d in load_file(args.definitions) if isinstance(d, FeatureView)]
    if args.views:
        wanted = args.views.split(",")
        views = [v for v in views if v.name in wanted]
        missing = set(wanted) - {v.name for v in views}
        if missing:
            parser.error(f"no view named {sorted(missing)} in {args.definitions}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    service = StreamingService(views, args.pulsar, args.store, args.checkpoints,
                               consumer_name=args.name,
                               checkpoint_interval_s=args.checkpoint_interval)
    log.info("serving %s over %d partition workers", [v.name for v in views],
             len(service.workers))
    uvloop.run(service.run())
    return 0
