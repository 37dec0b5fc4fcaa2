"""Payload formats: message payloads -> columnar event batches.

:func:`decode_raw` turns the payloads of one batch of messages into one
columnar batch of events, whatever the source's payload format
(``Source.format``); ``tally.core.events.decode_payloads`` wraps it with the
rules every event follows (event time range, storable keys)::

    events = decode_payloads(payloads, source)          # -> DecodedEvents
    events.columns["readtime"]      # one entry per good event, in stream order
    events.valid["title"]           # bool mask per optional field (False: null)
    events.payload_of_event         # int64: the payload index of each event
    events.rejects                  # [(payload index, reason), ...] by index

A message may carry many events, so ``payload_of_event`` maps events back to
their messages. A bad payload is rejected whole, with all its events: the
pipeline dead-letters it with the reason, and a producer bug is seen whole
rather than as a payload with holes in it.

Typed columns are numpy arrays: ``int64``, ``float64``, ``bool`` and, for
string fields, ``object`` arrays of ``str``. A null (an optional field that
is absent, nil/null, or an Arrow null) is NaN / 0 / False / None in its
column and False in ``valid[name]``, exactly as in
:class:`tally.core.decode.DecodedBatch`.

Formats
-------

``msgpack`` -- one event per payload
    A msgpack map ``{"user": 42, "readtime": 35.2, "ts": 1732780800123}``,
    decoded by the C decoder :func:`tally.core.decode.decode_msgpack_maps`;
    its module docstring has the exact rules and reasons. The default, and the
    fastest format for one event per message.

``msgpack-columnar`` -- many events per payload
    One msgpack map (fixmap/map16/map32, spanning the whole payload) from
    field name (msgpack str) to a *column*; every column present holds the
    same number N >= 0 of values, value ``i`` of every column being event
    ``i``; events are in column order. A column is one of:

    * a typed array, msgpack ``ext`` (fixext/ext8/16/32) whose type code
      says what its data holds -- the fast encoding: decoded with
      ``np.frombuffer``, no Python object per event; written by
      :func:`encode_msgpack_columnar` and ``ColumnarProducer``:

      ========  ============================================  ==============
      ext type  data                                          fields
      ========  ============================================  ==============
      1         N little-endian two's-complement int64         int64, float64
                (``8 * N`` bytes)                              (cast)
      2         N little-endian IEEE-754 float64 (``8 * N``)   float64
      3         N bytes, each 0 (false) or 1 (true)           bool
      ========  ============================================  ==============

      The type is in the payload, not inferred from the reader's schema, so
      an int64 array sent for a float64 field is cast, never reinterpreted,
      and a float64 array sent for an int64 field rejects. A typed array
      holds no nulls.
    * ``array`` of N values, each following the one-event msgpack rules:
      int64 takes int (uint64 above 2**63-1 rejects), float64 takes int or
      float, bool takes true/false, string takes str (valid UTF-8), nil is a
      null (optional fields only). The only encoding of string fields; it
      costs a Python object per value, so prefer typed arrays for numbers.
    * ``nil``: every value null (optional fields only).

    An absent optional field is all null; an absent required field rejects
    the payload. Keys must be str (any non-str key rejects, as in
    ``msgpack``); keys that are not schema fields are ignored whatever their
    value; a schema field given twice rejects. Example, 3 events::

        {"user": ext(1, <i8 7, 7, 9>), "readtime": ext(2, <f8 1.5, 2.0, 0.25>),
         "ts": ext(1, <i8 ...>), "title": ["a", nil, "c"]}

    (``ext(1, 24 bytes)`` is ``c7 18 01`` + the bytes: ext8, length 24, type 1.)

``arrow`` -- many events per payload
    One Arrow IPC *stream* (a schema message, zero or more record batches,
    optionally the end-of-stream marker; IPC buffer compression LZ4/ZSTD is
    fine) per payload, as written by ``pyarrow.ipc.new_stream`` (the IPC
    *file* format, with its ``ARROW1`` magic, is not accepted). Events are the
    rows of its record batches in order. Columns are matched to schema fields
    by name; other columns are ignored; a schema field appearing as two
    columns rejects. Accepted Arrow types (dictionary-encoded columns are
    decoded first; a column of type ``null`` is all null):

    * int64 fields: any integer type (uint64 values above 2**63-1 reject);
    * float64 fields: any floating or integer type (cast to float64; large
      integers round, as in ``msgpack``);
    * bool fields: bool;  string fields: string, large_string, string_view.

    Any other type rejects (``field 'ts' has type timestamp[ms], expected
    int64``: send epoch milliseconds as int64). Nulls are nulls in optional
    fields and reject a required field. Every used column is fully validated
    (``validate(full=True)``: offsets, UTF-8) before it is read, so corrupt
    buffers reject instead of crashing.

``json`` -- one event per payload (a slower path, ~50x ``msgpack``)
    One JSON object (RFC 8259, UTF-8, no BOM) per payload, with the same
    rules as ``msgpack``: int64 takes an integer, float64 an integer or a
    number, bool ``true``/``false``, string a string (lone surrogate escapes
    such as ``"\\ud800"`` are not valid UTF-8 and reject), ``null`` is a null
    (optional fields only); other members are ignored; a schema field given
    twice rejects. ``NaN``/``Infinity`` are not JSON and reject. Reasons use
    the msgpack type names (int, float, str, bool, nil = null, array, map =
    object), so the same bad event gets the same reason in both formats.

Event time
----------
In every format, an event whose event time is outside
[``MIN_EVENT_TIME``, ``MAX_EVENT_TIME``] = [-2**62, 2**62] epoch ms (the range
the core can represent) rejects its payload, all of its events, with the
reason ``field 'ts': event time N is outside [-2**62, 2**62] epoch ms``
(``N``: the payload's first such time): the rule and its reason live in
``tally.core.events``.

Reject reasons
--------------
Besides those of ``tally.core.decode`` (``msgpack``)::

    payload is not bytes-like (got int)          payload buffer is not contiguous
    empty payload                                not a msgpack map
    truncated payload                            trailing bytes after map
    invalid msgpack (...)                        map key has type int, expected str
    duplicate field 'user'                       missing field 'readtime'
    field 'readtime' has type str, expected array or typed array
    field 'readtime' has type nil, expected float64          (a required field)
    field 'user' has type float64 array (ext 2), expected int64
    field 'user' has type ext 9, expected int64    (an unknown ext type code)
    field 'ts' int64 array (ext 1) of 12 bytes is not a whole number of 8-byte values
    field 'ok' bool array (ext 3) holds byte 7 at #2, expected 0 or 1
    field 'title' has type bin, expected array
    field 'readtime' value #3 has type str, expected float64
    field 'user' value 18446744073709551615 is out of range for int64 (value #3)
    field 'title' is not valid utf-8 (value #1)
    field 'readtime' has 99 values, expected 100 like field 'user'
    not an arrow ipc stream (<pyarrow's message>)
    invalid arrow record batch (<pyarrow's message>)
    field 'title' holds invalid arrow data (<pyarrow's message>)
    field 'title' is not valid utf-8
    field 'readtime' has type string, expected float64
    field 'user' has 3 null values, expected int64 (a required field)
    payload is not valid utf-8 at byte 17        not a json object
    invalid json (Expecting value at char 0)
    field 'user' value 1e+30 ... / field 'user' value N is out of range for int64
    field 'ts': event time 9223372036854775807 is outside [-2**62, 2**62] epoch ms

Errors are reported for the first problem met, checking fields in schema
order (except ``msgpack``, which reports them in map order).

Long because its docstring is the specification of every payload format
(the contract with producers) beside the decoders that implement it.
"""
import functools
import json
from dataclasses import dataclass

