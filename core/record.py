"""The online record: one per (feature view, entity), shared by every store
and by the C reader in ``cext/``. ``cext/tally.h`` defines the layout (its
``TALLY_RECORD_*`` and ``TALLY_SCHEMA_*`` macros); the structures below follow
it, and tests/test_cext.py compares the two. In short, layout version 1,
little-endian, all offsets in bytes:

    offset  size    field
    0       1       layout version (1)
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
    32 + B  8 * N   feature values in schema order: int64 or float64 as the
                    view's schema says

A record is a fixed-size function of the state, so rewriting it is idempotent.

The view schema, stored beside the records (key: the view name), is binary
too, so the C reader needs no JSON parser:

    0       1       schema layout version (1)
    1       1       key type: 0 int64, 1 string
    2       2       feature count N (uint16)
    4       4       view version (uint32)
    8       ...     N entries: value type (1 byte: 0 int64, 1 float64),
                    name length L (1 byte), L bytes of UTF-8 name
Keys: an int64 entity key is 8 bytes big-endian of ``key XOR 2**63`` (byte
order matches numeric order); a string key is its UTF-8 bytes.
"""
import functools
import struct
from dataclasses import dataclass

import numpy as np

from tally.core.errors import RecordError
from tally.core.types import KEY_TYPES

