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
import threading
import time

from tally.service.history.bootstrap import Bootstrap, BootstrapCancelled
from tally.core.enrich import table_key
from tally.service.ingest.checkpoint import CheckpointStore
from tally.service.ingest.dimensions import DimensionFeed
from tally.service.ingest.partition import IDLE_BATCHES_CAUGHT_UP, PartitionWorker, drive
from tally.service.metrics import (OnScrape, scrape_registry, seconds_since, serve_metrics,
                                   service_metrics)
from tally.service.pulsar.client import connect, partition_topics
from tally.service.pulsar.cluster import as_cluster
from tally.service.pulsar.topics import subscription_for
from tally.service.registry import Conflict
from tally.service.store import StoreError, open_store

REGISTRY_POLL_S = 1.0
# set by a SIGTERM that arrives while the service is still connecting
STOP_REQUESTED_DURING_STARTUP = threading.Event()

log = logging.getLogger("tally.serve")


class VersionRunner:
    """The partition workers computing one version of one view; first, if
    the service may read ledger lists (its cluster's admin URL) and some partition has
    no checkpoint yet, a bootstrap of those partitions from history."""

    def __init__(self, service, view, version, serving):
        self.view, self.version, self.serving = view, version, serving
        self.stopping = False
        self.service = service
        self.workers = []
        self.bootstrap = None
        self.bootstrap_progress = None        # (units done, units, events), for /metrics
        if service.cluster.admin_url:
            self.bootstrap = Bootstrap(
                view, service.cluster, service.store,
                service.checkpoints, service.subscription(view), version=version,
                serving=serving, readers=service.bootstrap_readers,
                progress=self._bootstrap_progressed)
            partitions = len(partition_topics(service.client, view.source.topic, True))
            if not self.bootstrap.pending_partitions(partitions):
                self.bootstrap = None         # every partition resumes from its checkpoint
        if self.bootstrap is None:
            self.start_workers()

    def _bootstrap_progressed(self, done, total, events, eta_s):
        self.bootstrap_progress = (done, total, events)

    def start_workers(self):
        service = self.service
        n_partitions = len(partition_topics(service.client, self.view.source.topic,
                                            require_partitioned=True))
        self.workers = [
            PartitionWorker(self.view, partition, service.client, service.store,
                            service.checkpoints, service.consumer_name,
                            subscription=service.subscription(self.view), version=self.version,
                            serving=self.serving,
                            checkpoint_interval_s=service.checkpoint_interval_s,
                            batch_size=service.batch_size, n_partitions=n_partitions,
                            dimensions=[service.dimension_feed(j) for j in self.view.joins],
                            properties=service.consumer_properties)
            for partition in range(n_partitions)]
        log.info("%s@v%d: %d partition workers on subscription %s", self.view.name,
                 self.version, n_partitions, service.subscription(self.view),
                 extra={"view": self.view.name, "version": self.version,
                        "subscription": service.subscription(self.view)})

    def caught_up_with(self, serving):
        """Whether every partition has read as far as the serving version's
        (or, with none, has found no more messages waiting)."""
        if not self.workers:
            return False                  # still bootstrapping
        for partition, worker in enumerate(self.workers):
            ahead = serving is not None and serving.workers and \
                worker.position >= serving.workers[partition].position
            if not (ahead or worker.idle_batches >= IDLE_BATCHES_CAUGHT_UP):
                return False
        return True


STALE_CHECKPOINT_S = 60.0
STANDBY_CHECK_S = 15.0
# A worker that has not begun a batch for this long is stuck (a receive or a
# store call that never returns): /health, the log and a gauge say so. The
# store's own retries are reported apart, so they do not count here.
STALLED_WORKER_S = 60.0