import msgpack
import numpy as np
import pyarrow as pa

from tally.core.decode import Schema, decode_msgpack_maps
from tally.core.types import COLUMNAR_FORMATS, PAYLOAD_FORMATS as FORMATS

MSGPACK = "msgpack"
MSGPACK_COLUMNAR = "msgpack-columnar"
ARROW = "arrow"
JSON = "json"

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)

_DTYPES = {"int64": np.dtype(np.int64), "float64": np.dtype(np.float64),
           "bool": np.dtype(np.bool_), "string": np.dtype(object)}
_FILL = {"int64": 0, "float64": np.nan, "bool": False, "string": None}


@dataclass
class DecodedEvents:
    """One batch of payloads decoded into columns (see the module docstring)."""
    columns: dict               # field -> numpy array, one entry per good event
    valid: dict                 # optional field -> bool mask (False: null)
    rejects: list               # [(payload index, reason)], by payload index
    payload_of_event: np.ndarray  # int64 [n_events]: the payload of each event

    @property
    def n_events(self):
        return len(self.payload_of_event)

    def __len__(self):
        return self.n_events

    @property
    def source_index(self):
        """Alias of ``payload_of_event``, as in ``DecodedBatch``."""
        return self.payload_of_event

    def __repr__(self):
        return (f"<DecodedEvents n_events={self.n_events} columns={list(self.columns)} "
                f"rejects={len(self.rejects)}>")


