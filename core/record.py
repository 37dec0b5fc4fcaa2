"""The online record: one per (feature view, entity), shared by every store
and by the C reader in ``cext/``. ``cext/tally.h`` defines the layout (its
``TALLY_RECORD_*`` and ``TALLY_SCHEMA_*`` macros); the structures below follow
it, and tests/test_cext.py compares the two. Little-endian, all offsets in
bytes. A view whose features are all numbers (int64, float64) has records of
layout 1; a view with any string, list or top_k feature has records of
layout 2, which is layout 1 plus a variable area:

    offset  size    field
    0       1       layout version (1, or 2 with a variable area)
    1       1       flags (0; reserved)
    2       2       feature count N (uint16)
    4       4       view version (uint32)
    8       8       newest event time of the entity, epoch ms (int64; INT64_MIN: none)
    16      8       write time, epoch ms (int64)
    24      8       valid until, epoch ms (int64): the time at which a windowed
                    value changes by expiry alone; INT64_MAX if none does
    32      B       null bitmap, B = ceil(N / 64) * 8: bit i (byte i // 8,
                    bit i % 8, least significant first) set means
                    feature i is null
    32 + B  8 * N   one 8-byte slot per feature, in schema order: an int64 or
                    float64 value, or, for a variable feature, a uint32
                    offset (from the record's start) then a uint32 length of
                    its value in the variable area (both 0 when null)
    F       ...     layout 2 only, F = 32 + B + 8 * N: the variable values,
                    each starting at a multiple of 8 (zero padding between)

So every feature sits at a fixed offset: reading a number never looks past
the fixed part. The variable values:

    string          its UTF-8 bytes
    list<T>, T int64 or float64
                    uint32 count n, uint32 0, n 8-byte items
    list<string>    uint32 count n, n + 1 uint32 offsets into the bytes that
                    follow (the first 0, the last their length), the UTF-8
                    bytes of the n strings one after another
    top_k<T>        uint32 k, uint32 0, k int64 counts, then the k values as
                    list<T> (largest count first)

A record is a function of the state, so rewriting it is idempotent; it is at
most ``MAX_RECORD_BYTES`` long (the lookup server's frame limit and
Aerospike's default record size).

The view schema, stored beside the records (key: the view name), is binary
too, so the C reader needs no JSON parser:

    0       1       schema layout version (1 for a numbers-only view, else 2)
    1       1       key type: 0 int64, 1 string
    2       2       feature count N (uint16)
    4       4       view version (uint32)
    8       ...     N entries: value type (1 byte: its index in
                    ``tally.core.types.VALUE_TYPES``; layout 1 has only
                    0 int64 and 1 float64), name length L (1 byte), L bytes
                    of UTF-8 name
Keys: an int64 entity key is 8 bytes big-endian of ``key XOR 2**63`` (byte
order matches numeric order); a string key is its UTF-8 bytes.
"""
import functools
import struct
from dataclasses import dataclass

import numpy as np

from tally.core.errors import RecordError
from tally.core.recorddecoder import RecordDecoder  # noqa: F401  (re-exported)
from tally.core.types import KEY_TYPES, VALUE_TYPES

LAYOUT_VERSION = 1                  # numbers only
VARIABLE_LAYOUT_VERSION = 2         # with a variable area
HEADER = struct.Struct("<BBHIqqq")
SCHEMA_LAYOUT_VERSION = 1
VARIABLE_SCHEMA_LAYOUT_VERSION = 2
SCHEMA_HEADER = struct.Struct("<BBHI")
FIXED_TYPES = VALUE_TYPES[:2]       # int64, float64: held in their slot
MAX_RECORD_BYTES = 1 << 20
MAX_NAME_BYTES = 255                # the schema's one-byte name length
ALIGN = 8
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
_SIGN_BIT = np.uint64(1 << 63)
HEADER_DTYPE = np.dtype([("layout", "u1"), ("flags", "u1"), ("n_features", "<u2"),
                          ("view_version", "<u4"), ("event_time", "<i8"),
                          ("write_time", "<i8"), ("valid_until", "<i8")])


