"""Reader processes, and reading a work unit of a topic (``history``) exactly.

The bootstrap and training sets' topic reads hand work units to a
``ReaderPool``: N fresh interpreters (``python -m tally.service.history.readers``)
fed pickled ``(function, *args)`` tasks over a pipe. Not multiprocessing:
fork would copy the caller's Pulsar client threads, and spawn re-imports the
caller's main script, which a user's script without a ``__main__`` guard does
not survive.

A unit is read through a temporary subscription created at its first entry
(``unit_payloads``), or, for offloaded ledgers, straight from object storage
(``tally.service.history.tiered``); ``fold_unit`` picks the path and falls
back to the broker.
"""
import concurrent.futures
import contextlib
import importlib
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import uuid

from tally.core.entries import EntryFormatError, NeedsBroker
from tally.core.errors import TallyError
from tally.service.history import tiered
from tally.service.history.plan import ledger_ranges, plan_partition, target_unit_size
from tally.service.pulsar.admin import Admin
from tally.service.pulsar.client import connect, raw
from tally.service.pulsar.cluster import as_cluster
from tally.service.pulsar.topics import (END_OF_ENTRY, entry_message_times, message_position,
                                         message_times, partition_topic)

log = logging.getLogger("tally.bootstrap")

RECEIVE_BATCH = 10_000         # messages received, decoded and folded at once by a reader
READ_TIMEOUT_S = 30.0          # a unit's next message must come within this
# A unit costs ~60 ms to set up (subscription, first batch): keep units large
# enough (~1 s of reading) for that to be noise, yet several per reader so the
# readers finish together.
MIN_UNIT_BYTES = 16 << 20
UNITS_PER_READER = 3
# A unit read from object storage costs a ranged read to set up, not a
# subscription: many more, as small as a block, balance the readers' ends.
DIRECT_UNITS_PER_READER = 12


class ReaderError(TallyError, RuntimeError):
    """A reader process failed or a unit could not be read."""


# --------------------------------------------------------------------------
# Planning a topic's units


def partition_count(cluster, topic):
    partitions = Admin(cluster).partition_count(topic)
    if partitions < 1:
        raise ReaderError(f"topic {topic!r} is not partitioned")
    return partitions


def plan_units(stats, readers, units_per_reader=UNITS_PER_READER,
               min_unit_bytes=MIN_UNIT_BYTES, blocks=None):
    """Work units over every partition in ``stats``, partition by partition;
    ``blocks``: {partition: its directly read ledgers' blocks} (``plan_partition``)."""
    total_bytes = sum(b for s in stats.values() for _, _, b, _ in ledger_ranges(s))
    target = target_unit_size(total_bytes, readers, units_per_reader, minimum=min_unit_bytes)
    direct_target = target_unit_size(total_bytes, readers, DIRECT_UNITS_PER_READER)
    blocks = blocks or {}
    return [u for p in sorted(stats)
            for u in plan_partition(p, stats[p], target, blocks.get(p), direct_target)]


def plan_topic_units(cluster, topic, readers=None):
    """``(units, store)``: work units over the whole topic, cut at each
    partition's last entry now, and the object store its directly read
    units are in (None if none is)."""
    readers = readers or os.cpu_count() or 1
    partitions = range(partition_count(cluster, topic))
    stats = Admin(cluster).partition_stats(topic, partitions)
    store, blocks, _ = tiered.plan_direct_reads(cluster, topic, stats)
    return plan_units(stats, readers, blocks=blocks), store


# --------------------------------------------------------------------------
# Running tasks on reader processes