class StreamingService:
    """Runs view versions: a fixed list (``views``), or whatever the registry
    says should run (``registry``), following its changes without a restart."""

    def __init__(self, cluster, store_path, checkpoint_dir, views=(), services=(),
                 registry=None,
                 only_views=None, consumer_name=None, checkpoint_interval_s=5.0,
                 batch_size=1000, metrics_address=None, admin_url=None,
                 bootstrap_readers=None, subscription_prefix=None):
        # ``cluster``: a Cluster or a service URL. With an admin URL, versions
        # without checkpoints are bootstrapped by parallel readers; without it
        # they read history through their subscription.
        self.cluster = as_cluster(cluster, admin_url)
        self.bootstrap_readers = bootstrap_readers
        self.subscription_prefix = subscription_prefix
        self.client = connect(self.cluster)
        self.store = open_store(store_path)
        self.checkpoints = CheckpointStore(checkpoint_dir)
        self.consumer_name = consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        # shown to the other consumers of a subscription (the topic's stats):
        # a process standing by can tell whose store the partition feeds
        self.consumer_properties = {"tally_store": str(store_path)}
        self.standby = {}           # (view, version, partition) -> active consumer elsewhere
        self.checkpoint_interval_s, self.batch_size = checkpoint_interval_s, batch_size
        self.registry, self.only_views = registry, only_views
        self.runners = {}                     # (view name, version) -> VersionRunner
        self.tasks = {}                       # (view name, version) -> its worker tasks
        self.dimensions = {}                  # (dimension, key) -> DimensionFeed
        self.dimension_tasks = {}
        for view in views:
            self.runners[(view.name, 1)] = VersionRunner(self, view, 1, serving=True)
        if services:
            publish_services(self.store, [(s, 1) for s in services],
                             {v.name: v for v in views})
        self.stopping = None
        self.failures = []                    # partitions that could not go on
        self.metrics_address = metrics_address

    def subscription(self, view):
        return subscription_for(view, self.subscription_prefix)

    def dimension_feed(self, join):
        """The process's one feed of a join's dimension table (started with
        the first view that joins it)."""
        key = table_key(join)
        if key not in self.dimensions:
            self.dimensions[key] = DimensionFeed(join, self.client)
        return self.dimensions[key]

    def _start_dimension_feeds(self):
        loop = asyncio.get_running_loop()
        for key, feed in self.dimensions.items():
            if key not in self.dimension_tasks:
                self.dimension_tasks[key] = loop.create_task(
                    feed.run(self.pool, self.stopping.is_set))

    @property
    def workers(self):
        return [w for runner in self.runners.values() for w in runner.workers]

    async def run(self):
        self.stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        if STOP_REQUESTED_DURING_STARTUP.is_set():
            self.stopping.set()
        metrics_task = self._start_metrics()
        watchdog = loop.create_task(self._watch_workers())
        standby_watch = loop.create_task(self._watch_standby()) if self.cluster.admin_url \
            else None
        # receives block for at most a batch timeout, so threads cycle quickly
        self.pool = concurrent.futures.ThreadPoolExecutor(256, "tally-receive")
        for key in self.runners:
            self._start_tasks(key)
        if self.registry is not None:
            await self._follow_registry()
        else:
            await self.stopping.wait()
        for key in list(self.runners):
            await self._stop_runner(key)
        watchdog.cancel()
        if standby_watch:
            standby_watch.cancel()
        if metrics_task:
            metrics_task.cancel()
        await asyncio.gather(*self.dimension_tasks.values())
        for feed in self.dimensions.values():
            feed.close()
        self.pool.shutdown()
        self.close()
        return 1 if self.failures else 0

    def _start_tasks(self, key):
        runner = self.runners[key]
        loop = asyncio.get_running_loop()
        self._start_dimension_feeds()
        if runner.bootstrap is not None:
            self.tasks[key] = [loop.create_task(self._bootstrap_then_drive(loop, runner))]
        else:
            self.tasks[key] = [loop.create_task(self._drive(loop, runner, w))
                               for w in runner.workers]

    async def _bootstrap_then_drive(self, loop, runner):
        """Bootstrap on a thread (its readers are processes) while the other
        versions keep serving, then run the partition workers from the cut."""
        name = f"{runner.view.name}@v{runner.version}"
        log.info("bootstrapping %s from history", name)
        try:
            report = await loop.run_in_executor(None, runner.bootstrap.run)
            log.info("bootstrapped %s: %s", name, report)
        except BootstrapCancelled:
            return
        except Exception as error:
            # Exact either way: partitions without a checkpoint read their
            # history through the subscription instead, only slower.
            log.error("bootstrap of %s failed (%s); reading history through the "
                      "subscription instead", name, error)
        if runner.stopping or self.stopping.is_set():
            return
        runner.start_workers()
        self._start_dimension_feeds()
        await asyncio.gather(*(self._drive(loop, runner, w) for w in runner.workers))

    async def _stop_runner(self, key):
        """Let the runner's workers finish their batch and checkpoint, then close."""
        runner = self.runners.pop(key)
        runner.stopping = True
        if runner.bootstrap is not None:
            runner.bootstrap.cancel()
        await asyncio.gather(*self.tasks.pop(key, []))
        for worker in runner.workers:
            worker.close()

    async def _drive(self, loop, runner, worker):
        def stopping():
            return self.stopping.is_set() or runner.stopping
        try:
            await drive(worker, self.pool, lambda: not stopping(), stopping)
        except Exception as error:
            # Never silent: a partition that cannot make progress fails the
            # process (logged, on /health and /metrics, a non-zero exit), so
            # that a supervisor restarts it and Pulsar hands the partition on.
            name = f"{runner.view.name}@v{runner.version} partition {worker.partition}"
            log.exception("%s failed: %s; stopping the service", name, error)
            self.failures.append(f"{name}: {type(error).__name__}: {error}")
            self.stopping.set()

    def health(self):
        """``(healthy, details)`` for /health: unhealthy once a partition
        failed, while the online store fails, or while a partition's folded
        messages wait far longer than the checkpoint interval for a checkpoint
        (the dead-letter topic failing); "degraded" (healthy, with warnings)
        after a bootstrap left offloaded entries out or read some through the
        broker."""
        problems = list(self.failures)
        problems += [p for feed in self.dimensions.values() for p in feed.problems()]
        limit = max(STALE_CHECKPOINT_S, 10 * self.checkpoint_interval_s)
        problems += [f"{where}: no batch begun for {age:.0f} s (stuck in a receive or a "
                     "store call)" for where, age in self.stalled_workers()]
        for worker in self.workers:
            where = f"{worker.view.name} partition {worker.partition}"
            age = seconds_since(worker.last_checkpoint)
            if worker.unacknowledged is not None and age > limit:
                problems.append(f"{where}: no checkpoint for {age:.0f} s")
            if worker.writer.failing is not None:
                since, error = worker.writer.failing
                problems.append(f"{where}: the online store has failed for "
                                f"{seconds_since(since):.0f} s ({error})")
        # what went wrong but leaves the service serving: said, not failing it
        warnings = [w for runner in self.runners.values() if runner.bootstrap is not None
                    for w in runner.bootstrap.warnings()]
        details = {"status": "failing" if problems else "degraded" if warnings else "ok"}
        if problems:
            details["problems"] = problems
        if warnings:
            details["warnings"] = warnings
        return not problems, details

    def stalled_workers(self):
        """(where, seconds) of the workers that have begun no batch for
        STALLED_WORKER_S, the store failing aside."""
        return [(f"{w.view.name} partition {w.partition}", seconds_since(w.last_batch))
                for w in self.workers
                if seconds_since(w.last_batch) > STALLED_WORKER_S and w.writer.failing is None]

    async def _watch_workers(self):
        """Log each stalled worker once per stall (health and metrics are
        read on request)."""
        logged = set()
        while True:
            await asyncio.sleep(STALLED_WORKER_S / 4)
            stalled = dict(self.stalled_workers())
            for where in stalled.keys() - logged:
                log.error("%s: no batch begun for %.0f s: stuck in a receive or a store "
                          "call; /health reports it", where, stalled[where])
            logged = set(stalled)

    async def _watch_standby(self):
        """Every STANDBY_CHECK_S, ask the broker which consumer is active on
        each of our partitions' subscriptions; log a change of ownership, and
        warn when the active one writes another store: a second deployment
        on the same subscription names, which leaves this process standing
        by for ever while its store gets nothing."""
        from tally.service.pulsar.admin import Admin
        admin, loop = Admin(self.cluster), asyncio.get_running_loop()
        while True:
            for worker in list(self.workers):
                try:
                    stats = await loop.run_in_executor(None, admin.topic_stats, worker.topic)
                except Exception as error:          # the broker's to answer; try again later
                    log.debug("stats of %s: %s", worker.topic, error)
                    continue
                self._note_active_consumer(worker, stats.get("subscriptions", {})
                                           .get(worker.subscription, {}))
            await asyncio.sleep(STANDBY_CHECK_S)

    def _note_active_consumer(self, worker, subscription):
        active = subscription.get("activeConsumerName")
        if active is None:
            return                         # no consumer connected yet: nothing to tell
        key = (worker.view.name, worker.schema.version, worker.partition)
        before = self.standby.get(key, "")
        other = None if active == self.consumer_name else active
        if other == before:
            return
        self.standby[key] = other
        fields = {"view": worker.view.name, "version": worker.schema.version,
                  "partition": worker.partition, "subscription": worker.subscription,
                  "active_consumer": other or self.consumer_name}
        where = f"{worker.view.name}@v{worker.schema.version} partition {worker.partition}"
        if other is None:
            log.info("%s: this process is the active consumer of subscription %s", where,
                     worker.subscription, extra=fields)
            return
        store = next((c.get("metadata", {}).get("tally_store")
                      for c in subscription.get("consumers", [])
                      if c.get("consumerName") == other), None)
        if store == self.consumer_properties["tally_store"]:
            log.info("%s: standing by; %s is the active consumer of subscription %s",
                     where, other, worker.subscription, extra=fields)
        else:
            log.warning("%s: standing by while %s, writing another store (%s), is the active "
                        "consumer of subscription %s: this process's store %s gets none of "
                        "this partition. Give each deployment its own --subscription-prefix",
                        where, other, store or "unknown", worker.subscription,
                        self.consumer_properties["tally_store"],
                        extra=dict(fields, store=store))

    def _start_metrics(self):
        if not self.metrics_address:
            return None
        host, port = self.metrics_address

        async def serve():
            try:
                await serve_metrics(scrape_registry(OnScrape(self.current_metrics)), host, port,
                                    self.health)
            except OSError as error:
                log.warning("metrics endpoint %s:%s unavailable: %s", host, port, error)
        return asyncio.get_running_loop().create_task(serve())

    def current_metrics(self):
        """The service's metrics as of now, read from its workers' counters
        (at each scrape: a series goes with its worker)."""
        metrics, now_ms = service_metrics(), time.time() * 1000
        for runner in self.runners.values():
            if runner.bootstrap_progress is not None:
                done, total, events = runner.bootstrap_progress
                labels = {"view": runner.view.name, "version": runner.version}
                metrics.set("tally_bootstrap_units", done, state="done", **labels)
                metrics.set("tally_bootstrap_units", total, state="total", **labels)
                metrics.set("tally_bootstrap_events_total", events, **labels)
                if runner.bootstrap is not None:
                    metrics.set("tally_bootstrap_direct_fallbacks_total",
                                runner.bootstrap.direct_fallbacks, **labels)
                    for reason, count in dict(runner.bootstrap.entries_left_out).items():
                        metrics.set("tally_bootstrap_entries_left_out_total", count,
                                    reason=reason, **labels)
        for worker in self.workers:
            labels = {"view": worker.view.name, "version": worker.schema.version,
                      "partition": worker.partition}
            stats = worker.stats
            for name, value in (("tally_events_total", stats.events),
                                ("tally_messages_total", stats.messages),
                                ("tally_dead_letters_total", stats.rejected),
                                ("tally_batches_total", stats.batches),
                                ("tally_batch_seconds_total", round(stats.busy_seconds, 6)),
                                ("tally_checkpoints_total", stats.checkpoints),
                                ("tally_store_write_retries_total", stats.store_retries),
                                ("tally_store_refused_total", stats.store_refused),
                                ("tally_corrupt_checkpoints_total", stats.corrupt_checkpoints),
                                ("tally_dead_letter_failures_total",
                                 stats.dead_letter_failures),
                                ("tally_join_misses_total", stats.join_misses),
                                ("tally_misrouted_events_total", stats.misrouted),
                                ("tally_checkpoint_age_seconds",
                                 seconds_since(worker.last_checkpoint)),
                                ("tally_batch_age_seconds", seconds_since(worker.last_batch)),
                                ("tally_unacknowledged", int(worker.unacknowledged is not None))):
                metrics.set(name, value, **labels)
        metrics.set("tally_partition_failures", len(self.failures))
        for worker in self.workers:
            metrics.set("tally_subscription", 1, view=worker.view.name,
                        version=worker.schema.version, subscription=worker.subscription)
            if self.cluster.admin_url:
                other = self.standby.get((worker.view.name, worker.schema.version,
                                          worker.partition))
                metrics.set("tally_partition_standby", int(other is not None),
                            view=worker.view.name, version=worker.schema.version,
                            partition=worker.partition, subscription=worker.subscription,
                            active_consumer=other or self.consumer_name)
        for feed in self.dimensions.values():
            labels = {"dimension": feed.name}
            metrics.set("tally_dimension_rows_total", feed.rows, **labels)
            metrics.set("tally_dimension_keys", len(feed.table), **labels)
            metrics.set("tally_dimension_dead_letters_total", feed.rejected, **labels)
            metrics.set("tally_dimension_late_rows_total", feed.table.late_rows, **labels)
            metrics.set("tally_dimension_unsynced_batches_total", feed.unsynced_batches,
                        **labels)
            if feed.synced_at is not None:
                metrics.set("tally_dimension_sync_age_seconds",
                            seconds_since(feed.synced_at), **labels)
        for worker in self.workers:
            labels = {"view": worker.view.name, "version": worker.schema.version,
                      "partition": worker.partition}
            stats = worker.stats
            if stats.watermark_ms is not None:
                metrics.set("tally_event_time_lag_seconds",
                            round((now_ms - stats.watermark_ms) / 1000, 3), **labels)
                metrics.set("tally_freshness_seconds",
                            round(stats.freshness_ms / 1000, 3), **labels)
        return metrics

    def close(self):
        self.store.close()
        self.client.close()

    # -- the deployment cycle -------------------------------------------------

    async def _follow_registry(self):
        """Poll the registry: start new versions, stop retired ones, promote a
        candidate once it has caught up with the version it replaces."""
        self.registry.set_deploy_mode("managed")
        seen = None
        while not self.stopping.is_set():
            sequence = self.registry.sequence()
            if sequence != seen:
                await self._reconcile()
                seen = sequence
            self._promote_caught_up()
            try:
                await asyncio.wait_for(self.stopping.wait(), REGISTRY_POLL_S)
            except asyncio.TimeoutError:
                pass

    def _desired(self):
        desired = {}
        for deployment in self.registry.deployments():
            if self.only_views and deployment.name not in self.only_views:
                continue
            if deployment.current:
                desired[(deployment.name, deployment.current.version)] = \
                    (deployment.current.definition, True)
            if deployment.candidate and not deployment.same_state:
                desired[(deployment.name, deployment.candidate.version)] = \
                    (deployment.candidate.definition, False)
        return desired

    async def _reconcile(self):
        self._publish_services()
        desired = self._desired()
        for key in [k for k in self.runners if k not in desired]:
            log.info("stopping %s@v%d", *key)
            await self._stop_runner(key)
        for key, (view, serving) in desired.items():
            runner = self.runners.get(key)
            if runner is None:
                log.info("starting %s@v%d (%s)", *key, "serving" if serving else "candidate")
                self.runners[key] = VersionRunner(self, view, key[1], serving)
                self._start_tasks(key)
            elif serving and not runner.serving:      # promoted elsewhere, or rolled back
                self.store.promote(*key)
                runner.serving = True

    def _publish_services(self):
        """Write the registry's current feature services into the store, for
        lookup servers that read no registry (every serve process does it:
        the writes are idempotent), and drop the retired ones."""
        views = {d.name: d for d in self.registry.current_definitions("view")}
        current = [(info.definition, info.version) for info in self.registry.list("service")
                   if info.state == "current"]
        publish_services(self.store, current, views, drop_others=True)

    def _promote_caught_up(self):
        serving = {name: r for (name, _), r in self.runners.items() if r.serving}
        for (name, version), runner in list(self.runners.items()):
            if runner.serving or not runner.caught_up_with(serving.get(name)):
                continue
            try:
                self.registry.promote(name, version)
            except Conflict:
                continue              # the registry moved on; the next reconcile follows it
            self.store.promote(name, version)
            runner.serving = True
            log.info("promoted %s@v%d: it has caught up", name, version)


def publish_services(store, services, views, drop_others=False):
    """Put each (FeatureService, version) into ``store`` in its served form;
    with ``drop_others`` (the registry is the whole truth), drop the store's
    services not among them."""
    from tally.core.serving import ServedService
    names = set()
    for service, version in services:
        served = ServedService.of(service, views, version)
        names.add(service.name)
        if _stored(store, service.name) != served.to_bytes():
            store.put_service(service.name, served.to_bytes())
            log.info("published feature service %s@v%d", service.name, version)
    for name in set(store.services()) - names if drop_others else ():
        store.drop_service(name)
        log.info("dropped feature service %s", name)


def _stored(store, name):
    try:
        return store.service(name)
    except StoreError:
        return None