@functools.lru_cache(maxsize=256)
def _schema_of(fields):
    return Schema(list(fields))


def schema_of(source):
    """The decode :class:`Schema` of a source's payloads (every field required;
    the message's own times are not in payloads)."""
    return _schema_of(source.payload_schema)


def decode_raw(payloads, fmt, schema):
    """Decode a batch of message payloads of format ``fmt`` with the decode
    :class:`Schema` ``schema`` into :class:`DecodedEvents`. Never raises for a
    bad payload; raises ``ValueError`` for an unknown format. The rules every
    event must also follow (event time range, keys) are applied by
    ``tally.core.events.decode_payloads``, the entry point of every path."""
    if fmt == MSGPACK:
        batch = decode_msgpack_maps(payloads, schema)
        return DecodedEvents(batch.columns, batch.valid, batch.rejects, batch.source_index)
    decoder = _DECODERS.get(fmt)
    if decoder is None:
        raise ValueError(f"payload format {fmt!r} is not supported; use one of "
                         f"{', '.join(FORMATS)}")
    if not isinstance(payloads, (list, tuple)):
        payloads = list(payloads)
    return decoder(payloads, schema)


# --------------------------------------------------------------------------
# Shared helpers


def _as_bytes(payload):
    """(bytes, None) or (None, reason)."""
    if type(payload) is bytes:
        data = payload
    else:
        try:
            view = memoryview(payload)
        except TypeError:
            return None, f"payload is not bytes-like (got {type(payload).__name__})"
        if not view.c_contiguous:
            return None, "payload buffer is not contiguous"
        data = view.tobytes()
    if not data:
        return None, "empty payload"
    return data, None


class _Map(list):
    """A msgpack map as its list of (key, value) pairs (keys may repeat or be
    unhashable, so no dict is built)."""
    __slots__ = ()


def _mp_type(value):
    """The msgpack type name of an unpacked (or JSON-decoded) value."""
    t = type(value)
    if t is bool:
        return "bool"
    if t is int:
        return "int"
    if t is float:
        return "float"
    if t is str:
        return "str"
    if t is bytes:
        return "bin"
    if value is None:
        return "nil"
    if t is _Map or isinstance(value, dict):
        return "map"
    if t is list:
        return "array"
    return "ext"


class _Columns:
    """Collects the columns of each good payload; ``finish`` concatenates."""

    def __init__(self, schema):
        self.fields = schema.fields
        self.parts = {name: [] for name, _, _ in self.fields}
        self.valid_parts = {name: [] for name, _, required in self.fields if not required}
        self.payloads = []
        self.counts = []
        self.rejects = []

    def add(self, index, n, columns, valid):
        """``columns[name]``: n values; ``valid[name]``: mask, or None if all valid."""
        for name, _, required in self.fields:
            self.parts[name].append(columns[name])
            if not required:
                mask = valid.get(name)
                self.valid_parts[name].append(np.ones(n, np.bool_) if mask is None else mask)
        self.payloads.append(index)
        self.counts.append(n)

    def reject(self, index, reason):
        self.rejects.append((index, reason))

    def finish(self):
        columns = {name: _concat(self.parts[name], _DTYPES[dtype])
                   for name, dtype, _ in self.fields}
        valid = {name: _concat(parts, _DTYPES["bool"])
                 for name, parts in self.valid_parts.items()}
        payload_of_event = np.repeat(np.asarray(self.payloads, np.int64),
                                     np.asarray(self.counts, np.int64))
        return DecodedEvents(columns, valid, self.rejects, payload_of_event)


