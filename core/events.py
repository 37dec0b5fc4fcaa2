"""Valid events: the one place that says which events Tally folds.

Events reach the core three ways -- message payloads on the stream and in a
bootstrap, Parquet archive rows in a bootstrap, and tables or topics in a
training set -- and all three go through this module, so an event the stream
refuses is refused by the bootstrap and left out of a training set alike.

The rules (:func:`violations`), each with the reason a dead letter carries:

* the event time lies in [``MIN_EVENT_TIME``, ``MAX_EVENT_TIME``] =
  [-2**62, 2**62] epoch ms, the range the core can represent:
  ``field 'ts': event time N is outside [-2**62, 2**62] epoch ms``;
* the event time is plausible: not before the source's
  ``earliest_event_time`` (default 1973-03-03: a time in seconds is far
  below it) and at most ``max_event_time_ahead`` (default one day) ahead of
  the clock: a far-future time would freeze its entity's windows;
* float values are not infinite (a sum that met inf stays inf for ever;
  NaN is a null);
* the event time and the entity key are present (a table can hold nulls;
  a payload's required fields cannot): ``field 'ts' is null``;
* a string entity key is 1 to ``MAX_KEY_BYTES`` bytes of UTF-8, what every
  online store can hold as a key:
  ``field 'user': an entity key must be 1 to 511 bytes of UTF-8``.

Payloads (:func:`decode_payloads`) are refused whole, with all their events,
as the decoders refuse a malformed payload: a producer bug is seen whole
rather than as a payload with holes in it. Table rows (:func:`table_columns`,
:func:`drop_invalid`) are refused one by one. Type coercion of table columns
follows the decoders' rules (``tally.core.formats``): int64, float64 (NaN for
a null), bool, object arrays of ``str`` (None for a null).
"""
import time

import numpy as np
import pyarrow as pa

from tally.core.arena import MAX_EVENT_TIME, MIN_EVENT_TIME
from tally.core.errors import TrainingSetError
from tally.core.formats import DecodedEvents, decode_raw, schema_of

MAX_KEY_BYTES = 511          # LMDB's key size limit, the smallest of the stores'

__all__ = ["MAX_EVENT_TIME", "MAX_KEY_BYTES", "MIN_EVENT_TIME", "decode_payloads",
           "drop_invalid", "refuse_events", "table_columns", "valid_keys", "violations"]


# --------------------------------------------------------------------------
# The rules


def violations(columns, source, key_column=None, key_type=None, valid=None, now_ms=None):
    """``[(bad, reason_of)]``, in rule order, for each rule some event breaks:
    a boolean mask of the events breaking it, and ``reason_of(i)``, the
    reason for event ``i``. ``valid`` masks nulls of optional fields (a
    null float is NaN and breaks no rule); ``now_ms`` is the clock the
    plausibility of event times is judged by (default: the wall clock)."""
    found = []
    ts_field = source.timestamp_field
    ts = columns[ts_field]
    if ts.dtype.kind == "f":                       # a table's nulls
        null = np.isnan(ts)
        if null.any():
            found.append((null, lambda i: f"field '{ts_field}' is null"))
        ts = np.where(null, 0, ts).astype(np.int64)
    found += _time_violations(ts, ts_field, source, now_ms)
    found += _value_violations(columns, source, valid or {})
    if key_column is not None:
        keys = columns[key_column]
        bad = ~valid_keys(keys, key_type)
        if bad.any():
            found.append((bad, lambda i: f"field {key_column!r} is null" if _is_null(keys[i])
                          else f"field {key_column!r}: an entity key must be 1 to "
                               f"{MAX_KEY_BYTES} bytes of UTF-8"))
    return found


