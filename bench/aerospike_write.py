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

``--repeats`` rounds, each writing every entity once per way (the order
reversed every other round, so that a drift of the shared machine's load
falls on every side); per round the ratios tally/raw of records/s (the goal
for ``tally_serve``: at least 0.8), reported as median and spread.
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
    url = f"aerospike://{args.aerospike}/test?set_prefix=w{uuid.uuid4().hex[:6]}_"
    with open_store(url) as store:
        ways = {"tally_serve": serve_way(store, state, now, args.partitions),
                "tally_store": store_way(store, state, now, args.partitions),
                "raw_client": raw_way(args.aerospike, store, state, now, args.partitions)}
        runs = {way: [] for way in WAYS}
        for round_ in range(args.repeats):
            for way in (WAYS if round_ % 2 == 0 else WAYS[::-1]):
                runs[way].append(ways[way](slot_batches))
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


def timed(write_all):
    """``write_all(batches)`` -> a way: batches -> records/s."""
    def way(batches):
        started = time.perf_counter()
        write_all(batches)
        return sum(map(len, batches)) / (time.perf_counter() - started)
    return way


def in_tasks(partitions, write_one):
    """All batches written by ``partitions`` tasks, each awaiting
    ``write_one(batch)`` for every ``partitions``-th batch."""
    async def write_all(batches):
        async def task(mine):
            for batch in mine:
                await write_one(batch)
        await asyncio.gather(*(task(batches[p::partitions]) for p in range(partitions)))
    return lambda batches: asyncio.run(write_all(batches))


def serve_way(store, state, now, partitions):
    writer = RecordWriter(VIEW, store, online_schema(VIEW), True, lambda: now, IngestStats())
    return timed(in_tasks(partitions, lambda slots: writer.write(state, slots)))


def store_way(store, state, now, partitions):
    schema = online_schema(VIEW)
    prebuilt = {}

    def write_one(slots):
        keys, records = prebuilt[id(slots)]
        return store.write_async(VIEW.name, keys, records)

    def way(batches):
        prebuilt.clear()
        prebuilt.update({id(slots): (state.index.keys_of(slots),
                                     records_for(state, schema, slots, now, now))
                         for slots in batches})
        return timed(in_tasks(partitions, write_one))(batches)
    return way


def raw_way(address, store, state, now, partitions):
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

    def way(batches):
        prebuilt = [build(slots) for slots in batches]
        with concurrent.futures.ThreadPoolExecutor(partitions) as pool:
            started = time.perf_counter()
            list(pool.map(write_one, prebuilt))
            return sum(map(len, batches)) / (time.perf_counter() - started)
    return way
