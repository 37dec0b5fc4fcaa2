"""Bootstrap: a view version's state from all of history, then an exact
handover to the stream.

With infinite retention and tiered storage the topic is the history. The
bootstrap cuts each partition at its last confirmed entry (``history``),
splits what lies before the cut (and an optional Parquet archive older than
the topic) into work units, and lets N reader processes fold the units into
partial states in parallel. A unit of BookKeeper ledgers is read through a
subscription started at its exact first entry; a unit of offloaded ledgers
is read straight from object storage, the broker idle
(``tally.service.history.tiered``), or through the broker when its objects
cannot be read. The partial states of a partition are merged in log
order (``ViewState.merge`` folds the state of a later part of a stream into an
earlier one exactly), the partition's records are written to the online
store, and the handover is a checkpoint whose position is the cut: the
partition worker restores it and folds only messages after the cut. No event
is missed, none counted twice, however much producers write meanwhile. The
subscription is also moved to the cut so the worker does not re-read history
(a speed-up only: the checkpoint position alone makes the handover exact).

Work units are saved as they complete under ``<checkpoints>/<view>/<state
hash>/bootstrap/`` with the plan (and so the cut): an interrupted bootstrap
resumes from the completed units.

Malformed history events are refused by the same decoder as the stream's and
counted in the report; they are not dead-lettered again (the stream did that
when they arrived, and the messages themselves stay in the topic).

A view with joins: the coordinator loads each dimension's whole history (its
archive and topic) into its table once, saved beside the plan, and every
reader joins its events with it as a training set does -- each event with the
dimension row valid at its time, whichever reader folds it.
"""
import json
import logging
import os
import pickle
import shutil
import threading
import time
from collections import Counter

import numpy as np

import pyarrow.parquet as pq

from tally.core import events as rules
from tally.core import snapshot
from tally.core.archive import archive_boundary, open_dataset
from tally.core.formats import schema_of
from tally.core.definitions import state_hash
from tally.core.enrich import Enricher
from tally.core.errors import TallyError
from tally.core.materialize import online_schema, records_for
from tally.core.routing import partitions_of
from tally.core.view import ViewState
from tally.service.history.plan import (TopicUnit, cut_position, last_position, plan_archive,
                                        unit_from_dict)
from tally.service.history.readers import (MIN_UNIT_BYTES, UNITS_PER_READER, client_for,
                                           ReaderPool, fold_unit, partition_count, plan_units,
                                           read_units)
from tally.service.history.tiered import object_store, plan_direct_reads
from tally.service.ingest.checkpoint import CheckpointConflict
from tally.service.pulsar.admin import Admin
from tally.service.ingest.fold import RoutingCheck
from tally.service.pulsar.topics import partition_topic

log = logging.getLogger("tally.bootstrap")

WRITE_CHUNK = 50_000           # records per online-store transaction at handover
PLAN_FILE = "plan.json"
DIMENSIONS_FILE = "dimensions.pickle"


class BootstrapError(TallyError, RuntimeError):
    """The bootstrap could not complete; completed work units are kept."""


class BootstrapCancelled(BootstrapError):
    """``cancel()`` was called; completed work units are kept."""


# --------------------------------------------------------------------------
# Reader processes: one work unit in, one partial state file out.

def read_topic_unit(view, cluster, unit, out_path, events_from_ms=None, n_partitions=1,
                    dimensions_path=None, store=None):
    """Fold the messages of ``unit`` into a fresh state and save it; events
    on the wrong partition for their key are refused, as the stream does.
    ``store``: the object store of a unit read directly."""
    started = time.monotonic()
    decode_schema = schema_of(view.source)
    routing = RoutingCheck(view, unit.partition, n_partitions)

    def fold(batches):
        state, tally = ViewState(view), _UnitTally()
        enrich = _enricher(view, dimensions_path)
        for payloads, times, malformed in batches:
            if malformed:         # a corrupt offloaded entry: logged, reported, on /health
                log.warning("%s partition %d entries %s..%s: entries left out: %s", view.name,
                            unit.partition, unit.first, unit.last, malformed)
                tally.left_out(malformed)
            tally.fold(state, view, decode_schema, payloads, times, events_from_ms, routing,
                       enrich)
        return state, tally, enrich
    (state, tally, enrich), fallback = fold_unit(cluster, view.source.topic, unit, view.source,
                                                 store, fold)
    _save_states(out_path, {"": state})
    return tally.summary(time.monotonic() - started, enrich, fallback)


