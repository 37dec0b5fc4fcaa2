"""The scale model: from figures measured on one small machine to the cores,
partitions, memory and Aerospike capacity of a deployment for many monthly
active users (MAU).

Every row of the model is a dict ``{"quantity", "value", "unit",
"arithmetic"}``: the arithmetic is written out with the numbers put in, so a
reader can redo it by hand and a test can recompute it. The inputs are of two
kinds, kept apart in the result: ``measured`` (from a load run: per-core rates,
bytes per entity-feature) and ``assumptions`` (the product: events and lookups
per user per day, the peak factor, the number of features, and Aerospike's
documented per-record costs, which could not be measured here).
"""
import math

DEFAULT_ASSUMPTIONS = {
    "monthly_active_users": 100_000_000,
    # A monthly active user is not on every day; 20 reads a day averaged over
    # all MAU is ~60 a day for the third of them active on a given day.
    "events_per_mau_per_day": 20,
    "lookups_per_mau_per_day": 30,      # e.g. a feed ranking per session
    "peak_to_average": 3.0,             # the busiest hour against the daily mean
    "features_per_user": 50,
    "features_per_view": 10,            # one online record per (view, user)
    "cpu_utilisation_target": 0.5,      # headroom for failover and catching up
    # The per-feature cost of folding one event into the core's arenas
    # (bench/RESULTS.md, "Aggregation core": 98-179 ns per event for 5
    # features at 0.1-10M entities, i.e. up to ~36 ns per feature).
    "fold_ns_per_feature_event": 36,
    "checkpoints_kept": 3,              # tally.service.checkpoint.KEEP
    # Aerospike (no server can run here, so these are not measured):
    # 64 bytes of primary index per record and replica (its capacity guide);
    # the record's on-device size is assumed at ~48 bytes of metadata plus
    # ~12 bytes per 8-byte bin, rounded up to 16 bytes.
    "aerospike_replication_factor": 2,
    "aerospike_index_bytes_per_record": 64,
    "aerospike_record_overhead_bytes": 48,
    "aerospike_bytes_per_bin": 12,
    "aerospike_header_bins": 4,         # _et, _wt, _vu, _vv (service/aerospike_store.py)
}

SECONDS_PER_DAY = 86_400
GIB = 1 << 30