def _concat(parts, dtype):
    if not parts:
        return np.empty(0, dtype)
    # always a fresh, writable array (parts may be read-only buffer views)
    return np.concatenate(parts).astype(dtype, copy=False) if len(parts) > 1 \
        else np.array(parts[0], dtype=dtype)


def _null_column(dtype, n):
    if dtype == "string":
        return np.full(n, None, dtype=object)
    return np.full(n, _FILL[dtype], dtype=_DTYPES[dtype])


# --------------------------------------------------------------------------
# msgpack-columnar


def _is_map_header(byte):
    return 0x80 <= byte <= 0x8f or byte in (0xde, 0xdf)


def _decode_msgpack_columnar(payloads, schema):
    out = _Columns(schema)
    wanted = {name: (dtype, required) for name, dtype, required in schema.fields}
    for index, payload in enumerate(payloads):
        data, reason = _as_bytes(payload)
        if reason is None:
            reason = _msgpack_columnar_one(data, schema.fields, wanted, out, index)
        if reason is not None:
            out.reject(index, reason)
    return out.finish()


def _msgpack_columnar_one(data, fields, wanted, out, index):
    if not _is_map_header(data[0]):
        return "not a msgpack map"
    try:
        pairs = msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape",
                                strict_map_key=False, object_pairs_hook=_Map)
    except msgpack.ExtraData:
        return "trailing bytes after map"
    except Exception as error:       # the library's errors: never ours to crash on
        if isinstance(error, ValueError) and "incomplete input" in str(error):
            return "truncated payload"
        return f"invalid msgpack ({type(error).__name__}{': ' if str(error) else ''}{error})"
    found = {}
    for key, value in pairs:
        if type(key) is not str:
            return f"map key has type {_mp_type(key)}, expected str"
        if key in wanted:
            if key in found:
                return f"duplicate field '{key}'"
            found[key] = value
    n, first = None, None
    columns, valid = {}, {}
    for name, dtype, required in fields:
        value = found.get(name)
        if value is None:
            if required:
                return f"missing field '{name}'" if name not in found else \
                    f"field '{name}' has type nil, expected {dtype}"
            continue
        column, mask, reason = _mp_column(name, dtype, required, value)
        if reason is not None:
            return reason
        if n is None:
            n, first = len(column), name
        elif len(column) != n:
            return f"field '{name}' has {len(column)} values, expected {n} like field '{first}'"
        columns[name] = column
        if mask is not None:
            valid[name] = mask
    n = n or 0
    for name, dtype, required in fields:
        if name not in columns:             # optional and null throughout
            columns[name] = _null_column(dtype, n)
            valid[name] = np.zeros(n, np.bool_)
    out.add(index, n, columns, valid)
    return None


# ext type code -> (name, numpy dtype of its data, fields it may fill)
EXT_INT64, EXT_FLOAT64, EXT_BOOL = 1, 2, 3
_EXT_TYPES = {
    EXT_INT64: ("int64 array", np.dtype("<i8"), ("int64", "float64")),
    EXT_FLOAT64: ("float64 array", np.dtype("<f8"), ("float64",)),
    EXT_BOOL: ("bool array", np.dtype(np.uint8), ("bool",)),
}
_ARRAY_TYPES = {"int64": {int}, "float64": {int, float}, "bool": {bool}, "string": {str}}


