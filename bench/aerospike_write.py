"""Aerospike write path (issue 15 §6): records/s of ``tally serve``'s writes
against the official client's ``batch_write`` of prebuilt records.

    python -m tally.bench aerospike_write --aerospike 127.0.0.1:3000

The view is the README's ``user_reading_7d`` (three numbers and the last 10
article ids, a list bin), folded from ``--events`` reading events of
``--entities`` users. The writes are those of ``--batch`` touched entities
each, by ``--partitions`` writers at once (as many partitions of ``tally
serve``, each with one write in flight; the raw client: as many threads),
three ways:

* ``tally_serve``  -- ``RecordWriter.write``, what a partition of ``tally
                      serve`` runs after each batch: ``records_for`` (the
                      records from the view state) then the store's
                      ``write_async`` (bins, batch records, the batch call,
                      result checks, off the event loop);
* ``tally_store``  -- ``AerospikeStore.write_async`` of Records built
                      beforehand: the store's own share;
* ``raw_client``   -- ``client.batch_write`` of ``BatchRecords`` built
                      beforehand (same bins, TTL and key policy, same set
                      layout, a set of its own), the floor.

The ways take turns at every step (one batch per writer): each step is
written by every way, in an order reversed every other step, and only the
writes are timed (what a way builds beforehand is built just before its
turn, so nothing prebuilt piles up on the heap). On this shared machine the
load drifts within seconds; turns this short put the same drift on every
way. ``--repeats`` rounds, each writing every entity once per way; per round
the ratios tally/raw of records/s (the goal for ``tally_serve``: at least
0.8), reported as median and spread.
"""
import argparse
import asyncio
import concurrent.futures
import time
import uuid

import numpy as np

from tally.bench.lookup import spread
from tally.core.materialize import online_schema, records_for
from tally.core.record import INT64_MAX, INT64_MIN
from tally.core.view import ViewState
from tally.service.examples.reading import user_reading_7d as VIEW
from tally.service.ingest.fold import IngestStats
from tally.service.ingest.writer import RecordWriter
from tally.service.store import open_store

WAYS = ("tally_serve", "tally_store", "raw_client")


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench aerospike_write")
    parser.add_argument("--aerospike", required=True, metavar="HOST:PORT",
                        help="the server (namespace test)")
    parser.add_argument("--entities", type=int, default=20_000 if quick else 100_000)
    parser.add_argument("--events", type=int, default=100_000 if quick else 500_000)
    parser.add_argument("--batch", type=int, default=1000,
                        help="entities per write call (one ingest batch's touched ones)")
    parser.add_argument("--partitions", type=int, default=1,
                        help="writers at once, each one call in flight (1)")
    parser.add_argument("--repeats", type=int, default=3 if quick else 5)
    args = parser.parse_args(list(argv))
    state, now = fold_events(args.entities, args.events)
    slot_batches = [np.arange(start, min(start + args.batch, len(state)))
                    for start in range(0, len(state), args.batch)]
    steps = [slot_batches[i:i + args.partitions]
             for i in range(0, len(slot_batches), args.partitions)]
    url = f"aerospike://{args.aerospike}/test?set_prefix=w{uuid.uuid4().hex[:6]}_"
    loop = asyncio.new_event_loop()
    with open_store(url) as store, \
            concurrent.futures.ThreadPoolExecutor(args.partitions) as pool:
        ways = {"tally_serve": serve_way(store, state, now, loop),
                "tally_store": store_way(store, state, now, loop),
                "raw_client": raw_way(args.aerospike, store, state, now, pool)}
        seconds = {way: [0.0] * args.repeats for way in WAYS}
        for round_ in range(args.repeats):
            for number, step in enumerate(steps):
                for way in (WAYS if (round_ + number) % 2 == 0 else WAYS[::-1]):
                    seconds[way][round_] += ways[way](step)
    loop.close()
    runs = {way: [len(state) / s for s in seconds[way]] for way in WAYS}
    ratios = {way: spread([tally / raw for tally, raw in zip(runs[way], runs["raw_client"])])
              for way in ("tally_serve", "tally_store")}
    for way in WAYS:
        print(f"{way:12} {sorted(runs[way])[len(runs[way]) // 2]:>9,.0f} records/s  "
              f"(runs: {', '.join(f'{r:,.0f}' for r in runs[way])})")
    for way, ratio in ratios.items():
        print(f"{way} / raw_client records/s: {ratio}")
    return {"benchmark": "aerospike_write", "entities": len(state), "events": args.events,
            "batch": args.batch, "partitions": args.partitions, "repeats": args.repeats,
            "records_per_s": {way: [round(r) for r in rows] for way, rows in runs.items()},
            "over_raw": ratios}