LAYOUT_VERSION = 1
HEADER = struct.Struct("<BBHIqqq")
SCHEMA_LAYOUT_VERSION = 1
SCHEMA_HEADER = struct.Struct("<BBHI")
VALUE_TYPES = ("int64", "float64")
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
    features: tuple               # ((name, "int64" | "float64"), ...)

    @property
    def bitmap_bytes(self):
        return (len(self.features) + 63) // 64 * 8

    @property
    def record_size(self):
        return HEADER.size + self.bitmap_bytes + 8 * len(self.features)

    def to_bytes(self):
        parts = [SCHEMA_HEADER.pack(SCHEMA_LAYOUT_VERSION, KEY_TYPES.index(self.key_type),
                                    len(self.features), self.version)]
        for name, dtype in self.features:
            encoded = name.encode()
            if len(encoded) > 255:
                raise RecordError(f"feature name {name!r} is longer than 255 bytes")
            parts.append(bytes([VALUE_TYPES.index(dtype), len(encoded)]) + encoded)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, view, raw):
        raw = bytes(raw)
        if len(raw) < SCHEMA_HEADER.size:
            raise RecordError(f"view {view!r}: schema of {len(raw)} bytes is truncated")
        layout, key_type, n_features, version = SCHEMA_HEADER.unpack_from(raw, 0)
        if layout != SCHEMA_LAYOUT_VERSION:
            raise RecordError(f"view {view!r}: schema layout version {layout} is not supported")
        features, at = [], SCHEMA_HEADER.size
        for _ in range(n_features):
            if at + 2 > len(raw) or at + 2 + raw[at + 1] > len(raw):
                raise RecordError(f"view {view!r}: schema is truncated")
            value_type, length = raw[at], raw[at + 1]
            if value_type >= len(VALUE_TYPES) or key_type >= len(KEY_TYPES):
                raise RecordError(f"view {view!r}: schema has an unknown type code")
            features.append((raw[at + 2:at + 2 + length].decode(), VALUE_TYPES[value_type]))
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
    n; ``event_time`` and ``valid_until`` are int64 arrays of length n (or
    scalars), ``write_time`` an int64 scalar or array. Each store lays them
    out its own way: LMDB as :func:`encode_records` bytes, Aerospike as bins."""
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
        """The (n, record_size) uint8 matrix of the records in this layout."""
        n = len(self)
        return encode_records(schema, self.values,
                              np.broadcast_to(np.asarray(self.event_time, np.int64), (n,)),
                              self.write_time,
                              np.broadcast_to(np.asarray(self.valid_until, np.int64), (n,)))


def encode_records(schema, values, event_time, write_time, valid_until):
    """Records for n entities as one (n, record_size) uint8 array.

    ``values`` maps each feature name to ``(values, valid)`` arrays of length n;
    ``event_time`` and ``valid_until`` are int64 arrays of length n."""
    n = len(event_time)
    header = np.zeros(n, dtype=HEADER_DTYPE)
    header["layout"] = LAYOUT_VERSION
    header["n_features"] = len(schema.features)
    header["view_version"] = schema.version
    header["event_time"] = event_time
    header["write_time"] = write_time
    header["valid_until"] = valid_until
    nulls = np.zeros((n, schema.bitmap_bytes * 8), dtype=bool)
    columns = np.empty((n, len(schema.features)), dtype=np.int64)
    for i, (name, dtype) in enumerate(schema.features):
        column, valid = values[name]
        nulls[:, i] = ~valid
        columns[:, i] = np.asarray(column, dtype=dtype).view(np.int64)
    columns = columns.astype("<i8", copy=False)     # little-endian on any host
    bitmap = np.packbits(nulls, axis=1, bitorder="little")
    return np.hstack([header.view(np.uint8).reshape(n, HEADER.size), bitmap,
                      columns.view(np.uint8).reshape(n, 8 * len(schema.features))])


def decode_record(schema, raw):
    """One record's bytes -> dict of feature values (None for nulls) plus the
    ``_event_time``, ``_write_time``, ``_valid_until`` and ``_view_version``
    header fields."""
    return record_decoder(schema).decode(raw)


def decode_records(schema, raws):
    """``decode_record`` of each of ``raws``, None staying None."""
    decode = record_decoder(schema).decode
    return [None if raw is None else decode(raw) for raw in raws]


@functools.lru_cache(maxsize=1024)
def record_decoder(schema):
    """The decoder of ``schema``'s records, compiled once per schema: stores
    build a new (equal) ViewSchema on every read."""
    return RecordDecoder(schema)


class RecordDecoder:
    """Decodes the records of one view version with a single ``struct``
    unpack of header, bitmap and values; nulls cost work only when there
    are some, and then per null rather than per feature."""

    def __init__(self, schema):
        self.schema = schema
        self.names = tuple(name for name, _ in schema.features)
        codes = "".join("q" if dtype == "int64" else "d" for _, dtype in schema.features)
        # HEADER with its flags byte skipped, the bitmap as bytes, the values
        self._unpack = struct.Struct(f"<BxHIqqq{schema.bitmap_bytes}s{codes}").unpack
        self._bitmap_words = struct.Struct(f"<{schema.bitmap_bytes // 8}Q").unpack
        self._no_nulls = bytes(schema.bitmap_bytes)

    def decode(self, raw):
        try:
            fields = self._unpack(raw)
        except struct.error:                # not the record size
            raise self._mismatch(raw) from None
        if fields[0] != LAYOUT_VERSION or fields[1] != len(self.names):
            raise self._mismatch(raw)
        result = dict(zip(self.names, fields[7:]))
        if fields[6] != self._no_nulls:
            self._set_nulls(result, fields[6])
        event_time, valid_until = fields[3], fields[5]
        result["_event_time"] = None if event_time == INT64_MIN else event_time
        result["_write_time"] = fields[4]
        result["_valid_until"] = None if valid_until == INT64_MAX else valid_until
        result["_view_version"] = fields[2]
        return result

    def _set_nulls(self, result, bitmap):
        """None for each feature whose bit is set, one bitmap word at a time;
        bits past the last feature (padding) are ignored."""
        names = self.names
        for w, word in enumerate(self._bitmap_words(bitmap)):
            while word:
                lowest = word & -word
                i = 64 * w + lowest.bit_length() - 1
                if i < len(names):
                    result[names[i]] = None
                word ^= lowest

    def _mismatch(self, raw):
        """The RecordError saying how ``raw`` fails the layout or the schema."""
        schema = self.schema
        if len(raw) < HEADER.size:
            return RecordError(f"record of {len(raw)} bytes is shorter than its header")
        layout, _, n_features = HEADER.unpack_from(raw, 0)[:3]
        if layout != LAYOUT_VERSION:
            return RecordError(f"record layout version {layout} is not supported")
        return RecordError(f"record has {n_features} features and {len(raw)} bytes; "
                           f"view {schema.view!r} v{schema.version} expects "
                           f"{len(schema.features)} and {schema.record_size}")