def _time_violations(ts, ts_field, source, now_ms):
    found = []
    outside = (ts < MIN_EVENT_TIME) | (ts > MAX_EVENT_TIME)
    if outside.any():
        found.append((outside, lambda i: f"field '{ts_field}': event time {int(ts[i])} is "
                                         "outside [-2**62, 2**62] epoch ms"))
    if ts_field == "@event_time":
        unset = ts == 0
        if unset.any():
            found.append((unset, lambda i: "field '@event_time': the message has no event "
                                           "time (its producer set none)"))
            outside = outside | unset
    floor = source.event_time_floor
    early = (ts < floor) & ~outside
    if early.any():
        found.append((early, lambda i: f"field '{ts_field}': event time {int(ts[i])} is before "
                                       f"the source's earliest_event_time {floor} (epoch ms; "
                                       "a time in seconds? send milliseconds)"))
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    latest = now_ms + source.event_time_ahead_ms
    ahead = (ts > latest) & ~outside
    if ahead.any():
        found.append((ahead, lambda i: f"field '{ts_field}': event time {int(ts[i])} is "
                                       f"{(int(ts[i]) - now_ms) / 3_600_000:,.1f} h ahead of the "
                                       "clock; the source's max_event_time_ahead is "
                                       f"{source.event_time_ahead_ms / 3_600_000:g} h"))
    return found


def _value_violations(columns, source, valid):
    """Infinite numbers: a sum that met inf is inf for ever (NaN is Tally's
    null in a float column, as the decoders write it and the arenas skip it)."""
    found = []
    for name, dtype in source.schema:
        values = columns.get(name)
        if dtype != "float64" or values is None or values.dtype.kind != "f":
            continue
        bad = np.isinf(values)
        if name in valid:
            bad &= valid[name]
        if bad.any():
            found.append((bad, lambda i, name=name, values=values:
                          f"field '{name}' value {float(values[i])} is not a finite number"))
    return found


def valid_keys(keys, key_type):
    """Which entity keys every online store can hold (a bool mask)."""
    if key_type == "string" or keys.dtype == object:
        return np.fromiter((type(k) is str and 0 < len(k.encode("utf-8", "surrogatepass"))
                            <= MAX_KEY_BYTES and _is_utf8(k) for k in keys),
                           bool, len(keys))
    if keys.dtype.kind == "f":
        return ~np.isnan(keys)
    return np.ones(len(keys), dtype=bool)


def _is_utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_null(value):
    return value is None or (isinstance(value, float) and value != value)


# --------------------------------------------------------------------------
# Payloads: refused whole


def decode_payloads(payloads, source, decode_schema=None, key_column=None, key_type=None,
                    now_ms=None, message_times=None):
    """The events of a batch of message payloads in ``source``'s format, with
    every payload that holds an invalid event refused (see the module doc).
    ``message_times`` gives the source's message time fields (``@event_time``,
    ``@publish_time``: name -> int64 array, one per payload); every event of a
    payload gets its message's time. Never raises for a bad payload."""
    events = decode_raw(payloads, source.format,
                        decode_schema if decode_schema is not None else schema_of(source))
    if not events.n_events:
        return events
    for name in source.message_time_fields:
        if message_times is None or name not in message_times:
            raise ValueError(f"source {source.name!r} takes {name!r} from the messages: "
                             "pass the messages' times (message_times)")
        events.columns[name] = np.asarray(message_times[name], np.int64)[events.payload_of_event]
    broken = violations(events.columns, source, key_column, key_type, events.valid, now_ms)
    if not broken:
        return events
    rejected = {}                        # payload -> reason: its first broken rule's
    for bad, reason_of in broken:
        rows = np.flatnonzero(bad)
        payloads, first = np.unique(events.payload_of_event[rows], return_index=True)
        for payload, row in zip(payloads.tolist(), rows[first].tolist()):
            rejected.setdefault(payload, reason_of(row))
    return _without_payloads(events, rejected)[0]


def refuse_events(events, reasons):
    """``(events, keep)``: decoded ``events`` without the payloads holding an
    event that the view state refused (``reasons``: event row -> reason, see
    ``ViewState.encode``), each refused whole with its first event's reason;
    ``keep`` masks the events left."""
    rejected = {}
    for row in sorted(reasons):
        rejected.setdefault(int(events.payload_of_event[row]), reasons[row])
    return _without_payloads(events, rejected)


def _without_payloads(events, rejected):
    keep = ~np.isin(events.payload_of_event, list(rejected))
    rejects = sorted(list(events.rejects) + list(rejected.items()), key=lambda r: r[0])
    return DecodedEvents({name: column[keep] for name, column in events.columns.items()},
                         {name: mask[keep] for name, mask in events.valid.items()},
                         rejects, events.payload_of_event[keep]), keep