def read_archive_unit(view, archive_uri, unit, n_partitions, out_path, events_before_ms,
                      dimensions_path=None):
    """Fold the rows of ``unit`` into one fresh state per partition and save them."""
    started = time.monotonic()
    _, filesystem = open_dataset(archive_uri)
    columns = [name for name, _ in view.source.schema]
    with filesystem.open_input_file(unit.path) as handle:
        parquet = pq.ParquetFile(handle)
        columns = [c for c in columns if c in parquet.schema_arrow.names]
        table = parquet.read_row_groups(list(unit.row_groups), columns=columns)
    events, dropped = rules.drop_invalid(rules.table_columns(table, view.source, columns),
                                         view.source, view.key_column, view.entity.key_type)
    ts = events[view.source.timestamp_field]
    tally = _UnitTally(messages=table.num_rows)
    tally.refused(dropped)
    keep = ts < events_before_ms
    events = {name: values[keep] for name, values in events.items()}
    tally.outside_boundary = int((~keep).sum())
    enrich, valid = _enricher(view, dimensions_path), {}
    if enrich is not None:
        events, valid = enrich(events)
    # an archive row belongs to the partition its key's stream events are on
    partitions = partitions_of(events[view.key_column], n_partitions, view.source.routing)
    states = {}
    for partition in np.unique(partitions):
        mine = partitions == partition
        state = states[str(int(partition))] = ViewState(view)
        state.apply({name: values[mine] for name, values in events.items()},
                    {name: mask[mine] for name, mask in valid.items()})
        tally.events += int(mine.sum())
    _save_states(out_path, states)
    return tally.summary(time.monotonic() - started, enrich)


_TABLES = {}     # in a reader process: the dimension tables it loaded, by path


def _enricher(view, dimensions_path):
    """The view's joins over the bootstrap's dimension tables; None without joins."""
    if not view.joins:
        return None
    if dimensions_path not in _TABLES:
        _TABLES.clear()                       # one bootstrap's tables at a time
        with open(dimensions_path, "rb") as f:
            _TABLES[dimensions_path] = pickle.load(f)
    return Enricher(view, _TABLES[dimensions_path])


class _UnitTally:
    def __init__(self, messages=0):
        self.messages, self.events, self.rejected = messages, 0, 0
        self.reasons, self.outside_boundary = {}, 0
        self.entries_left_out = Counter()   # stored entries not decodable at all, by reason

    def refused(self, reasons):
        """Count refused events or payloads: ``{reason: how many}``."""
        for reason, count in reasons.items():
            self.rejected += count
            self.reasons[reason] = self.reasons.get(reason, 0) + count

    def left_out(self, reasons):
        """Count offloaded entries left out (a checksum mismatch, ...): their
        events are unknown, unlike a refused payload's, which the stream
        dead-lettered when it arrived."""
        self.entries_left_out.update(reasons)

    def fold(self, state, view, decode_schema, payloads, times, events_from_ms, routing,
             enrich=None):
        if not payloads:
            return
        events = rules.decode_payloads(payloads, view.source, decode_schema, view.key_column,
                                       view.entity.key_type, message_times=times)
        misrouted = routing.misrouted(events.columns[view.key_column]) \
            if events.n_events else {}
        if misrouted:
            events, _ = rules.refuse_events(events, misrouted)
        columns, valid = events.columns, events.valid
        self.messages += len(payloads)
        reasons = {}
        for _, reason in events.rejects:
            reasons[reason] = reasons.get(reason, 0) + 1
        self.refused(reasons)
        if events_from_ms is not None:
            keep = columns[view.source.timestamp_field] >= events_from_ms
            self.outside_boundary += int((~keep).sum())
            columns = {name: values[keep] for name, values in columns.items()}
            valid = {name: mask[keep] for name, mask in valid.items()}
        self.events += len(columns[view.source.timestamp_field])
        if enrich is not None:
            columns, valid = enrich(columns, valid)
        batch = state.encode(columns, valid)       # strings whose code is taken: refused
        self.refused(Counter(batch.refused.values()))
        state.fold(batch.accepted(), touched=False)

    def summary(self, seconds, enrich=None, direct_fallback=None):
        return {"messages": self.messages, "events": self.events, "rejected": self.rejected,
                "reject_reasons": self.reasons, "outside_boundary": self.outside_boundary,
                "join_misses": 0 if enrich is None else enrich.misses, "seconds": seconds,
                "entries_left_out": dict(self.entries_left_out), "direct_fallback": direct_fallback}


def _save_states(path, states):
    """Partial states, keyed by partition ('' for a topic unit's one state),
    published atomically: a unit file exists only once complete."""
    arrays, params = {}, {}
    for key, state in states.items():
        params[key] = state.describe()
        arrays.update({f"{key}/{name}": a for name, a in state.export_arrays().items()})
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(snapshot.dumps(arrays, {"states": params}))
    os.replace(tmp, path)