@dataclass(frozen=True)
class ViewSchema:
    """What a reader needs to decode a view's records; stored beside them."""
    view: str
    version: int
    key_type: str                 # "int64" or "string"
    features: tuple               # ((name, one of VALUE_TYPES), ...)

    @property
    def bitmap_bytes(self):
        return (len(self.features) + 63) // 64 * 8

    @property
    def fixed_size(self):
        """The size of the fixed part: of every record, in layout 1."""
        return HEADER.size + self.bitmap_bytes + 8 * len(self.features)

    @property
    def variable(self):
        """Whether any feature lives in the variable area (layout 2)."""
        return any(dtype not in FIXED_TYPES for _, dtype in self.features)

    @property
    def layout(self):
        return VARIABLE_LAYOUT_VERSION if self.variable else LAYOUT_VERSION

    def to_bytes(self):
        layout = VARIABLE_SCHEMA_LAYOUT_VERSION if self.variable else SCHEMA_LAYOUT_VERSION
        parts = [SCHEMA_HEADER.pack(layout, KEY_TYPES.index(self.key_type),
                                    len(self.features), self.version)]
        for name, dtype in self.features:
            encoded = name.encode()
            if len(encoded) > MAX_NAME_BYTES:
                raise RecordError(f"view {self.view!r}: feature name {name!r} is "
                                  f"{len(encoded)} bytes of UTF-8; the online record "
                                  f"allows at most {MAX_NAME_BYTES}: shorten it")
            if dtype not in VALUE_TYPES:
                raise RecordError(f"view {self.view!r}: feature {name!r} has type {dtype!r}; "
                                  f"the online record holds {', '.join(VALUE_TYPES)}")
            parts.append(bytes([VALUE_TYPES.index(dtype), len(encoded)]) + encoded)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, view, raw):
        raw = bytes(raw)
        if len(raw) < SCHEMA_HEADER.size:
            raise RecordError(f"view {view!r}: schema of {len(raw)} bytes is truncated")
        layout, key_type, n_features, version = SCHEMA_HEADER.unpack_from(raw, 0)
        if layout not in (SCHEMA_LAYOUT_VERSION, VARIABLE_SCHEMA_LAYOUT_VERSION):
            raise RecordError(f"view {view!r}: schema layout version {layout} is not supported")
        known = FIXED_TYPES if layout == SCHEMA_LAYOUT_VERSION else VALUE_TYPES
        features, at = [], SCHEMA_HEADER.size
        for _ in range(n_features):
            if at + 2 > len(raw) or at + 2 + raw[at + 1] > len(raw):
                raise RecordError(f"view {view!r}: schema is truncated")
            value_type, length = raw[at], raw[at + 1]
            if value_type >= len(known) or key_type >= len(KEY_TYPES):
                raise RecordError(f"view {view!r}: schema has an unknown type code")
            features.append((raw[at + 2:at + 2 + length].decode(), known[value_type]))
            at += 2 + length
        if at != len(raw):
            raise RecordError(f"view {view!r}: schema has {len(raw) - at} trailing bytes")
        return cls(view, version, KEY_TYPES[key_type], tuple(features))


def encode_keys(key_type, keys):
    """Entity keys -> list of bytes keys for the store."""
    if key_type == "int64":
        raw = (np.asarray(keys, dtype=np.int64).view(np.uint64) ^ _SIGN_BIT).astype(">u8")
        blob = raw.tobytes()
        return [blob[i:i + 8] for i in range(0, len(blob), 8)]
    return [str(k).encode() for k in keys]


def decode_key(key_type, raw):
    if key_type == "int64":
        return int((np.frombuffer(raw, dtype=">u8")[0] ^ _SIGN_BIT).astype(np.int64))
    return bytes(raw).decode()


@dataclass
class Records:
    """The online records of n entities, as columns: what every store writes.

    ``values`` maps each feature name to ``(values, valid)`` arrays of length
    n: for an int64 or float64 feature a numpy array of that type, for the
    others an object array of str (string), lists of items (list<T>) or lists
    of (value, count) tuples (top_k<T>). ``event_time`` and ``valid_until``
    are int64 arrays of length n (or scalars), ``write_time`` an int64 scalar
    or array. Each store lays them out its own way: LMDB as
    :func:`encode_records` bytes, Aerospike as bins."""
    values: dict
    event_time: object
    write_time: object
    valid_until: object

    def __len__(self):
        return len(np.atleast_1d(self.event_time))

    def __getitem__(self, rows):
        """The records of ``rows`` (a slice or an index array)."""
        def part(column):
            return column[rows] if np.ndim(column) else column
        return Records({name: (part(values), part(valid))
                        for name, (values, valid) in self.values.items()},
                       part(self.event_time), part(self.write_time), part(self.valid_until))

    def encode(self, schema):
        """The records in ``schema``'s layout: a list of n bytes objects."""
        n = len(self)
        return encode_records(schema, self.values,
                              np.broadcast_to(np.asarray(self.event_time, np.int64), (n,)),
                              self.write_time,
                              np.broadcast_to(np.asarray(self.valid_until, np.int64), (n,)))