# --------------------------------------------------------------------------
# Tables: refused row by row


def table_columns(data, source, columns):
    """Numpy columns (those named, coerced as the decoders do) of an in-memory
    table: a dict of arrays, a DataFrame, an Arrow Table or RecordBatch.
    Rows are not checked here: :func:`drop_invalid` does."""
    if isinstance(data, dict) and not any(isinstance(v, (pa.Array, pa.ChunkedArray))
                                          for v in data.values()):
        missing = [c for c in columns if c not in data]
        if missing:
            raise TrainingSetError(f"source {source.name!r}: the events lack columns "
                                   f"{missing}")
        return {c: _numpy_column(np.asarray(data[c]), source.field_type(c)) for c in columns}
    if not isinstance(data, (pa.Table, pa.RecordBatch)):
        data = _to_arrow(data)
    missing = [c for c in columns if c not in data.schema.names]
    if missing:
        raise TrainingSetError(f"source {source.name!r}: the events lack columns {missing} "
                               f"(they have {data.schema.names})")
    out = {}
    for name in columns:
        column = data.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        out[name] = _numpy_column(column, source.field_type(name))
    return out


def drop_invalid(columns, source, key_column=None, key_type=None, now_ms=None):
    """``(columns, dropped)``: the rows that break no rule, and per reason the
    number of rows dropped. The time column comes back as int64."""
    broken = violations(columns, source, key_column, key_type, now_ms=now_ms)
    ts_field = source.timestamp_field
    if columns[ts_field].dtype.kind == "f":
        ts = columns[ts_field]
        columns = dict(columns)
        columns[ts_field] = np.where(np.isnan(ts), 0, ts).astype(np.int64)
    if not broken:
        return columns, {}
    keep = np.ones(len(columns[ts_field]), dtype=bool)
    dropped = {}
    for bad, reason_of in broken:            # counted by rule, named by its first row
        newly = bad & keep
        if newly.any():
            dropped[reason_of(int(np.argmax(newly)))] = int(newly.sum())
        keep &= ~bad
    return {name: values[keep] for name, values in columns.items()}, dropped


def _to_arrow(data):
    if hasattr(data, "to_arrow"):                # polars and friends
        return data.to_arrow()
    return pa.Table.from_pandas(data, preserve_index=False)


def _numpy_column(values, field_type):
    """One column as the decoders would give it: int64, float64 (NaN = null),
    bool, or object arrays of str (None = null). An int column with nulls
    becomes float64 with NaN; :func:`drop_invalid` drops null keys and times."""
    if isinstance(values, np.ndarray) and values.dtype == object and field_type != "string":
        values = pa.array(values, from_pandas=True)
    if isinstance(values, np.ndarray):
        if field_type == "string":
            return values.astype(object)
        if field_type == "int64" and values.dtype.kind in "iub":
            return values.astype(np.int64, copy=False)
        if field_type == "bool":
            return values.astype(bool, copy=False)
        return values.astype(np.float64, copy=False)
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        values = _epoch_ms_with_nulls(values)
    if field_type == "string":
        return np.asarray(values.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    if values.null_count:
        if field_type == "bool" and not pa.types.is_floating(values.type):
            return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
        # an int beyond 2**53 is rounded here: features that keep int64 values
        # refuse such a column (tally.core.view), sums compute in float64 anyway
        return values.cast(pa.float64(), safe=False).fill_null(np.nan).to_numpy()
    if field_type == "int64":
        return values.cast(pa.int64()).to_numpy()
    if field_type == "bool":
        return values.cast(pa.bool_()).to_numpy(zero_copy_only=False)
    return values.cast(pa.float64()).to_numpy()


def _epoch_ms_with_nulls(values):
    """Timestamps or dates -> int64 epoch ms (floored), nulls kept."""
    if pa.types.is_date(values.type):
        values = values.cast(pa.timestamp("ms"))
    per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[values.type.unit]
    raw = values.cast(pa.int64()).fill_null(0).to_numpy()
    ms = raw * 1000 if per_ms is None else np.floor_divide(raw, per_ms)
    nulls = values.is_null().to_numpy(zero_copy_only=False) if values.null_count else None
    return pa.array(ms, mask=nulls)