def _load_state(view, path, key):
    """One partial state saved by ``_save_states``, or None if it has none for ``key``."""
    arrays, meta = snapshot.load(path)
    if key not in meta["states"]:
        return None
    prefix = f"{key}/"
    own = {name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}
    return ViewState.from_arrays(view, meta["states"][key], own)


# --------------------------------------------------------------------------
# The coordinator


class Bootstrap:
    """Bootstraps the partitions of one view version that have no checkpoint."""

    def __init__(self, view, cluster, store, checkpoints, subscription,
                 version=1, serving=True, readers=None, archive=None, progress=None,
                 units_per_reader=UNITS_PER_READER, min_unit_bytes=MIN_UNIT_BYTES):
        # a Cluster with its admin URL: the ledger lists come from the admin API
        self.view, self.cluster = view, cluster
        self.store, self.checkpoints, self.subscription = store, checkpoints, subscription
        self.version, self.serving = version, serving
        self.readers = readers or os.cpu_count() or 1
        self.archive = archive if archive is not None else view.source.archive
        self.progress = progress
        self.units_per_reader, self.min_unit_bytes = units_per_reader, min_unit_bytes
        self.state_hash = state_hash(view)
        self.dimensions_path = None          # with joins: their tables (_load_dimensions)
        self.object_store = None             # where directly read units are (_plan_store)
        # offloaded ledgers planned, or units read, through the broker because
        # their objects could not be read directly (for /metrics)
        self.direct_fallbacks = 0
        self.entries_left_out = Counter()    # offloaded entries not decodable, by reason
        self.workdir = os.path.join(checkpoints.root, view.name, self.state_hash, "bootstrap")
        self.cancelled = threading.Event()

    def warnings(self):
        """What /health says of this bootstrap (from any thread): offloaded
        entries it left out (their events are missing from the state) and
        ledgers or units read through the broker instead of directly."""
        said = []
        left_out = dict(self.entries_left_out)
        if left_out:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(left_out.items()))
            said.append(f"bootstrap of {self.view.name}@v{self.version}: "
                        f"{sum(left_out.values())} offloaded entries left out ({reasons}); "
                        "their events are missing from its state")
        if self.direct_fallbacks:
            said.append(f"bootstrap of {self.view.name}@v{self.version}: "
                        f"{self.direct_fallbacks} offloaded ledgers or units read through "
                        "the broker, not directly (the log says why)")
        return said

    def cancel(self):
        """Stop after the units being read (from any thread); run() raises
        BootstrapCancelled and a later run resumes."""
        self.cancelled.set()

    def pending_partitions(self, n_partitions):
        """The partitions without a checkpoint: those to bootstrap."""
        return [p for p in range(n_partitions)
                if self.checkpoints.latest_sequence(self.view.name, self.state_hash, p) == 0]

    def run(self):
        """Bootstrap, hand over, and return a report (events, rates, units)."""
        started = time.monotonic()
        n_partitions = partition_count(self.cluster, self.view.source.topic)
        pending = self.pending_partitions(n_partitions)
        if not pending:
            return {"view": self.view.name, "partitions": [], "note": "already bootstrapped"}
        with ReaderPool(self.readers, preload=(__name__,)) as pool:
            pool.start()                    # the readers start while the plan is made
            plan = self._load_or_make_plan(pending, n_partitions)
            self.object_store = self._plan_store(plan)
            self.dimensions_path = self._load_dimensions()
            plan_seconds = time.monotonic() - started
            pool.wait_ready()
            ready_seconds = time.monotonic() - started
            results = self._read_units(plan, pool)
            read_seconds = time.monotonic() - started
        handed_over = [p for p in pending if self._hand_over(plan, p)]
        shutil.rmtree(self.workdir, ignore_errors=True)
        report = self._report(plan, results, handed_over, read_seconds,
                              time.monotonic() - started)
        # fixed costs, whatever the history's size: the plan, and the readers'
        # start (an interpreter importing Tally) as far as the plan hides it not
        return {**report, "plan_seconds": round(plan_seconds, 3),
                "readers_ready_seconds": round(ready_seconds, 3)}

    # -- plan ----------------------------------------------------------------

    def _load_or_make_plan(self, pending, n_partitions):
        path = os.path.join(self.workdir, PLAN_FILE)
        if os.path.exists(path):
            with open(path) as f:
                plan = json.load(f)
            if plan["partitions_pending"] == pending and plan["archive"] == self.archive:
                log.info("%s: resuming the bootstrap planned at %s", self.view.name,
                         time.ctime(plan["planned_at"]))
                return plan
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.makedirs(self.workdir)
        plan = self._make_plan(pending, n_partitions)
        with open(path + ".tmp", "w") as f:
            json.dump(plan, f)
        os.replace(path + ".tmp", path)
        return plan

    def _make_plan(self, pending, n_partitions):
        topic = self.view.source.topic
        stats = Admin(self.cluster).partition_stats(topic, pending)
        _, blocks, fallbacks = plan_direct_reads(self.cluster, topic, stats)
        self.direct_fallbacks += len(fallbacks)
        units = plan_units(stats, self.readers, self.units_per_reader, self.min_unit_bytes,
                           blocks)
        partitions = {
            str(p): {"cut": list(cut_position(stats[p])),
                     "seek": last_position([u for u in units if u.partition == p])}
            for p in pending}
        boundary = None
        if self.archive:
            boundary = archive_boundary(self.archive, self.view.source.timestamp_field)
            units = plan_archive(self.archive, self.readers, self.units_per_reader) + units
        return {"planned_at": time.time(), "partitions_pending": pending,
                "n_partitions": n_partitions, "archive": self.archive,
                "events_before_ms": boundary, "partitions": partitions,
                "direct_fallbacks": fallbacks, "units": [u.to_dict() for u in units]}

    def _plan_store(self, plan):
        """The object store of the plan's directly read units (asked afresh:
        credentials never go into the plan file), or None."""
        if not any(u.get("blocks") for u in plan["units"]):
            return None
        policies = Admin(self.cluster).offload_policies(
            partition_topic(self.view.source.topic, plan["partitions_pending"][0]))
        store, reason = object_store(policies, self.cluster.tiered_storage)
        if store is None:
            log.warning("%s: the planned direct reads go through the broker: %s",
                        self.view.name, reason)
        return store

    def _load_dimensions(self):
        """With joins: the path of the dimension tables, loaded with their
        whole history and saved once (a resumed bootstrap keeps them, so all
        its units join with the same tables); None without joins."""
        if not self.view.joins:
            return None
        path = os.path.join(self.workdir, DIMENSIONS_FILE)
        if not os.path.exists(path):
            from tally.core.training import load_dimension_tables
            from tally.service.history.topic import PulsarTopic
            tables = load_dimension_tables([self.view], pulsar=PulsarTopic(
                self.cluster, readers=self.readers))
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                pickle.dump(tables, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
            log.info("%s: dimension tables loaded (%s)", self.view.name, ", ".join(
                f"{name}: {len(table):,} keys, {table.n_rows:,} rows"
                for (name, _), table in tables.items()))
        return path

    # -- read ----------------------------------------------------------------

    def _unit_path(self, index):
        return os.path.join(self.workdir, f"unit-{index:06d}.state")

    def _read_units(self, plan, pool):
        """Read the units not read before; their results by unit index."""
        units = [unit_from_dict(u) for u in plan["units"]]
        todo = [i for i in range(len(units)) if not os.path.exists(self._unit_path(i))]
        # the largest first (units are as big as their ledgers' blocks, unequal):
        # else a large unit begun last is read alone while the others idle
        todo.sort(key=lambda i: (units[i].kind != "archive", -getattr(units[i], "bytes", 0)))
        progress = _Progress(len(units), len(units) - len(todo), self.progress)

        def unit_done(_, result):
            progress.unit_done(result)
            if result.get("direct_fallback"):
                self.direct_fallbacks += 1
            self.entries_left_out.update(result["entries_left_out"])
            if self.cancelled.is_set():
                raise BootstrapCancelled(f"{self.view.name}: bootstrap cancelled")
        results = read_units([self._task(plan, units[i], i) for i in todo], self.readers,
                             unit_done, pool)
        return {todo[position]: result for position, result in results.items()}

    def _task(self, plan, unit, index):
        if isinstance(unit, TopicUnit):
            return (read_topic_unit, self.view, self.cluster, unit, self._unit_path(index),
                    plan["events_before_ms"], plan["n_partitions"], self.dimensions_path,
                    self.object_store if unit.blocks else None)
        return (read_archive_unit, self.view, self.archive, unit, plan["n_partitions"],
                self._unit_path(index), plan["events_before_ms"], self.dimensions_path)

    # -- merge and hand over -------------------------------------------------

    def _merged_state(self, plan, partition):
        """The partition's state: its partial states folded in log order
        (archive units first, then the topic's)."""
        state = ViewState(self.view)
        for index, data in enumerate(plan["units"]):
            if data["kind"] == "topic" and data["partition"] != partition:
                continue
            key = "" if data["kind"] == "topic" else str(partition)
            part = _load_state(self.view, self._unit_path(index), key)
            if part is not None:
                state.merge(part)
        return state

    def _hand_over(self, plan, partition):
        """Write the partition's records, then publish its checkpoint at the
        cut; False if another process published one first."""
        state = self._merged_state(plan, partition)
        self._write_records(state)
        cut = plan["partitions"][str(partition)]["cut"]
        try:
            self.checkpoints.save(
                self.view.name, self.state_hash, partition, 1, state.export_arrays(),
                {"params": state.describe(), "position": cut, "view": self.view.name,
                 "partition": partition, "bootstrap": True})
        except CheckpointConflict:
            log.warning("%s partition %d: another process bootstrapped it first",
                        self.view.name, partition)
            return False
        seek = plan["partitions"][str(partition)]["seek"]
        if seek is not None:
            self._seek_subscription(partition, seek)
        return True

    def _write_records(self, state):
        schema = online_schema(self.view, self.version)
        self.store.register_view(schema, current=self.serving,
                                 expiry_ms=self.view.online_expiry)
        now = int(time.time() * 1000)
        slots = np.arange(len(state))
        for start in range(0, len(slots), WRITE_CHUNK):
            chunk = slots[start:start + WRITE_CHUNK]
            self.store.write(self.view.name, state.index.keys_of(chunk),
                             records_for(state, schema, chunk, now, now),
                             version=self.version)
        self.store.flush()

    def _seek_subscription(self, partition, position):
        """Move the version's subscription to the cut so its worker starts
        there. Whether the broker then redelivers the cut message itself or
        the next one, the worker skips what the checkpoint covers."""
        import pulsar
        client = client_for(self.cluster)
        consumer = client.subscribe(
            partition_topic(self.view.source.topic, partition), self.subscription,
            consumer_type=pulsar.ConsumerType.Failover,
            initial_position=pulsar.InitialPosition.Earliest)
        try:
            consumer.seek(pulsar.MessageId(-1, position[0], position[1], -1))
        finally:
            consumer.close()

    def _report(self, plan, results, handed_over, read_seconds, total_seconds):
        units = [unit_from_dict(u) for u in plan["units"]]
        report = {"view": self.view.name, "version": self.version, "readers": self.readers,
                  "partitions": handed_over, "units": len(units),
                  "units_resumed": len(units) - len(results),
                  "events_before_ms": plan["events_before_ms"],
                  "read_seconds": round(read_seconds, 3),
                  "total_seconds": round(total_seconds, 3)}
        for name, chosen in (("direct", lambda u: u.kind == "topic" and u.tier == "direct"),
                             ("offloaded", lambda u: u.kind == "topic" and u.tier == "offloaded"),
                             ("bookkeeper", lambda u: u.kind == "topic" and u.tier == "bookkeeper"),
                             ("archive", lambda u: u.kind == "archive")):
            mine = [results[i] for i, u in enumerate(units) if chosen(u) and i in results]
            report[name] = {
                "units": sum(1 for u in units if chosen(u)),
                "events": sum(r["events"] for r in mine),
                "reader_seconds": round(sum(r["seconds"] for r in mine), 3)}
        report["events"] = sum(r["events"] for r in results.values())
        # events left to the other side of the archive boundary
        report["outside_boundary"] = sum(r["outside_boundary"] for r in results.values())
        report["rejected"] = sum(r["rejected"] for r in results.values())
        report["join_misses"] = sum(r["join_misses"] for r in results.values())
        reasons = {}
        for r in results.values():
            for reason, count in r["reject_reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        report["reject_reasons"] = reasons
        report["entries_left_out"] = dict(sum(
            (Counter(r["entries_left_out"]) for r in results.values()), Counter()))
        # offloaded ledgers planned for the broker, and direct units it read instead
        report["direct_fallbacks"] = plan.get("direct_fallbacks", []) + [
            r["direct_fallback"] for r in results.values() if r.get("direct_fallback")]
        report["events_per_s"] = round(report["events"] / read_seconds) if read_seconds else 0
        return report


class _Progress:
    """Counts finished units and calls ``callback(done, total, events, eta_s)``."""

    def __init__(self, total, done, callback):
        self.total, self.done, self.callback = total, done, callback
        self.initial, self.events, self.started = done, 0, time.monotonic()

    def unit_done(self, result):
        self.done += 1
        self.events += result["events"]
        if self.callback:
            elapsed = time.monotonic() - self.started
            fresh = self.done - self.initial
            eta = elapsed / fresh * (self.total - self.done) if fresh else None
            self.callback(self.done, self.total, self.events, eta)
