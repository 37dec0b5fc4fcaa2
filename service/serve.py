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
import time

from tally.core.definitions import FeatureView, state_hash
from tally.service.checkpoint import CheckpointStore
from tally.service.client import connect
from tally.service.lmdb_store import LmdbStore
from tally.service.metrics import seconds_since, serve_metrics, service_metrics
from tally.service.partition import PartitionWorker

log = logging.getLogger("tally.serve")


def subscription_for(view):
    """One subscription per view state: a new version computes alongside the old."""
    return f"tally.{view.name}.{state_hash(view)[:16]}"


class StreamingService:
    def __init__(self, views, pulsar_url, store_path, checkpoint_dir, consumer_name=None,
                 checkpoint_interval_s=5.0, batch_size=1000, metrics_address=None):
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
        self.metrics = service_metrics()
        self.metrics_address = metrics_address

    async def run(self):
        self.stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        metrics_task = self._start_metrics()
        with concurrent.futures.ThreadPoolExecutor(len(self.workers), "tally-receive") as pool:
            await asyncio.gather(*(self._drive(loop, pool, w) for w in self.workers))
        if metrics_task:
            metrics_task.cancel()
        self.close()

    def _start_metrics(self):
        if not self.metrics_address:
            return None
        host, port = self.metrics_address

        async def serve():
            try:
                await serve_metrics(self.metrics, host, port, self.refresh_metrics)
            except OSError as error:
                log.warning("metrics endpoint %s:%s unavailable: %s", host, port, error)
        return asyncio.get_running_loop().create_task(serve())

    def refresh_metrics(self):
        """Copy every worker's counters into the metrics, just before a scrape."""
        now_ms = time.time() * 1000
        for worker in self.workers:
            labels = {"view": worker.view.name, "partition": worker.partition}
            stats = worker.stats
            for name, value in (("tally_events_total", stats.events),
                                ("tally_messages_total", stats.messages),
                                ("tally_dead_letters_total", stats.rejected),
                                ("tally_batches_total", stats.batches),
                                ("tally_batch_seconds_total", round(stats.busy_seconds, 6)),
                                ("tally_checkpoints_total", stats.checkpoints),
                                ("tally_store_write_retries_total", stats.store_retries),
                                ("tally_checkpoint_age_seconds",
                                 seconds_since(worker.last_checkpoint)),
                                ("tally_unacknowledged", int(worker.unacknowledged is not None))):
                self.metrics.set(name, value, **labels)
            if stats.watermark_ms is not None:
                self.metrics.set("tally_event_time_lag_seconds",
                                 round((now_ms - stats.watermark_ms) / 1000, 3), **labels)
                self.metrics.set("tally_freshness_seconds",
                                 round(stats.freshness_ms / 1000, 3), **labels)

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
    parser.add_argument("--metrics", default="127.0.0.1:9464", metavar="HOST:PORT",
                        help="Prometheus endpoint (/metrics, /health); 'off' disables it")
    args = parser.parse_args(argv)
    metrics_address = None
    if args.metrics != "off":
        host, _, port = args.metrics.rpartition(":")
        metrics_address = (host or "127.0.0.1", int(port))

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
                               checkpoint_interval_s=args.checkpoint_interval,
                               metrics_address=metrics_address)
    log.info("serving %s over %d partition workers", [v.name for v in views],
             len(service.workers))
    uvloop.run(service.run())
    return 0