def fold_events(n_users, n_events, seed=7):
    """The view state of ``n_events`` reads by ``n_users`` users over the
    last day, and the time as of which its records are written."""
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000)
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, n_events - n_users)])
    state = ViewState(VIEW)
    state.apply({"user": users.astype(np.int64),
                 "article": rng.integers(0, 50_000, n_events).astype(np.int64),
                 "readtime": rng.gamma(2.0, 30.0, n_events),
                 "ts": np.sort(rng.integers(now - 86_400_000, now, n_events)).astype(np.int64)})
    return state, now


def in_tasks(loop, write_one):
    """A way: the seconds ``loop`` takes to await ``write_one(slots)`` for
    every batch of a step at once (one task per writer)."""
    async def write_all(step):
        started = time.perf_counter()
        await asyncio.gather(*(write_one(slots) for slots in step))
        return time.perf_counter() - started
    return lambda step: loop.run_until_complete(write_all(step))


def serve_way(store, state, now, loop):
    writer = RecordWriter(VIEW, store, online_schema(VIEW), True, lambda: now, IngestStats())
    return in_tasks(loop, lambda slots: writer.write(state, slots))


def store_way(store, state, now, loop):
    schema = online_schema(VIEW)
    prebuilt = {}

    def write_one(slots):
        keys, records = prebuilt.pop(id(slots))
        return store.write_async(VIEW.name, keys, records)
    timed = in_tasks(loop, write_one)

    def way(step):
        prebuilt.update({id(slots): (state.index.keys_of(slots),
                                     records_for(state, schema, slots, now, now))
                         for slots in step})
        return timed(step)
    return way


def raw_way(address, store, state, now, pool):
    """The official client writing the same bins: ``f0``.. by feature order,
    the header bins, the view's TTL, the key sent; a nil for a null."""
    import aerospike
    from aerospike_helpers.batch.records import BatchRecords, Write
    schema = online_schema(VIEW)
    set_name = store._version(VIEW.name).set_name + "_raw"
    policy = {"ttl": store._version(VIEW.name).ttl, "key": aerospike.POLICY_KEY_SEND}
    host, port = address.rsplit(":", 1)
    client = aerospike.client({"hosts": [(host, int(port))]})
    write = aerospike.OPERATOR_WRITE

    def build(slots):
        records = records_for(state, schema, slots, now, now)
        columns = []
        for name, _ in schema.features:
            values, valid = records.values[name]
            values = values.tolist() if isinstance(values, np.ndarray) else list(values)
            columns.append([v if ok else None for v, ok in zip(values, valid.tolist())])
        event_time = records.event_time.tolist()
        valid_until = records.valid_until.tolist()
        batch = []
        for i, key in enumerate(state.index.keys_of(slots).tolist()):
            ops = [{"op": write, "bin": f"f{j}", "val": column[i]}
                   for j, column in enumerate(columns)]
            ops += [{"op": write, "bin": "_et",
                     "val": None if event_time[i] == INT64_MIN else event_time[i]},
                    {"op": write, "bin": "_wt", "val": int(records.write_time)},
                    {"op": write, "bin": "_vu",
                     "val": None if valid_until[i] == INT64_MAX else valid_until[i]},
                    {"op": write, "bin": "_vv", "val": schema.version}]
            batch.append(Write(("test", set_name, key), ops, policy=policy))
        return BatchRecords(batch)

    def write_one(batch):
        client.batch_write(batch, {"concurrent": True, "total_timeout": 2000})
        if batch.result != 0:
            raise RuntimeError(f"raw batch_write failed: {batch.result}")

    def way(step):
        built = [build(slots) for slots in step]
        started = time.perf_counter()
        list(pool.map(write_one, built))
        return time.perf_counter() - started
    return way