def build(measured, assumptions=None):
    """The model for ``measured`` figures (see :func:`required_measurements`)
    and ``assumptions`` (defaults: :data:`DEFAULT_ASSUMPTIONS`)."""
    a = dict(DEFAULT_ASSUMPTIONS, **(assumptions or {}))
    m = dict(measured)
    missing = [name for name in required_measurements() if m.get(name) is None]
    if missing:
        raise ValueError(f"the scale model needs measured {missing}")
    rows = []

    def row(quantity, value, unit, arithmetic):
        rows.append({"quantity": quantity, "value": value, "unit": unit,
                     "arithmetic": arithmetic})
        return value

    mau, features = a["monthly_active_users"], a["features_per_user"]
    views = row("views per user", math.ceil(features / a["features_per_view"]), "",
                f"ceil({features} / {a['features_per_view']})")

    # ingest
    events_avg = row("events/s, average", mau * a["events_per_mau_per_day"] / SECONDS_PER_DAY,
                     "events/s", f"{mau:,} × {a['events_per_mau_per_day']} / {SECONDS_PER_DAY:,}")
    events_peak = row("events/s, peak", events_avg * a["peak_to_average"], "events/s",
                      f"{events_avg:,.0f} × {a['peak_to_average']}")
    # The measured rate is for the run's view; decoding, the broker client and
    # the store write are per event, folding is per feature and event.
    extra_features = features - m["features_measured"]
    us_per_event = row(
        f"CPU µs per event, {features} features",
        1e6 / m["events_per_core"] + extra_features * a["fold_ns_per_feature_event"] / 1000,
        "µs", f"1e6 / {m['events_per_core']:,.0f} + ({features} - {m['features_measured']}) "
              f"× {a['fold_ns_per_feature_event']} / 1000")
    ingest_cores = row("ingest cores (tally serve)",
                       math.ceil(events_peak * us_per_event / 1e6 / a["cpu_utilisation_target"]),
                       "cores", f"ceil({events_peak:,.0f} × {us_per_event:.2f} / 1e6 / "
                                f"{a['cpu_utilisation_target']})")
    # A partition is folded by one worker on one core, and partitions are the
    # unit of scale-out; changing their number re-shards the state, so leave 2x.
    partitions = row("topic partitions", 2 ** math.ceil(math.log2(2 * ingest_cores)), "",
                     f"next power of 2 ≥ 2 × {ingest_cores}")
    row("events/s per partition, peak", events_peak / partitions, "events/s",
        f"{events_peak:,.0f} / {partitions}")

    # lookups
    lookups_peak = row("lookups/s, peak",
                       mau * a["lookups_per_mau_per_day"] / SECONDS_PER_DAY * a["peak_to_average"],
                       "lookups/s", f"{mau:,} × {a['lookups_per_mau_per_day']} / "
                                    f"{SECONDS_PER_DAY:,} × {a['peak_to_average']}")
    row("lookup server cores",
        math.ceil(lookups_peak / m["lookups_per_core"] / a["cpu_utilisation_target"]), "cores",
        f"ceil({lookups_peak:,.0f} / {m['lookups_per_core']:,.0f} / "
        f"{a['cpu_utilisation_target']})")

    # state: held in memory by the partitions' owners, and checkpointed
    per_user_ram = row("state bytes per user (RAM)",
                       features * m["ram_bytes_per_entity_feature"]
                       + views * m["ram_bytes_per_entity_view"], "bytes",
                       f"{features} × {m['ram_bytes_per_entity_feature']:.1f} + "
                       f"{views} × {m['ram_bytes_per_entity_view']:.1f}")
    row("state memory, all partitions", mau * per_user_ram / GIB, "GiB",
        f"{mau:,} × {per_user_ram:,.1f} / 2^30")
    per_user_disk = (features * m["snapshot_bytes_per_entity_feature"]
                     + views * m["snapshot_bytes_per_entity_view"])
    row("checkpoint storage", mau * per_user_disk * a["checkpoints_kept"] / GIB, "GiB",
        f"{mau:,} × ({features} × {m['snapshot_bytes_per_entity_feature']:.1f} + {views} × "
        f"{m['snapshot_bytes_per_entity_view']:.1f}) × {a['checkpoints_kept']} / 2^30")

    # the online store
    # service/record.py: a 32-byte header, a null bitmap of whole 64-bit
    # words, 8 bytes per feature
    record_bytes = row("online record bytes (Tally layout)",
                       32 + 8 * math.ceil(a["features_per_view"] / 64)
                       + 8 * a["features_per_view"],
                       "bytes", f"32 + 8 × ceil({a['features_per_view']} / 64) + 8 × "
                                f"{a['features_per_view']}")
    lmdb_record = record_bytes + m["lmdb_overhead_bytes_per_record"]
    row("embedded store (LMDB), all views", mau * views * lmdb_record / GIB, "GiB",
        f"{mau:,} × {views} × ({record_bytes} + {m['lmdb_overhead_bytes_per_record']:.1f})"
        " / 2^30")
    records = row("Aerospike records", mau * views, "records", f"{mau:,} × {views}")
    rf = a["aerospike_replication_factor"]
    row("Aerospike primary index (RAM)",
        records * a["aerospike_index_bytes_per_record"] * rf / GIB, "GiB",
        f"{records:,} × {a['aerospike_index_bytes_per_record']} × {rf} / 2^30")
    bins = a["features_per_view"] + a["aerospike_header_bins"]
    aerospike_record = row(
        "Aerospike record on device",
        16 * math.ceil((a["aerospike_record_overhead_bytes"] + bins * a["aerospike_bytes_per_bin"])
                       / 16), "bytes",
        f"16 × ceil(({a['aerospike_record_overhead_bytes']} + {bins} × "
        f"{a['aerospike_bytes_per_bin']}) / 16)")
    row("Aerospike storage", records * aerospike_record * rf / GIB, "GiB",
        f"{records:,} × {aerospike_record} × {rf} / 2^30")
    row("Aerospike writes/s, peak (one per view an event touches)",
        events_peak * views, "writes/s",
        f"{events_peak:,.0f} × {views} (upper bound: a batch writes a user once)")
    return {"assumptions": a, "measured": m, "rows": rows}


def required_measurements():
    return ("events_per_core", "features_measured", "lookups_per_core",
            "ram_bytes_per_entity_feature", "ram_bytes_per_entity_view",
            "snapshot_bytes_per_entity_feature", "snapshot_bytes_per_entity_view",
            "lmdb_overhead_bytes_per_record")


def markdown(model):
    """The model as a markdown table, then its inputs."""
    lines = ["| quantity | value | arithmetic |", "|---|---|---|"]
    for row in model["rows"]:
        lines.append(f"| {row['quantity']} | {_number(row['value'])} {row['unit']} "
                     f"| {row['arithmetic']} |")
    lines.append("")
    lines.append("Measured: " + ", ".join(f"{k} = {_number(v)}"
                                          for k, v in model["measured"].items()) + ".")
    lines.append("Assumed: " + ", ".join(f"{k} = {_number(v)}"
                                         for k, v in model["assumptions"].items()) + ".")
    return "\n".join(lines)


def _number(value):
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{int(value):,}" if isinstance(value, (int, float)) else str(value)