def encode_records(schema, values, event_time, write_time, valid_until):
    """Records for n entities: a list of n bytes objects.

    ``values`` maps each feature name to ``(values, valid)`` arrays of length n
    (see :class:`Records`); ``event_time`` and ``valid_until`` are int64
    arrays of length n. The fixed part is built for all n at once with numpy;
    only variable values are packed one by one. Raises RecordError for a
    value that does not fit its type or a record above MAX_RECORD_BYTES."""
    n = len(event_time)
    header = np.zeros(n, dtype=HEADER_DTYPE)
    header["layout"] = schema.layout
    header["n_features"] = len(schema.features)
    header["view_version"] = schema.version
    header["event_time"] = event_time
    header["write_time"] = write_time
    header["valid_until"] = valid_until
    nulls = np.zeros((n, schema.bitmap_bytes * 8), dtype=bool)
    columns = np.empty((n, len(schema.features)), dtype=np.int64)   # every slot is set
    variable = []
    for i, (name, dtype) in enumerate(schema.features):
        column, valid = values[name]
        valid = np.asarray(valid, dtype=bool)
        nulls[:, i] = ~valid
        if dtype in FIXED_TYPES:
            columns[:, i] = _fixed_column(schema, name, dtype, column, valid).view(np.int64)
        else:
            variable.append((i, name, dtype, column, valid))
    tails = _variable_area(schema, variable, columns) if variable else None
    columns = columns.astype("<i8", copy=False)     # little-endian on any host
    bitmap = np.packbits(nulls, axis=1, bitorder="little")
    blob = np.hstack([header.view(np.uint8).reshape(n, HEADER.size), bitmap,
                      columns.view(np.uint8).reshape(n, 8 * len(schema.features))]).tobytes()
    rows = struct.Struct(f"{schema.fixed_size}s").iter_unpack(blob)   # faster than slicing
    if tails is None:
        return [row for (row,) in rows]
    return [row + tail for (row,), tail in zip(rows, tails)]


def _fixed_column(schema, name, dtype, column, valid):
    """A column as int64 or float64. The view state may hand an int64
    feature as floats (NaN where invalid): valid values must be integral."""
    column = np.asarray(column)
    if dtype == "float64" or column.dtype.kind in "iub":
        return np.asarray(column, dtype=dtype)
    column = np.where(valid, column, 0)
    if column.dtype.kind == "f":
        bad = ~((column == np.floor(column)) & (np.abs(column) < 2.0 ** 63))
        if bad.any():
            raise RecordError(f"view {schema.view!r}: int64 feature {name!r} has the "
                              f"non-integral value {column[bad][0]!r}")
    return column.astype(np.int64)


def _variable_area(schema, variable, columns):
    """Pack the variable features row by row; write each one's (offset,
    length) into its slot of ``columns``. Returns each row's variable area."""
    n = len(columns)
    packers = [(i, name, _PACKERS[dtype], column, valid)
               for i, name, dtype, column, valid in variable]
    slots = np.zeros((n, len(variable)), dtype=np.uint64)
    tails = []
    for r in range(n):
        at, pieces, row_slots = schema.fixed_size, [], [0] * len(packers)
        for j, (i, name, pack, column, valid) in enumerate(packers):
            if not valid[r]:
                continue
            try:
                value = pack(column[r])
            except (TypeError, ValueError, AttributeError, struct.error) as error:
                raise RecordError(f"view {schema.view!r}: feature {name!r} "
                                  f"({schema.features[i][1]}) cannot hold "
                                  f"{_shorten(column[r])}: {error}") from None
            row_slots[j] = at | len(value) << 32
            padded = len(value) + (-len(value) & (ALIGN - 1))
            pieces.append(value.ljust(padded, b"\0"))
            at += padded
        if at > MAX_RECORD_BYTES:
            raise RecordError(f"view {schema.view!r}: a record of {at} bytes exceeds the "
                              f"online limit of {MAX_RECORD_BYTES}: keep fewer or shorter "
                              "list items (n of last_n, k of top_k)")
        slots[r] = row_slots
        tails.append(b"".join(pieces))
    columns[:, [i for i, *_ in variable]] = slots.view(np.int64)
    return tails