def read_units(tasks, readers=None, on_result=None, pool=None):
    """Run ``(function, *args)`` tasks on reader processes and return their
    results by task index. ``on_result(index, result)`` is called as each
    task completes; if it raises, the tasks not yet started are cancelled and
    the error propagates. ``pool``: a started ``ReaderPool`` to use (and
    leave open), else one of ``readers`` processes for these tasks."""
    results = {}
    if not tasks:
        return results
    readers = readers or os.cpu_count() or 1
    with contextlib.nullcontext(pool) if pool else ReaderPool(min(readers, len(tasks))) \
            as pool:
        futures = {pool.submit(*task): index for index, task in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            if on_result is not None:
                on_result(index, results[index])
    return results


class ReaderPool:
    """N reader processes fed pickled tasks over pipes (see the module doc).
    ``preload``: the modules of the tasks' functions, imported by each reader
    as it starts rather than at its first task."""

    def __init__(self, n, preload=()):
        self.n, self.preload = n, tuple(preload)
        self.processes = []
        self.idle = []
        self.threads = concurrent.futures.ThreadPoolExecutor(n, "tally-bootstrap")
        self.lock = threading.Lock()

    def __enter__(self):
        return self

    def start(self):
        """Start every reader now: an interpreter takes ~0.5 s to import
        Tally, time better spent while the caller plans the units."""
        with self.lock:
            while len(self.processes) < self.n:
                self.idle.append(self._spawn())
        return self

    def wait_ready(self):
        """Block until every idle reader has started (imported Tally and the
        preloaded modules), so that what follows times the reading alone."""
        with self.lock:
            for process in self.idle:
                _send(process.stdin, (os.getpid, ()))
            for process in self.idle:
                try:
                    _receive(process.stdout)
                except (EOFError, OSError):
                    raise ReaderError(f"a reader process died as it started (exit "
                                      f"{process.poll()})") from None

    def __exit__(self, *exc):
        self.threads.shutdown(cancel_futures=True)
        for process in self.processes:          # all told first: they exit in parallel
            process.stdin.close()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    def submit(self, function, *args):
        return self.threads.submit(self._call, function, args)

    def _call(self, function, args):
        process = self._take()
        try:
            _send(process.stdin, (function, args))
            ok, value = _receive(process.stdout)
        except (EOFError, OSError):
            raise ReaderError(f"a reader process died (exit {process.poll()}); completed "
                              "units are kept for a resume") from None
        with self.lock:
            self.idle.append(process)
        if not ok:
            raise ReaderError(value)
        return value

    def _take(self):
        with self.lock:
            return self.idle.pop() if self.idle else self._spawn()

    def _spawn(self):
        process = subprocess.Popen([sys.executable, "-m", "tally.service.history.readers",
                                    *self.preload],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.processes.append(process)
        return process


def _send(stream, value):
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def reader_process_main():
    """Serve tasks from the pool until stdin closes. The protocol owns the
    original stdout; anything else printing there (the Pulsar client's
    logger) is redirected to stderr. Arguments: modules to import first."""
    for module in sys.argv[1:]:
        importlib.import_module(module)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    while True:
        try:
            function, args = _receive(requests)
        except EOFError:
            return 0
        try:
            reply = (True, function(*args))
        except Exception as error:          # reported to the coordinator, named
            reply = (False, f"{type(error).__name__}: {error}")
        _send(replies, reply)


# --------------------------------------------------------------------------
# Reading one unit (in a reader process)


_clients = {}


def client_for(cluster):
    """This process's one client of ``cluster`` (a ``Cluster`` or service URL)."""
    cluster = as_cluster(cluster)
    if cluster not in _clients:
        _clients[cluster] = connect(cluster)
    return _clients[cluster]


def fold_unit(cluster, topic, unit, source, store, fold):
    """``fold(batches)`` over a unit's messages, where ``batches`` yields
    ``(payloads, times, malformed)``: ``times`` as ``message_times`` gives
    them, ``malformed`` the entries left out by reason. A unit planned for a
    direct read is read from ``store``; if that fails, it is folded again,
    from nothing, through the broker. Returns ``(fold's result, why the
    direct read fell back or None)``."""
    fallback = None
    if unit.blocks:
        if store is None:
            fallback = "the object store is not known to this reader"
        else:
            try:
                return fold(_direct_batches(store, unit, source)), None
            except (tiered.DirectReadError, NeedsBroker, EntryFormatError, OSError) as error:
                fallback = f"{type(error).__name__}: {error}"
        log.warning("%s partition %d entries %s..%s: read through the broker instead of "
                    "object storage: %s", topic, unit.partition, unit.first, unit.last, fallback)
    return fold(_broker_batches(cluster, topic, unit, source)), fallback


def _direct_batches(store, unit, source):
    for payloads, times, malformed in tiered.unit_messages(store, unit):
        yield payloads, entry_message_times(times, source), malformed


def _broker_batches(cluster, topic, unit, source):
    for payloads, times in unit_payloads(client_for(cluster), cluster, topic, unit, source):
        yield payloads, times, {}


def unit_payloads(client, cluster, topic, unit, source):
    """The payloads of the unit's messages in log order, in batches, with the
    times ``source`` takes from the messages (``message_times``).

    A temporary subscription is created at the unit's first entry (admin API)
    and read by a consumer in batches: about twice the rate of a Reader's one
    message per call, and no seek. Messages beyond the unit's last entry are
    dropped by position.

    Python touches each message once (its payload): per-message position
    checks cost more than decoding and folding together."""
    import pulsar
    topic = partition_topic(topic, unit.partition)
    subscription = f"tally-bootstrap-{uuid.uuid4().hex[:16]}"
    Admin(cluster).create_subscription(topic, subscription, *unit.first)
    consumer = client.subscribe(
        topic, subscription, consumer_type=pulsar.ConsumerType.Exclusive,
        receiver_queue_size=RECEIVE_BATCH,
        batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(RECEIVE_BATCH, 64 << 20, 10))
    receiver = raw(consumer)
    try:
        end = tuple(unit.last) + (END_OF_ENTRY,)
        in_last_entry = False
        deadline = None
        while True:
            messages = receiver.batch_receive()
            if not messages and in_last_entry:
                # The client unpacks an entry's messages together: once the
                # last entry has begun, an empty receive means it is complete
                # (even when no later message exists to show where it ends).
                return
            if messages and message_position(messages[0])[:2] < tuple(unit.first):
                raise ReaderError(f"{topic}: got entry {message_position(messages[0])} before "
                                     f"the unit's first {unit.first}")
            # Positions increase along a batch: look at a few messages, not all.
            within = _count_within(messages, end)
            yield ([message.data() for message in messages[:within]],
                   message_times(messages[:within], source))
            if within < len(messages):
                return
            in_last_entry = in_last_entry or bool(
                within and message_position(messages[within - 1])[:2] == tuple(unit.last))
            deadline = _check_progress(messages, deadline, topic, unit)
    finally:
        try:
            receiver.unsubscribe()
        except Exception:            # the subscription is left over; it holds nothing back
            receiver.close()


def _count_within(messages, end):
    """How many leading messages are at or before position ``end``."""
    low, high = 0, len(messages)
    while low < high:
        middle = (low + high) // 2
        if message_position(messages[middle]) <= end:
            low = middle + 1
        else:
            high = middle
    return low


def _check_progress(messages, deadline, topic, unit):
    """Fail a unit that stops receiving; returns the new deadline."""
    if messages:
        return None
    now = time.monotonic()
    deadline = deadline or now + READ_TIMEOUT_S
    if now > deadline:
        raise ReaderError(f"{topic}: no message for {READ_TIMEOUT_S:.0f} s while reading "
                             f"entries {unit.first}..{unit.last}")
    return deadline


if __name__ == "__main__":
    sys.exit(reader_process_main())