def _mp_column(name, dtype, required, value):
    """(values, valid mask or None, None) or (None, None, reason)."""
    t = type(value)
    if t is msgpack.ExtType:
        spec = _EXT_TYPES.get(value.code)
        if spec is None:
            return None, None, f"field '{name}' has type ext {value.code}, expected {dtype}"
        kind, data_dtype, fills = spec
        if dtype not in fills:
            return None, None, (f"field '{name}' has type {kind} (ext {value.code}), "
                                f"expected {dtype}")
        data = value.data
        if len(data) % data_dtype.itemsize:
            return None, None, (f"field '{name}' {kind} (ext {value.code}) of {len(data)} "
                                f"bytes is not a whole number of {data_dtype.itemsize}-byte "
                                "values")
        column = np.frombuffer(data, data_dtype)
        if value.code == EXT_BOOL:
            if column.size and column.max() > 1:
                at = int(np.argmax(column > 1))
                return None, None, (f"field '{name}' {kind} (ext {value.code}) holds byte "
                                    f"{int(column[at])} at #{at}, expected 0 or 1")
            column = column.view(np.bool_)
        return column, None, None
    if t is not list:
        expected = "array" if dtype == "string" else "array or typed array"
        return None, None, f"field '{name}' has type {_mp_type(value)}, expected {expected}"
    return _values_column(name, dtype, required, value)


def _values_column(name, dtype, required, values):
    """A column from a list of Python values (msgpack array path)."""
    allowed = _ARRAY_TYPES[dtype]
    types = set(map(type, values))
    nulls = type(None) in types
    if not types <= allowed | {type(None)} or (nulls and required):
        for i, v in enumerate(values):
            if type(v) not in allowed and (v is not None or required):
                return None, None, (f"field '{name}' value #{i} has type {_mp_type(v)}, "
                                    f"expected {dtype}")
    mask = None
    if nulls:
        mask = np.fromiter((v is not None for v in values), np.bool_, len(values))
        fill = _FILL[dtype]
        values = [fill if v is None else v for v in values]
    if dtype == "string":
        try:
            "".join(v for v in values if v is not None).encode("utf-8")
        except UnicodeEncodeError:
            at = next(i for i, v in enumerate(values)
                      if v is not None and not _is_utf8_clean(v))
            return None, None, f"field '{name}' is not valid utf-8 (value #{at})"
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column, mask, None
    try:
        column = np.array(values, dtype=_DTYPES[dtype])
    except OverflowError:
        at = next(i for i, v in enumerate(values) if not INT64_MIN <= v <= INT64_MAX)
        return None, None, (f"field '{name}' value {values[at]} is out of range for "
                            f"{dtype} (value #{at})")
    return column, mask, None


