# cython: language_level=3
"""The online record's decoder, compiled: ``tally.core.record`` defines the
layout (1, numbers only, and 2, with a variable area) and re-exports
:class:`RecordDecoder`, which every reader of records uses (``LmdbStore``,
``EmbeddedReader``, the lookup server).

A lookup's answer is Python objects, so decoding is mostly building them:
here one pass over the fixed slots reads each value in C, and variable
values are checked and built straight from the record's bytes. A record
read through libtally is decoded where it lies in the memory map
(:meth:`RecordDecoder.decode_at`, :meth:`RecordDecoder.decode_found`),
with no copy. Every check of the layout
is made, and a record failing one is refused with a ``RecordError``, never
another exception; the message for a wrong size, layout or feature count is
``tally.core.record.mismatch_error``'s.

Little-endian hosts only, as libtally (the records are little-endian).
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy

cdef extern from "tally.h":
    ctypedef struct tally_record:           # read here as libtally's accessors do
        const unsigned char* priv_data
        size_t priv_size

from tally.core.errors import RecordError
from tally.core.types import VALUE_TYPES

DEF HEADER_BYTES = 32
DEF LAYOUT_NUMBERS = 1
DEF LAYOUT_VARIABLE = 2

# Value type codes: their index in VALUE_TYPES (checked at import below).
cdef enum:
    INT64, FLOAT64, STRING, LIST_INT64, LIST_FLOAT64, LIST_STRING, \
        TOP_K_INT64, TOP_K_FLOAT64, TOP_K_STRING

assert VALUE_TYPES == ("int64", "float64", "string", "list<int64>", "list<float64>",
                       "list<string>", "top_k<int64>", "top_k<float64>", "top_k<string>")

cdef int64_t NONE_TIME = -(1 << 63)          # INT64_MIN: no event time
cdef int64_t FOREVER = (1 << 63) - 1          # INT64_MAX: valid until forever


class _Corrupt(Exception):
    """A variable value that does not follow its encoding (turned into a
    RecordError naming the feature)."""


cdef inline uint32_t _u32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline int64_t _i64(const uint8_t* p) noexcept nogil:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


cdef inline double _f64(const uint8_t* p) noexcept nogil:
    cdef double v
    memcpy(&v, p, 8)
    return v


cdef str _utf8(const uint8_t* p, Py_ssize_t length):
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, length, NULL)
    except UnicodeDecodeError as error:
        raise _Corrupt(f"not UTF-8: {error}") from None


cdef list _numbers(const uint8_t* p, Py_ssize_t length, bint floats):
    """list<int64> or list<float64>: count, 0, the items."""
    if length < 8:
        raise _Corrupt(f"{length} bytes cannot hold a list header")
    cdef Py_ssize_t count = _u32(p), i
    if length != 8 + 8 * count:
        raise _Corrupt(f"{count} items need {8 + 8 * count} bytes, not {length}")
    cdef list items = [None] * count
    for i in range(count):
        items[i] = _f64(p + 8 + 8 * i) if floats else _i64(p + 8 + 8 * i)
    return items


cdef list _strings(const uint8_t* p, Py_ssize_t length):
    """list<string>: count, count + 1 offsets (0 first), the UTF-8 bytes."""
    if length < 8:
        raise _Corrupt(f"{length} bytes cannot hold a list header")
    cdef Py_ssize_t count = _u32(p), start = 8 + 4 * count, i, a, b
    if start > length:
        raise _Corrupt(f"{count} strings need more than {length} bytes")
    cdef const uint8_t* ends = p + 4
    if _u32(ends) != 0 or _u32(ends + 4 * count) != length - start:
        raise _Corrupt("its string offsets are out of order or out of bounds")
    for i in range(count):
        if _u32(ends + 4 * i) > _u32(ends + 4 * (i + 1)):
            raise _Corrupt("its string offsets are out of order or out of bounds")
    cdef list items = [None] * count
    for i in range(count):
        a, b = _u32(ends + 4 * i), _u32(ends + 4 * (i + 1))
        items[i] = _utf8(p + start + a, b - a)
    return items


cdef list _top_k(const uint8_t* p, Py_ssize_t length, int kind):
    """top_k<T>: k, 0, k int64 counts, then the k values as list<T>."""
    if length < 8:
        raise _Corrupt(f"{length} bytes cannot hold a top_k header")
    cdef Py_ssize_t k = _u32(p), values_at = 8 + 8 * k, i
    if values_at > length:
        raise _Corrupt(f"{k} counts need more than {length} bytes")
    cdef list values
    if kind == TOP_K_STRING:
        values = _strings(p + values_at, length - values_at)
    else:
        values = _numbers(p + values_at, length - values_at, kind == TOP_K_FLOAT64)
    if len(values) != k:
        raise _Corrupt(f"{k} counts but {len(values)} values")
    cdef list pairs = [None] * k
    for i in range(k):
        pairs[i] = (values[i], _i64(p + 8 + 8 * i))
    return pairs


cdef object _variable(int kind, const uint8_t* p, Py_ssize_t length):
    if kind == STRING:
        return _utf8(p, length)
    if kind == LIST_INT64 or kind == LIST_FLOAT64:
        return _numbers(p, length, kind == LIST_FLOAT64)
    if kind == LIST_STRING:
        return _strings(p, length)
    return _top_k(p, length, kind)


cdef class RecordDecoder:
    """Decodes the records of one view version (its ``ViewSchema``)."""
    cdef readonly object schema
    cdef tuple names
    cdef bytes kinds
    cdef Py_ssize_t n, fixed, slots_at
    cdef int layout
    cdef bint variable

    def __init__(self, schema):
        self.schema = schema
        self.names = tuple(name for name, _ in schema.features)
        self.kinds = bytes(VALUE_TYPES.index(dtype) for _, dtype in schema.features)
        self.n = len(self.names)
        self.fixed = schema.fixed_size
        self.slots_at = HEADER_BYTES + schema.bitmap_bytes
        self.layout = schema.layout
        self.variable = self.layout == LAYOUT_VARIABLE

    def decode(self, raw):
        """One record's bytes (any buffer) -> dict of feature values (None
        for nulls) and the ``_event_time``, ``_write_time``, ``_valid_until``
        and ``_view_version`` header fields (see ``tally.core.record``)."""
        cdef Py_buffer view
        PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE)
        try:
            return self._decode(<const uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def decode_at(self, uintptr_t address, Py_ssize_t size):
        """As :meth:`decode`, of the ``size`` bytes at ``address`` (a record
        in libtally's memory map: valid until its snapshot is reset)."""
        return self._decode(<const uint8_t*>address, size)

    def decode_found(self, uintptr_t records, uintptr_t status, Py_ssize_t n):
        """The decoded records of a libtally ``tally_get_many_*``: ``records``
        and ``status`` are the addresses of its n ``tally_record`` and int
        out-arrays; None where the status is not 0 (no record). Call it
        before the snapshot is reset: the records point into the memory map."""
        cdef const tally_record* found = <const tally_record*>records
        cdef const int* missing = <const int*>status
        cdef list decoded = [None] * n
        cdef Py_ssize_t i
        for i in range(n):
            if not missing[i]:
                decoded[i] = self._decode(found[i].priv_data, found[i].priv_size)
        return decoded

    cdef dict _decode(self, const uint8_t* p, Py_ssize_t size):
        cdef uint16_t n_features
        if size < self.fixed or (size != self.fixed and not self.variable):
            raise self._mismatch(p, size)
        memcpy(&n_features, p + 2, 2)
        if p[0] != self.layout or n_features != self.n:
            raise self._mismatch(p, size)
        cdef dict result = {}
        cdef const unsigned char* kinds = self.kinds
        cdef const uint8_t* slot
        cdef Py_ssize_t i
        cdef int kind
        for i in range(self.n):
            kind = kinds[i]
            slot = p + self.slots_at + 8 * i
            if p[HEADER_BYTES + (i >> 3)] >> (i & 7) & 1:
                result[self.names[i]] = None
            elif kind == INT64:
                result[self.names[i]] = _i64(slot)
            elif kind == FLOAT64:
                result[self.names[i]] = _f64(slot)
            else:
                result[self.names[i]] = self._variable_value(p, size, i, kind,
                                                             _u32(slot), _u32(slot + 4))
        cdef int64_t event_time = _i64(p + 8), valid_until = _i64(p + 24)
        result["_event_time"] = None if event_time == NONE_TIME else event_time
        result["_write_time"] = _i64(p + 16)
        result["_valid_until"] = None if valid_until == FOREVER else valid_until
        result["_view_version"] = _u32(p + 4)
        return result

    cdef object _variable_value(self, const uint8_t* p, Py_ssize_t size, Py_ssize_t i,
                                int kind, Py_ssize_t at, Py_ssize_t length):
        """Feature i's value from the (offset, length) in its slot."""
        try:
            if at < self.fixed or at + length > size:
                raise _Corrupt(f"its bytes {at}..{at + length} lie outside the variable "
                               f"area {self.fixed}..{size}")
            return _variable(kind, p + at, length)
        except _Corrupt as error:
            schema = self.schema
            raise RecordError(f"record of view {schema.view!r} v{schema.version}: feature "
                              f"{self.names[i]!r} ({VALUE_TYPES[kind]}) is corrupt: "
                              f"{error}") from None

    cdef object _mismatch(self, const uint8_t* p, Py_ssize_t size):
        from tally.core.record import mismatch_error
        return mismatch_error(self.schema, (<const char*>p)[:size])