def _shorten(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- the variable values: one packer and one unpacker per type ---------------------

def _as_int64_items(items):
    """Items of an int64 list: the view state may hand them as floats."""
    out = []
    for x in items:
        if type(x) is not int:
            if not float(x).is_integer():
                raise ValueError(f"item {x!r} is not an integer")
            x = int(x)
        out.append(x)
    return out


def _pack_int64_list(items):
    try:
        return struct.pack(f"<II{len(items)}q", len(items), 0, *items)
    except struct.error:            # floats from the view state, or out of range
        return struct.pack(f"<II{len(items)}q", len(items), 0, *_as_int64_items(items))


def _pack_float64_list(items):
    return struct.pack(f"<II{len(items)}d", len(items), 0, *items)


def _pack_string_list(items):
    encoded = [s.encode() for s in items]
    ends, total = [0], 0
    for s in encoded:
        total += len(s)
        ends.append(total)
    return struct.pack(f"<I{len(ends)}I", len(encoded), *ends) + b"".join(encoded)


def _top_k_packer(pack_values):
    def pack(pairs):
        counts = [c for _, c in pairs]
        return (struct.pack(f"<II{len(pairs)}q", len(pairs), 0, *counts) +
                pack_values([v for v, _ in pairs]))
    return pack


def _pack_string(value):
    return value.encode()


_PACKERS = {"string": _pack_string, "list<int64>": _pack_int64_list,
            "list<float64>": _pack_float64_list, "list<string>": _pack_string_list,
            "top_k<int64>": _top_k_packer(_pack_int64_list),
            "top_k<float64>": _top_k_packer(_pack_float64_list),
            "top_k<string>": _top_k_packer(_pack_string_list)}


# ---- decoding ------------------------------------------------------------------------

def decode_record(schema, raw):
    """One record's bytes -> dict of feature values (None for nulls) plus the
    ``_event_time``, ``_write_time``, ``_valid_until`` and ``_view_version``
    header fields. Values have the types of :class:`Records`' contract, as
    Python objects: int, float, str, lists of items, lists of (value, count)."""
    return record_decoder(schema).decode(raw)


def decode_records(schema, raws):
    """``decode_record`` of each of ``raws``, None staying None."""
    decode = record_decoder(schema).decode
    return [None if raw is None else decode(raw) for raw in raws]


@functools.lru_cache(maxsize=1024)
def record_decoder(schema):
    """The decoder of ``schema``'s records (``tally.core.recorddecoder``),
    made once per schema: stores build a new (equal) ViewSchema on every read."""
    return RecordDecoder(schema)


def mismatch_error(schema, raw):
    """The RecordError saying how ``raw`` fails the layout or ``schema``
    (its size, layout version or feature count): the compiled decoder's
    message for such a record."""
    layout_of_view = schema.layout
    if len(raw) < HEADER.size:
        return RecordError(f"record of {len(raw)} bytes is shorter than its header")
    layout, _, n_features = HEADER.unpack_from(raw, 0)[:3]
    if layout not in (LAYOUT_VERSION, VARIABLE_LAYOUT_VERSION):
        return RecordError(f"record layout version {layout} is not supported")
    if layout != layout_of_view:
        return RecordError(f"record has layout version {layout}; view {schema.view!r} "
                           f"v{schema.version} has records of layout {layout_of_view}")
    size = (f"{schema.fixed_size}" if layout_of_view == LAYOUT_VERSION
            else f"at least {schema.fixed_size}")
    return RecordError(f"record has {n_features} features and {len(raw)} bytes; "
                       f"view {schema.view!r} v{schema.version} expects "
                       f"{len(schema.features)} and {size}")