def _is_utf8_clean(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_msgpack_columnar(columns):
    """The ``msgpack-columnar`` payload of ``columns`` (name -> 1-D array):
    integer arrays as int64 typed arrays (ext 1), float arrays as float64
    (ext 2), bool arrays as ext 3, anything else (str, None) as msgpack
    arrays."""
    out = {}
    for name, values in columns.items():
        column = np.asarray(values)
        if column.ndim != 1:
            raise ValueError(f"column {name!r} must be one-dimensional")
        kind = column.dtype.kind
        if kind in "iu":
            if kind == "u" and column.size and column.max() > INT64_MAX:
                raise ValueError(f"column {name!r} has values above 2**63-1")
            out[name] = msgpack.ExtType(EXT_INT64, column.astype("<i8", copy=False).tobytes())
        elif kind == "f":
            out[name] = msgpack.ExtType(EXT_FLOAT64, column.astype("<f8", copy=False).tobytes())
        elif kind == "b":
            out[name] = msgpack.ExtType(EXT_BOOL, column.astype(np.uint8).tobytes())
        else:
            out[name] = column.tolist()
    return msgpack.packb(out, use_bin_type=True)


# --------------------------------------------------------------------------
# arrow


def _decode_arrow(payloads, schema):
    out = _Columns(schema)
    for index, payload in enumerate(payloads):
        data, reason = _as_bytes(payload)
        if reason is None:
            try:
                reason = _arrow_one(data, schema.fields, out, index)
            except Exception as error:     # corrupt metadata met late (e.g. a type's
                reason = f"invalid arrow payload ({_arrow_message(error)})"   # text)
        if reason is not None:
            out.reject(index, reason)
    return out.finish()


def _arrow_one(data, fields, out, index):
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        arrow_schema = reader.schema
        batches = list(reader)
    except Exception as error:       # pyarrow's errors: never ours to crash on
        return f"not an arrow ipc stream ({_arrow_message(error)})"
    try:
        for batch in batches:
            batch.validate()
    except Exception as error:
        return f"invalid arrow record batch ({_arrow_message(error)})"
    n = sum(batch.num_rows for batch in batches)
    try:
        names = arrow_schema.names
    except UnicodeDecodeError:
        return "arrow schema has a column name that is not valid utf-8"
    columns, valid = {}, {}
    for name, dtype, required in fields:
        where = [i for i, column_name in enumerate(names) if column_name == name]
        if len(where) > 1:
            return f"duplicate field '{name}'"
        if not where:
            if required:
                return f"missing field '{name}'"
            columns[name] = _null_column(dtype, n)
            valid[name] = np.zeros(n, np.bool_)
            continue
        arrow_type = arrow_schema.field(where[0]).type
        chunks = [batch.column(where[0]) for batch in batches]
        column, mask, reason = _arrow_column(name, dtype, required, chunks, arrow_type, n)
        if reason is not None:
            return reason
        columns[name] = column
        if mask is not None:
            valid[name] = mask
    out.add(index, n, columns, valid)
    return None


def _arrow_message(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _arrow_column(name, dtype, required, chunks, arrow_type, n):
    """(values, valid mask or None, None) or (None, None, reason)."""
    try:
        for chunk in chunks:
            chunk.validate(full=True)
        if not chunks:
            array = pa.array([], type=arrow_type)
        else:
            array = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
    except Exception as error:
        message = _arrow_message(error)
        if "utf8" in message.lower() or "utf-8" in message.lower():
            return None, None, f"field '{name}' is not valid utf-8"
        return None, None, f"field '{name}' holds invalid arrow data ({message})"
    if pa.types.is_dictionary(array.type):
        try:
            array = array.dictionary_decode()
        except Exception as error:
            return None, None, f"field '{name}' holds invalid arrow data ({_arrow_message(error)})"
    t = array.type
    if pa.types.is_null(t):
        if required and n:
            return None, None, (f"field '{name}' has {n} null values, expected {dtype} "
                                "(a required field)")
        return _null_column(dtype, n), np.zeros(n, np.bool_), None
    if dtype == "int64":
        ok = pa.types.is_integer(t)
    elif dtype == "float64":
        ok = pa.types.is_integer(t) or pa.types.is_floating(t)
    elif dtype == "bool":
        ok = pa.types.is_boolean(t)
    else:
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or \
            (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))
    if not ok:
        return None, None, f"field '{name}' has type {t}, expected {dtype}"
    nulls = array.null_count
    if nulls and required:
        return None, None, (f"field '{name}' has {nulls} null values, expected {dtype} "
                            "(a required field)")
    if dtype == "int64" and t == pa.uint64() and len(array):
        raw = array.fill_null(0).to_numpy(zero_copy_only=False)
        if raw.max() > INT64_MAX:
            at = int(np.argmax(raw > INT64_MAX))
            return None, None, (f"field '{name}' value {int(raw[at])} is out of range for "
                                f"int64 (value #{at})")
    mask = array.is_valid().to_numpy(zero_copy_only=False) if nulls else None
    if dtype == "string":
        return np.asarray(array.to_numpy(zero_copy_only=False), dtype=object), mask, None
    target = _ARROW_TYPES[dtype]
    if t != target:
        array = array.cast(target, safe=False)     # integers checked above; ints -> float64
    if nulls:
        array = array.fill_null(_FILL[dtype])
    return array.to_numpy(zero_copy_only=False), mask, None


_ARROW_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}


def encode_arrow(columns):
    """The ``arrow`` payload of ``columns`` (name -> 1-D array or pyarrow
    array): one IPC stream holding one record batch."""
    arrays, names = [], []
    for name, values in columns.items():
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            arrays.append(values)
        else:
            column = np.asarray(values)
            if column.ndim != 1:
                raise ValueError(f"column {name!r} must be one-dimensional")
            arrays.append(pa.array(column, from_pandas=False) if column.dtype != object
                          else pa.array(column.tolist()))
        names.append(name)
    batch = pa.record_batch(arrays, names=names)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------
# json


class _JsonObject(dict):
    duplicates = ()


def _json_object(pairs):
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen = set()
        obj.duplicates = [k for k, _ in pairs if k in seen or seen.add(k)]
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not valid json")


_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_json_object, parse_constant=_no_constant)
_MISSING = object()


def _decode_json(payloads, schema):
    fields = schema.fields
    values = [[] for _ in fields]
    valid = {name: [] for name, _, required in fields if not required}
    payload_of_event = []
    rejects = []
    for index, payload in enumerate(payloads):
        row, reason = _json_one(payload, fields)
        if reason is not None:
            rejects.append((index, reason))
            continue
        for j, (name, dtype, required) in enumerate(fields):
            value = row[j]
            if not required:
                valid[name].append(value is not None)
                if value is None:
                    value = _FILL[dtype]
            values[j].append(value)
        payload_of_event.append(index)
    columns = {}
    for j, (name, dtype, _) in enumerate(fields):
        if dtype == "string":
            column = np.empty(len(values[j]), dtype=object)
            column[:] = values[j]
        else:
            column = np.array(values[j], dtype=_DTYPES[dtype])
        columns[name] = column
    return DecodedEvents(columns, {name: np.array(v, dtype=np.bool_) for name, v in valid.items()},
                         rejects, np.array(payload_of_event, dtype=np.int64))


def _json_one(payload, fields):
    data, reason = _as_bytes(payload)
    if reason is not None:
        return None, reason
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"payload is not valid utf-8 at byte {error.start}"
    try:
        obj = _JSON_DECODER.decode(text)
    except json.JSONDecodeError as error:
        return None, f"invalid json ({error.msg} at char {error.pos})"
    except (ValueError, RecursionError) as error:
        return None, f"invalid json ({error})"
    if type(obj) is not _JsonObject:
        return None, "not a json object"
    if obj.duplicates:
        for name, _, _ in fields:
            if name in obj.duplicates:
                return None, f"duplicate field '{name}'"
    row = []
    for name, dtype, required in fields:
        value = obj.get(name, _MISSING)
        if value is _MISSING or value is None:
            if required:
                return None, (f"missing field '{name}'" if value is _MISSING else
                              f"field '{name}' has type nil, expected {dtype}")
            row.append(None)
            continue
        t = type(value)
        if dtype == "int64":
            if t is not int:
                return None, f"field '{name}' has type {_mp_type(value)}, expected int64"
            if not INT64_MIN <= value <= INT64_MAX:
                return None, f"field '{name}' value {value} is out of range for int64"
        elif dtype == "float64":
            if t is int:
                try:
                    value = float(value)
                except OverflowError:
                    return None, f"field '{name}' value {value} is out of range for float64"
            elif t is not float:
                return None, f"field '{name}' has type {_mp_type(value)}, expected float64"
        elif dtype == "bool":
            if t is not bool:
                return None, f"field '{name}' has type {_mp_type(value)}, expected bool"
        else:
            if t is not str:
                return None, f"field '{name}' has type {_mp_type(value)}, expected string"
            if not _is_utf8_clean(value):
                return None, f"field '{name}' is not valid utf-8"
        row.append(value)
    return row, None


def encode_json(event):
    """The ``json`` payload of one event (a dict)."""
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8")


# --------------------------------------------------------------------------

_DECODERS = {MSGPACK_COLUMNAR: _decode_msgpack_columnar, ARROW: _decode_arrow, JSON: _decode_json}


def encode_columns(columns, format):
    """The payload of ``columns`` in a columnar ``format`` (arrow or
    msgpack-columnar)."""
    if format == ARROW:
        return encode_arrow(columns)
    if format == MSGPACK_COLUMNAR:
        return encode_msgpack_columnar(columns)
    raise ValueError(f"format {format!r} is not columnar; use one of "
                     f"{', '.join(COLUMNAR_FORMATS)}")
