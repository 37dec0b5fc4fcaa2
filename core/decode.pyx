# cython: language_level=3
"""Batch decoder: msgpack-map message payloads -> typed numpy columns.

A Pulsar consumer hands us a batch of payloads, each a msgpack map such as
``{"user": 42, "article": 7, "readtime": 35.2, "ts": 1732780800123}``.
:func:`decode_msgpack_maps` parses the whole batch by hand over the raw
buffers and writes numeric values straight into preallocated numpy columns,
so no per-event Python object is created for int64/float64/bool fields.

Every payload is parsed by the same C routine (``parse_one``) into the row
slot after the last good row; a bad payload is recorded as a reject (payload
index, reason code, details) and its half-written slot is simply reused by
the next payload, so good rows stay dense and in input order.  Two drivers:

* GIL held (``release_gil=False``; the default below ``_NOGIL_MIN_PAYLOADS``
  payloads): one pass over the payload objects, parsing each straight from
  its own buffer; string values are created right after their row parses.
  Fastest single-threaded: each payload's memory is touched once.
* GIL released (``release_gil=True``; the default for larger batches): in
  chunks of up to ``_NOGIL_CHUNK_PAYLOADS`` payloads / ``_NOGIL_CHUNK_BYTES``
  bytes, (1) with the GIL, pin each payload (a reference to the ``bytes``;
  any other buffer is first copied to ``bytes``, so no thread can change it
  under us) and note its pointer and length; (2) without the GIL, parse the
  chunk, recording string values as (offset, length); (3) with the GIL,
  build the chunk's ``str`` objects and unpin.

Decoding rules
--------------
* The top level must be a fixmap/map16/map32 and must span the whole payload.
* Keys must be msgpack str (fixstr/str8/str16/str32); they are matched
  byte-for-byte against the UTF-8 encoded field names.  A non-str key rejects
  the payload.  Keys that are not schema fields are ignored and their values
  skipped (any type, nested to any depth, without recursion); their contents
  are only checked for being well-formed and complete msgpack.
* A schema field appearing twice in one map rejects the payload
  ("duplicate field 'x'"): msgpack itself would silently keep the last value,
  which hides producer bugs.  Duplicate *extra* keys are not detected.
* int64 fields accept msgpack ints (uint64 above INT64_MAX rejects);
  float64 fields accept ints and floats (float32 is widened exactly);
  bool fields accept true/false; string fields accept str holding valid
  UTF-8 (strict: no surrogates, no overlongs, max U+10FFFF).
* ``nil`` rejects a required field and is a null for an optional one; an
  absent optional field is a null too.  Nulls are NaN / 0 / False / None
  in the column and ``False`` in ``DecodedBatch.valid[name]``.
* Errors are reported in the order they are met while reading the map;
  after the map: trailing bytes, then missing required fields (schema order).

Reject reasons (``N`` is a byte offset into the payload)::

    payload is not bytes-like (got int)       payload buffer is not contiguous
    empty payload                             not a msgpack map
    truncated payload at byte N               (N: start of the innermost object
                                               that is cut short, or the payload
                                               length if one is missing entirely)
    invalid msgpack byte 0xc1 at byte N       map key at byte N has type int, expected str
    duplicate field 'user'                    missing field 'readtime'
    field 'readtime' has type str, expected float64     (also "has type nil" for
                                                         nil in a required field)
    field 'user' value 18446744073709551615 is out of range for int64
    field 'title' is not valid utf-8          trailing bytes after map
"""

import numpy as np

from tally.core.errors import TallyError

cimport numpy as cnp
from cpython.memoryview cimport PyMemoryView_GET_BUFFER
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport NAN
from libc.stdint cimport (int8_t, int16_t, int32_t, int64_t, uint8_t,
                          uint16_t, uint32_t, uint64_t)
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

cnp.import_array()

cdef extern from "Python.h":
    bint _is_bytes "PyBytes_Check" (PyObject* o)
    char* _bytes_data "PyBytes_AS_STRING" (PyObject* o)
    Py_ssize_t _bytes_len "PyBytes_GET_SIZE" (PyObject* o)
    PyObject* _seq_fast "PySequence_Fast" (object o, const char* msg) except NULL
    Py_ssize_t _seq_fast_size "PySequence_Fast_GET_SIZE" (PyObject* o)
    PyObject** _seq_fast_items "PySequence_Fast_ITEMS" (PyObject* o)
    void Py_DECREF(PyObject* o)
    void _incref "Py_INCREF" (PyObject* o)

cdef extern from *:
    """
    static inline uint64_t tally_decode_bswap64(uint64_t w) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return w;
    #elif defined(_MSC_VER)
        return _byteswap_uint64(w);
    #else
        return __builtin_bswap64(w);
    #endif
    }
    #if defined(__GNUC__) || defined(__clang__)
    #define tally_decode_prefetch(p) __builtin_prefetch(p)
    #else
    #define tally_decode_prefetch(p) ((void)0)
    #endif
    """
    uint64_t _bswap64 "tally_decode_bswap64" (uint64_t x) nogil
    void _prefetch "tally_decode_prefetch" (const void* p) nogil


class DecodeError(TallyError, ValueError):
    """Misuse of the decoder (e.g. a bad schema).

    Never raised for bad payloads: those become ``DecodedBatch.rejects``.
    """


# With release_gil=None, batches of at least this many payloads are parsed
# with the GIL released.  That path first copies the payloads into a private
# buffer (~50% more CPU per event than the single GIL-holding pass), so it
# only pays off when holding the GIL would stall other threads noticeably:
# 32768 events are roughly 1 ms of parsing.
_NOGIL_MIN_PAYLOADS = 32768
# The GIL-released path works in chunks of at most this many payloads or
# about this many bytes, releasing the GIL once per chunk.
_NOGIL_CHUNK_PAYLOADS = 16384
_NOGIL_CHUNK_BYTES = 4 << 20

cdef enum:
    K_INT64 = 0
    K_FLOAT64 = 1
    K_STRING = 2
    K_BOOL = 3

_DTYPES = ("int64", "float64", "string", "bool")
_KIND_OF = {name: kind for kind, name in enumerate(_DTYPES)}

cdef enum:
    R_NOT_BYTES = 1
    R_NOT_CONTIGUOUS
    R_EMPTY
    R_NOT_MAP
    R_TRUNCATED
    R_INVALID_BYTE
    R_KEY_NOT_STR
    R_DUPLICATE
    R_TYPE
    R_RANGE
    R_UTF8
    R_TRAILING
    R_MISSING

cdef enum:
    # read_number results
    NUM_INT = 0
    NUM_UINT_BIG = 1
    NUM_FLOAT = 2
    NUM_NONE = 3
    NUM_TRUNC = 4

ctypedef struct FieldSpec:
    const char* name          # UTF-8, owned by Schema._name_bytes
    Py_ssize_t name_len
    uint64_t word             # first min(8, name_len) bytes of name, native order
    uint64_t mask             # selects those bytes in an 8-byte load
    # The key as a fixstr (header byte + name) in two 8-byte words, with
    # masks, for name_len <= 15; otherwise kmask0 = 0, kword0 = 1, which
    # never matches.
    uint64_t kword0
    uint64_t kword1
    uint64_t kmask0
    uint64_t kmask1
    int kind
    bint required

ctypedef struct ColOut:
    char* data                # int64*/double*/npy_bool*; string: int64 (offset, length) pairs
    uint8_t* valid            # NULL for required fields
    Py_ssize_t str_step       # string: 2 = one (offset, length) pair per row,
                              # 0 = a single pair reused (strings built per row)

ctypedef struct RejectRec:
    Py_ssize_t index
    Py_ssize_t pos
    uint64_t value
    int code
    int field
    int byte

ctypedef struct RejectList:
    RejectRec* items
    Py_ssize_t n
    Py_ssize_t cap


# --------------------------------------------------------------------------
# Schema

cdef class Schema:
    """Fields to extract: ``Schema([(name, dtype), (name, dtype, required), ...])``.

    ``dtype`` is one of ``"int64"``, ``"float64"``, ``"string"``, ``"bool"``;
    ``required`` defaults to ``True``.  Raises :class:`DecodeError` on a bad
    field list.  Immutable once built; safe to share between threads.
    """
    cdef FieldSpec* specs
    cdef Py_ssize_t nfields
    cdef tuple _fields
    cdef tuple _name_bytes

    def __cinit__(self):
        self.specs = NULL
        self.nfields = 0

    def __init__(self, fields):
        if self.specs != NULL:
            raise DecodeError("Schema is immutable; build a new one")
        if isinstance(fields, (str, bytes)) or not hasattr(fields, "__iter__"):
            raise DecodeError(
                f"schema fields must be a list of (name, dtype[, required]) tuples, "
                f"got {type(fields).__name__}")
        norm = []
        encoded = []
        seen = set()
        for i, item in enumerate(fields):
            if not isinstance(item, (tuple, list)) or not 2 <= len(item) <= 3:
                raise DecodeError(
                    f"schema field #{i} must be a (name, dtype[, required]) tuple, got {item!r}")
            name, dtype = item[0], item[1]
            required = item[2] if len(item) == 3 else True
            if not isinstance(name, str) or not name:
                raise DecodeError(f"schema field #{i}: name must be a non-empty str, got {name!r}")
            try:
                raw = name.encode("utf-8")
            except UnicodeEncodeError:
                raise DecodeError(f"schema field #{i}: name {name!r} is not encodable as UTF-8") from None
            if not isinstance(dtype, str) or dtype not in _KIND_OF:
                raise DecodeError(
                    f"schema field {name!r}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            if not isinstance(required, (bool, np.bool_)):
                raise DecodeError(
                    f"schema field {name!r}: required must be a bool, got {required!r}")
            if name in seen:
                raise DecodeError(f"schema field {name!r} is listed twice")
            seen.add(name)
            norm.append((name, dtype, bool(required)))
            encoded.append(raw)
        if not norm:
            raise DecodeError("schema must have at least one field")

        cdef FieldSpec* specs = <FieldSpec*>malloc(len(norm) * sizeof(FieldSpec))
        if specs == NULL:
            raise MemoryError()
        cdef Py_ssize_t j
        for j in range(len(norm)):
            raw = encoded[j]
            specs[j].name = <const char*>(<bytes>raw)
            specs[j].name_len = len(raw)
            specs[j].word = 0
            memcpy(&specs[j].word, specs[j].name, min(len(raw), 8))
            specs[j].mask = 0
            memset(&specs[j].mask, 0xff, min(len(raw), 8))
            if len(raw) <= 15:
                enc = (bytes([0xa0 | len(raw)]) + raw).ljust(16, b"\0")
                keymask = (b"\xff" * (len(raw) + 1)).ljust(16, b"\0")
                memcpy(&specs[j].kword0, <const char*>enc, 8)
                memcpy(&specs[j].kword1, <const char*>enc + 8, 8)
                memcpy(&specs[j].kmask0, <const char*>keymask, 8)
                memcpy(&specs[j].kmask1, <const char*>keymask + 8, 8)
            else:
                specs[j].kword0 = 1
                specs[j].kmask0 = 0
                specs[j].kword1 = 0
                specs[j].kmask1 = 0
            specs[j].kind = _KIND_OF[norm[j][1]]
            specs[j].required = norm[j][2]
        self.specs = specs
        self.nfields = len(norm)
        self._fields = tuple(norm)
        self._name_bytes = tuple(encoded)

    def __dealloc__(self):
        free(self.specs)

    cdef int _check(self) except -1:
        if self.specs == NULL:
            raise DecodeError("Schema was not initialized")
        return 0

    @property
    def fields(self):
        """Normalized fields: tuple of (name, dtype, required)."""
        return self._fields

    @property
    def names(self):
        return tuple(f[0] for f in self._fields or ())

    def __len__(self):
        return self.nfields

    def __eq__(self, other):
        if not isinstance(other, Schema):
            return NotImplemented
        return self._fields == (<Schema>other)._fields

    def __hash__(self):
        return hash(self._fields)

    def __reduce__(self):
        return (Schema, (list(self._fields or ()),))

    def __repr__(self):
        return f"Schema({list(self._fields or ())!r})"


# --------------------------------------------------------------------------
# Result

cdef class DecodedBatch:
    """Result of :func:`decode_msgpack_maps`.

    ``columns[name]`` has one entry per good row (int64 / float64 / bool
    arrays; object arrays of ``str`` for string fields).  ``valid[name]`` is a
    bool mask for each optional field (``False`` = null).  ``source_index[i]``
    is the payload index of row ``i``.  ``rejects`` lists
    ``(payload_index, reason)`` for every bad payload, in input order.
    """
    cdef readonly Py_ssize_t n_rows
    cdef readonly dict columns
    cdef readonly dict valid
    cdef readonly object source_index
    cdef readonly list rejects

    def __len__(self):
        return self.n_rows

    def __repr__(self):
        return (f"<DecodedBatch n_rows={self.n_rows} columns={list(self.columns)} "
                f"rejects={len(self.rejects)}>")


# --------------------------------------------------------------------------
# nogil parsing

cdef inline uint16_t be16(const uint8_t* q) noexcept nogil:
    return (<uint16_t>q[0] << 8) | q[1]

cdef inline uint32_t be32(const uint8_t* q) noexcept nogil:
    return ((<uint32_t>q[0] << 24) | (<uint32_t>q[1] << 16)
            | (<uint32_t>q[2] << 8) | q[3])

cdef inline uint64_t be64(const uint8_t* q) noexcept nogil:
    return (<uint64_t>be32(q) << 32) | be32(q + 4)


cdef inline int reject_at(RejectRec* err, int code, Py_ssize_t pos) noexcept nogil:
    err.code = code
    err.pos = pos
    return 1


cdef bint utf8_valid(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 (RFC 3629), exactly what ``bytes.decode('utf-8')`` accepts."""
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    cdef uint8_t c, c1
    while i < n:
        if n - i >= 8:
            memcpy(&w, s + i, 8)
            if (w & 0x8080808080808080ULL) == 0:
                i += 8
                continue
        c = s[i]
        if c < 0x80:
            i += 1
        elif c < 0xc2:
            return False
        elif c < 0xe0:
            if n - i < 2 or (s[i + 1] & 0xc0) != 0x80:
                return False
            i += 2
        elif c < 0xf0:
            if n - i < 3:
                return False
            c1 = s[i + 1]
            if c == 0xe0:
                if c1 < 0xa0 or c1 > 0xbf:
                    return False
            elif c == 0xed:
                if c1 < 0x80 or c1 > 0x9f:
                    return False
            elif (c1 & 0xc0) != 0x80:
                return False
            if (s[i + 2] & 0xc0) != 0x80:
                return False
            i += 3
        elif c < 0xf5:
            if n - i < 4:
                return False
            c1 = s[i + 1]
            if c == 0xf0:
                if c1 < 0x90 or c1 > 0xbf:
                    return False
            elif c == 0xf4:
                if c1 < 0x80 or c1 > 0x8f:
                    return False
            elif (c1 & 0xc0) != 0x80:
                return False
            if (s[i + 2] & 0xc0) != 0x80 or (s[i + 3] & 0xc0) != 0x80:
                return False
            i += 4
        else:
            return False
    return True


cdef int skip_object(const uint8_t* buf, Py_ssize_t n, Py_ssize_t* pp,
                     RejectRec* err) noexcept nogil:
    """Skip one complete msgpack object (any type, any nesting) at ``*pp``.

    Iterative: nested containers just add to the count of objects still to
    skip.  Every step consumes at least one byte, so this terminates within
    ``n`` steps.  Returns 0, or 1 with ``err`` filled (truncated / invalid).
    """
    cdef uint64_t pending = 1
    cdef Py_ssize_t p = pp[0]
    cdef Py_ssize_t start, hdr, size
    cdef uint8_t b
    while pending:
        pending -= 1
        if p >= n:
            return reject_at(err, R_TRUNCATED, p)
        start = p
        b = buf[p]
        if b <= 0x7f or b >= 0xe0:                 # fixint
            p += 1
            continue
        if b <= 0x8f:                               # fixmap
            pending += 2 * <uint64_t>(b & 0x0f)
            p += 1
            continue
        if b <= 0x9f:                               # fixarray
            pending += b & 0x0f
            p += 1
            continue
        if b <= 0xbf:                               # fixstr
            hdr = 1
            size = b & 0x1f
        elif b == 0xc0 or b == 0xc2 or b == 0xc3:  # nil, false, true
            p += 1
            continue
        elif b == 0xc1:
            return reject_at(err, R_INVALID_BYTE, p)
        elif b == 0xc4 or b == 0xd9:                # bin8 / str8
            if n - p < 2:
                return reject_at(err, R_TRUNCATED, start)
            hdr = 2
            size = buf[p + 1]
        elif b == 0xc5 or b == 0xda:                # bin16 / str16
            if n - p < 3:
                return reject_at(err, R_TRUNCATED, start)
            hdr = 3
            size = be16(buf + p + 1)
        elif b == 0xc6 or b == 0xdb:                # bin32 / str32
            if n - p < 5:
                return reject_at(err, R_TRUNCATED, start)
            hdr = 5
            size = be32(buf + p + 1)
        elif b == 0xc7:                             # ext8: len, type, data
            if n - p < 2:
                return reject_at(err, R_TRUNCATED, start)
            hdr = 3
            size = buf[p + 1]
        elif b == 0xc8:                             # ext16
            if n - p < 3:
                return reject_at(err, R_TRUNCATED, start)
            hdr = 4
            size = be16(buf + p + 1)
        elif b == 0xc9:                             # ext32
            if n - p < 5:
                return reject_at(err, R_TRUNCATED, start)
            hdr = 6
            size = be32(buf + p + 1)
        elif b == 0xca:                             # float32
            hdr = 1
            size = 4
        elif b == 0xcb:                             # float64
            hdr = 1
            size = 8
        elif b <= 0xcf:                             # uint8..uint64 (0xcc..0xcf)
            hdr = 1
            size = 1 << (b - 0xcc)
        elif b <= 0xd3:                             # int8..int64 (0xd0..0xd3)
            hdr = 1
            size = 1 << (b - 0xd0)
        elif b <= 0xd8:                             # fixext1..16: type + data
            hdr = 2
            size = 1 << (b - 0xd4)
        elif b == 0xdc or b == 0xdd:                # array16 / array32
            if b == 0xdc:
                if n - p < 3:
                    return reject_at(err, R_TRUNCATED, start)
                pending += be16(buf + p + 1)
                p += 3
            else:
                if n - p < 5:
                    return reject_at(err, R_TRUNCATED, start)
                pending += be32(buf + p + 1)
                p += 5
            continue
        else:                                       # map16 / map32 (0xde, 0xdf)
            if b == 0xde:
                if n - p < 3:
                    return reject_at(err, R_TRUNCATED, start)
                pending += 2 * <uint64_t>be16(buf + p + 1)
                p += 3
            else:
                if n - p < 5:
                    return reject_at(err, R_TRUNCATED, start)
                pending += 2 * <uint64_t>be32(buf + p + 1)
                p += 5
            continue
        if hdr > n - p or size > n - p - hdr:
            return reject_at(err, R_TRUNCATED, start)
        p += hdr + size
    pp[0] = p
    return 0


cdef inline uint64_t load_be(const uint8_t* q, Py_ssize_t width, Py_ssize_t avail) noexcept nogil:
    """Big-endian unsigned value of ``width`` (1, 2, 4 or 8) bytes at ``q``.

    With 8 readable bytes this is one load + bswap + shift (no branch on the
    width); near the end of the buffer it falls back to a byte loop.
    """
    cdef uint64_t w
    cdef Py_ssize_t j
    if avail >= 8:
        memcpy(&w, q, 8)
        w = _bswap64(w)
        return w >> (64 - 8 * width) if width < 8 else w
    w = 0
    for j in range(width):
        w = (w << 8) | q[j]
    return w


cdef inline int read_number(const uint8_t* buf, Py_ssize_t n, Py_ssize_t* pp,
                            int64_t* iv, uint64_t* uv, double* dv) noexcept nogil:
    """Read a msgpack int or float at ``*pp`` (``*pp < n``)."""
    cdef Py_ssize_t p = pp[0]
    cdef uint8_t b = buf[p]
    cdef Py_ssize_t avail = n - p - 1
    cdef const uint8_t* q = buf + p + 1
    cdef unsigned int t
    cdef Py_ssize_t width
    cdef uint64_t u
    cdef uint32_t u32
    cdef float f32
    if b <= 0x7f:
        iv[0] = b
        pp[0] = p + 1
        return NUM_INT
    if b >= 0xe0:
        iv[0] = <int8_t>b
        pp[0] = p + 1
        return NUM_INT
    t = b - 0xcc
    if t <= 7:                                  # 0xcc..0xcf uint, 0xd0..0xd3 int
        width = 1 << (t & 3)
        if avail < width:
            return NUM_TRUNC
        u = load_be(q, width, avail)
        pp[0] = p + 1 + width
        if t < 4:
            if u > <uint64_t>0x7fffffffffffffffULL:
                uv[0] = u
                return NUM_UINT_BIG
            iv[0] = <int64_t>u
        else:                                   # sign-extend
            iv[0] = (<int64_t>(u << (64 - 8 * width))) >> (64 - 8 * width)
        return NUM_INT
    if b == 0xcb:
        if avail < 8:
            return NUM_TRUNC
        u = load_be(q, 8, avail)
        memcpy(dv, &u, 8)
        pp[0] = p + 9
        return NUM_FLOAT
    if b == 0xca:
        if avail < 4:
            return NUM_TRUNC
        u32 = <uint32_t>load_be(q, 4, avail)
        memcpy(&f32, &u32, 4)
        dv[0] = f32
        pp[0] = p + 5
        return NUM_FLOAT
    return NUM_NONE


cdef inline void write_null(int kind, ColOut* col, Py_ssize_t row) noexcept nogil:
    if kind == K_INT64:
        (<int64_t*>col.data)[row] = 0
    elif kind == K_FLOAT64:
        (<double*>col.data)[row] = NAN
    elif kind == K_BOOL:
        (<uint8_t*>col.data)[row] = 0
    else:
        (<int64_t*>col.data)[col.str_step * row] = -1
        (<int64_t*>col.data)[col.str_step * row + 1] = 0
    col.valid[row] = 0


cdef inline int parse_value(const FieldSpec* spec, ColOut* col, int f,
                            const uint8_t* buf, Py_ssize_t n, Py_ssize_t* pp,
                            Py_ssize_t row, RejectRec* err) noexcept nogil:
    """Parse the value of schema field ``f`` at ``*pp`` into ``col[row]``."""
    cdef Py_ssize_t p = pp[0]
    cdef Py_ssize_t hdr, size
    cdef uint8_t b
    cdef int r
    cdef int64_t iv = 0
    cdef uint64_t uv = 0
    cdef double dv = 0
    if p >= n:
        return reject_at(err, R_TRUNCATED, p)
    b = buf[p]
    if b == 0xc0:
        if spec.required:
            err.field = f
            err.byte = b
            return reject_at(err, R_TYPE, p)
        write_null(spec.kind, col, row)
        pp[0] = p + 1
        return 0
    if b == 0xc1:
        return reject_at(err, R_INVALID_BYTE, p)

    if spec.kind == K_INT64 or spec.kind == K_FLOAT64:
        r = read_number(buf, n, pp, &iv, &uv, &dv)
        if r == NUM_TRUNC:
            return reject_at(err, R_TRUNCATED, p)
        if r == NUM_NONE or (r == NUM_FLOAT and spec.kind == K_INT64):
            err.field = f
            err.byte = b
            return reject_at(err, R_TYPE, p)
        if spec.kind == K_INT64:
            if r == NUM_UINT_BIG:
                err.field = f
                err.value = uv
                return reject_at(err, R_RANGE, p)
            (<int64_t*>col.data)[row] = iv
        else:
            if r == NUM_INT:
                dv = <double>iv
            elif r == NUM_UINT_BIG:
                dv = <double>uv
            (<double*>col.data)[row] = dv
    elif spec.kind == K_BOOL:
        if b == 0xc2:
            (<uint8_t*>col.data)[row] = 0
        elif b == 0xc3:
            (<uint8_t*>col.data)[row] = 1
        else:
            err.field = f
            err.byte = b
            return reject_at(err, R_TYPE, p)
        pp[0] = p + 1
    else:  # K_STRING
        if (b & 0xe0) == 0xa0:
            hdr = 1
            size = b & 0x1f
        elif b == 0xd9:
            if n - p < 2:
                return reject_at(err, R_TRUNCATED, p)
            hdr = 2
            size = buf[p + 1]
        elif b == 0xda:
            if n - p < 3:
                return reject_at(err, R_TRUNCATED, p)
            hdr = 3
            size = be16(buf + p + 1)
        elif b == 0xdb:
            if n - p < 5:
                return reject_at(err, R_TRUNCATED, p)
            hdr = 5
            size = be32(buf + p + 1)
        else:
            err.field = f
            err.byte = b
            return reject_at(err, R_TYPE, p)
        if size > n - p - hdr:
            return reject_at(err, R_TRUNCATED, p)
        if not utf8_valid(buf + p + hdr, size):
            err.field = f
            return reject_at(err, R_UTF8, p)
        (<int64_t*>col.data)[col.str_step * row] = p + hdr
        (<int64_t*>col.data)[col.str_step * row + 1] = size
        pp[0] = p + hdr + size
    if col.valid != NULL:
        col.valid[row] = 1
    return 0


cdef inline bint key_matches(const FieldSpec* spec, const uint8_t* k,
                             Py_ssize_t klen, Py_ssize_t avail) noexcept nogil:
    """Is the ``klen``-byte key at ``k`` (``avail`` readable bytes) this field?"""
    cdef uint64_t w
    cdef Py_ssize_t j
    if spec.name_len != klen:
        return False
    if avail >= 8:
        memcpy(&w, k, 8)
        if (w & spec.mask) != spec.word:
            return False
        return klen <= 8 or memcmp(spec.name + 8, k + 8, klen - 8) == 0
    for j in range(klen):                 # short tail of the payload
        if <uint8_t>spec.name[j] != k[j]:
            return False
    return True


cdef int parse_one(const FieldSpec* specs, Py_ssize_t nf,
                   const uint8_t* buf, Py_ssize_t n, ColOut* cols,
                   Py_ssize_t row, uint32_t* seen, uint32_t gen,
                   RejectRec* err) noexcept nogil:
    """Parse one payload into row ``row``.  0 = good row, 1 = reject (``err``).

    ``seen[f] == gen`` marks field ``f`` as present in this payload (``gen``
    changes per payload, so ``seen`` never needs clearing).
    """
    cdef Py_ssize_t p, key_pos, klen, f, j, hint = 0, nseen = 0
    cdef uint64_t count, k, w, w1
    cdef uint8_t b
    if n == 0:
        err.code = R_EMPTY
        return 1
    b = buf[0]
    if (b & 0xf0) == 0x80:
        count = b & 0x0f
        p = 1
    elif b == 0xde:
        if n < 3:
            return reject_at(err, R_TRUNCATED, 0)
        count = be16(buf + 1)
        p = 3
    elif b == 0xdf:
        if n < 5:
            return reject_at(err, R_TRUNCATED, 0)
        count = be32(buf + 1)
        p = 5
    else:
        err.code = R_NOT_MAP
        return 1

    k = 0
    while k < count:
        k += 1
        key_pos = p
        f = -1
        # ---- fast path: the key is the expected next field, as a fixstr
        if n - p >= 8:
            memcpy(&w, buf + p, 8)
            if (w & specs[hint].kmask0) == specs[hint].kword0:
                if specs[hint].kmask1 == 0:               # key of <= 8 bytes
                    f = hint
                elif n - p >= 16:
                    memcpy(&w1, buf + p + 8, 8)
                    if (w1 & specs[hint].kmask1) == specs[hint].kword1:
                        f = hint
                if f >= 0:
                    p += 1 + specs[f].name_len
        if f < 0:
            # ---- general key
            if p >= n:
                return reject_at(err, R_TRUNCATED, p)
            b = buf[p]
            if (b & 0xe0) == 0xa0:
                klen = b & 0x1f
                p += 1
            elif b == 0xd9:
                if n - p < 2:
                    return reject_at(err, R_TRUNCATED, key_pos)
                klen = buf[p + 1]
                p += 2
            elif b == 0xda:
                if n - p < 3:
                    return reject_at(err, R_TRUNCATED, key_pos)
                klen = be16(buf + p + 1)
                p += 3
            elif b == 0xdb:
                if n - p < 5:
                    return reject_at(err, R_TRUNCATED, key_pos)
                klen = be32(buf + p + 1)
                p += 5
            elif b == 0xc1:
                return reject_at(err, R_INVALID_BYTE, key_pos)
            else:
                err.byte = b
                return reject_at(err, R_KEY_NOT_STR, key_pos)
            if klen > n - p:
                return reject_at(err, R_TRUNCATED, key_pos)
            # match, starting at the expected field (producers usually
            # write fields in schema order)
            for j in range(nf):
                if key_matches(&specs[hint], buf + p, klen, n - p):
                    f = hint
                    break
                hint += 1
                if hint == nf:
                    hint = 0
            p += klen
            if f < 0:
                # not a schema field: skip its value, whatever it is
                if skip_object(buf, n, &p, err):
                    return 1
                continue
        # ---- value of schema field f
        hint = f + 1
        if hint == nf:
            hint = 0
        if seen[f] == gen:
            err.field = <int>f
            return reject_at(err, R_DUPLICATE, key_pos)
        seen[f] = gen
        nseen += 1
        if parse_value(&specs[f], &cols[f], <int>f, buf, n, &p, row, err):
            return 1

    if p != n:
        return reject_at(err, R_TRAILING, p)
    if nseen != nf:
        for f in range(nf):
            if seen[f] != gen:
                if specs[f].required:
                    err.field = <int>f
                    err.code = R_MISSING
                    return 1
                write_null(specs[f].kind, &cols[f], row)
    return 0


ctypedef struct ParseState:
    Py_ssize_t row            # next output row
    uint32_t gen              # generation for the ``seen`` marks


cdef int parse_chunk(const FieldSpec* specs, Py_ssize_t nf,
                     const uint8_t** ptrs, const int64_t* lens,
                     Py_ssize_t i0, Py_ssize_t count,
                     ColOut* cols, int64_t* source_index, uint32_t* seen,
                     RejectList* rl, ParseState* st) noexcept nogil:
    """Parse payloads ``i0 .. i0+count-1`` (``ptrs[k]``, ``lens[k]`` for
    payload ``i0+k``; length -1 / -2: not bytes-like / not contiguous).
    Returns 0, or -1 on OOM."""
    cdef Py_ssize_t k, row = st.row
    cdef int64_t ln
    cdef uint32_t gen = st.gen
    cdef RejectRec err
    cdef RejectRec* grown
    cdef int bad
    for k in range(count):
        if k + 4 < count:
            _prefetch(ptrs[k + 4])
        ln = lens[k]
        gen += 1
        if gen == 0:                      # wrapped: clear and restart
            memset(seen, 0, nf * sizeof(uint32_t))
            gen = 1
        if ln < 0:
            err.code = R_NOT_BYTES if ln == -1 else R_NOT_CONTIGUOUS
            bad = 1
        else:
            bad = parse_one(specs, nf, ptrs[k], ln, cols, row, seen, gen, &err)
        if bad:
            if rl.n == rl.cap:
                grown = <RejectRec*>realloc(rl.items,
                                            (64 if rl.cap == 0 else 2 * rl.cap) * sizeof(RejectRec))
                if grown == NULL:
                    st.row = row
                    st.gen = gen
                    return -1
                rl.items = grown
                rl.cap = 64 if rl.cap == 0 else 2 * rl.cap
            err.index = i0 + k
            rl.items[rl.n] = err
            rl.n += 1
        else:
            source_index[row] = i0 + k
            row += 1
    st.row = row
    st.gen = gen
    return 0


# --------------------------------------------------------------------------
# Python-facing

cdef str _type_name(int b):
    if b <= 0x7f or b >= 0xe0 or 0xcc <= b <= 0xd3:
        return "int"
    if b <= 0x8f or b == 0xde or b == 0xdf:
        return "map"
    if b <= 0x9f or b == 0xdc or b == 0xdd:
        return "array"
    if b <= 0xbf or 0xd9 <= b <= 0xdb:
        return "str"
    if b == 0xc0:
        return "nil"
    if b == 0xc2 or b == 0xc3:
        return "bool"
    if 0xc4 <= b <= 0xc6:
        return "bin"
    if b == 0xca or b == 0xcb:
        return "float"
    if b == 0xc1:
        return "invalid"
    return "ext"


cdef str _reason(const RejectRec* r, tuple fields, dict bad_types):
    cdef int code = r.code
    if code == R_NOT_BYTES:
        return f"payload is not bytes-like (got {bad_types.get(r.index, '?')})"
    if code == R_NOT_CONTIGUOUS:
        return "payload buffer is not contiguous"
    if code == R_EMPTY:
        return "empty payload"
    if code == R_NOT_MAP:
        return "not a msgpack map"
    if code == R_TRUNCATED:
        return f"truncated payload at byte {r.pos}"
    if code == R_INVALID_BYTE:
        return f"invalid msgpack byte 0xc1 at byte {r.pos}"
    if code == R_KEY_NOT_STR:
        return f"map key at byte {r.pos} has type {_type_name(r.byte)}, expected str"
    if code == R_TRAILING:
        return "trailing bytes after map"
    name = fields[r.field][0]
    if code == R_DUPLICATE:
        return f"duplicate field '{name}'"
    if code == R_TYPE:
        return f"field '{name}' has type {_type_name(r.byte)}, expected {fields[r.field][1]}"
    if code == R_RANGE:
        return f"field '{name}' value {r.value} is out of range for int64"
    if code == R_UTF8:
        return f"field '{name}' is not valid utf-8"
    if code == R_MISSING:
        return f"missing field '{name}'"
    return f"internal error: unknown reject code {code}"  # pragma: no cover


cdef class _Scratch:
    """Small C buffers of one decode call, freed however the call ends."""
    cdef ColOut* cols
    cdef uint32_t* seen
    cdef int* str_fields          # indices of string fields
    # release_gil=True: the chunk being parsed without the GIL
    cdef const uint8_t** cptrs
    cdef int64_t* clens
    cdef PyObject** crefs         # pinned bytes objects (or NULL)
    cdef Py_ssize_t chunk_cap
    cdef Py_ssize_t n_pinned
    cdef PyObject*** str_slots    # per string field: data of its object column
    cdef Py_ssize_t n_str
    cdef RejectList rl

    def __cinit__(self, Py_ssize_t nf):
        self.cols = <ColOut*>malloc(nf * sizeof(ColOut))
        self.seen = <uint32_t*>malloc(nf * sizeof(uint32_t))
        self.str_fields = <int*>malloc(nf * sizeof(int))
        self.str_slots = <PyObject***>malloc(nf * sizeof(PyObject**))
        self.n_str = 0
        self.cptrs = NULL
        self.clens = NULL
        self.crefs = NULL
        self.chunk_cap = 0
        self.n_pinned = 0
        self.rl.items = NULL
        self.rl.n = 0
        self.rl.cap = 0
        if (self.cols == NULL or self.seen == NULL or self.str_fields == NULL
                or self.str_slots == NULL):
            raise MemoryError()

    cdef int alloc_chunk(self, Py_ssize_t cap) except -1:
        self.cptrs = <const uint8_t**>malloc(cap * sizeof(uint8_t*))
        self.clens = <int64_t*>malloc(cap * sizeof(int64_t))
        self.crefs = <PyObject**>malloc(cap * sizeof(PyObject*))
        if self.cptrs == NULL or self.clens == NULL or self.crefs == NULL:
            raise MemoryError()
        self.chunk_cap = cap
        return 0

    cdef void unpin(self):
        cdef Py_ssize_t k
        for k in range(self.n_pinned):
            Py_XDECREF(self.crefs[k])
        self.n_pinned = 0

    def __dealloc__(self):
        self.unpin()
        free(self.cptrs)
        free(self.clens)
        free(self.crefs)
        free(self.cols)
        free(self.seen)
        free(self.str_fields)
        free(self.str_slots)
        free(self.rl.items)

    cdef int add_reject(self, const RejectRec* err, Py_ssize_t index) except -1:
        cdef RejectRec* grown
        if self.rl.n == self.rl.cap:
            grown = <RejectRec*>realloc(self.rl.items,
                                        (64 if self.rl.cap == 0 else 2 * self.rl.cap) * sizeof(RejectRec))
            if grown == NULL:
                raise MemoryError()
            self.rl.items = grown
            self.rl.cap = 64 if self.rl.cap == 0 else 2 * self.rl.cap
        self.rl.items[self.rl.n] = err[0]
        self.rl.items[self.rl.n].index = index
        self.rl.n += 1
        return 0

    cdef int emit_strings(self, const uint8_t* buf, Py_ssize_t row) except -1:
        """Create the ``str`` values of parsed row ``row`` (offsets into
        ``buf``, the row's payload) in the object columns."""
        cdef Py_ssize_t j, start
        cdef ColOut* col
        cdef int64_t* offs
        cdef PyObject** slot
        cdef object s
        for j in range(self.n_str):
            col = &self.cols[self.str_fields[j]]
            offs = <int64_t*>col.data + col.str_step * row
            start = offs[0]
            if start < 0:
                continue                      # null: the slot already holds None
            # validated UTF-8: cannot fail (except MemoryError)
            s = PyUnicode_DecodeUTF8(<const char*>buf + start, offs[1], NULL)
            slot = self.str_slots[j] + row
            Py_INCREF(s)
            Py_XDECREF(slot[0])
            slot[0] = <PyObject*>s
        return 0


cdef object _payload_view(object obj):
    """Slow path for a non-``bytes`` payload: a C-contiguous memoryview of it,
    ``-1`` if it does not export a buffer, ``-2`` if not contiguous."""
    try:
        mv = memoryview(obj)
    except Exception:
        return -1
    if not mv.c_contiguous:
        mv.release()
        return -2
    return mv


cdef Py_ssize_t _decode_holding_gil(PyObject* seq, Py_ssize_t n, const FieldSpec* specs,
                                    Py_ssize_t nf, _Scratch sc, int64_t* src,
                                    dict bad_types) except -1:
    """Single pass over the payload objects with the GIL held: each payload is
    parsed straight from its own buffer, string values are created at once."""
    cdef Py_ssize_t i, row = 0
    cdef uint32_t gen = 0
    cdef PyObject** items = _seq_fast_items(seq)
    cdef PyObject* item
    cdef PyObject* ahead
    cdef Py_buffer* pb
    cdef RejectRec err
    cdef int bad
    memset(sc.seen, 0, nf * sizeof(uint32_t))
    for i in range(n):
        gen += 1
        if gen == 0:
            memset(sc.seen, 0, nf * sizeof(uint32_t))
            gen = 1
        if i + 8 < n:
            ahead = items[i + 8]
            _prefetch(ahead)
            _prefetch(<char*>ahead + 64)
        item = items[i]
        if _is_bytes(item):
            bad = parse_one(specs, nf, <const uint8_t*>_bytes_data(item), _bytes_len(item),
                            sc.cols, row, sc.seen, gen, &err)
            if not bad and sc.n_str:
                sc.emit_strings(<const uint8_t*>_bytes_data(item), row)
        else:
            # Slow path: memoryview() may run arbitrary code (which could
            # even mutate the payload list), so re-read the list afterwards.
            obj = <object>item
            mv = _payload_view(obj)
            if type(mv) is int:
                err.code = R_NOT_BYTES if mv == -1 else R_NOT_CONTIGUOUS
                if mv == -1:
                    bad_types[i] = type(obj).__name__
                bad = 1
            else:
                with mv:
                    pb = PyMemoryView_GET_BUFFER(mv)
                    bad = parse_one(specs, nf, <const uint8_t*>pb.buf, pb.len,
                                    sc.cols, row, sc.seen, gen, &err)
                    if not bad and sc.n_str:
                        sc.emit_strings(<const uint8_t*>pb.buf, row)
            obj = mv = None
            if _seq_fast_size(seq) != n:
                raise RuntimeError("payloads changed size during decode")
            items = _seq_fast_items(seq)
        if bad:
            sc.add_reject(&err, i)
        else:
            src[row] = i
            row += 1
    return row


cdef Py_ssize_t _collect_chunk(PyObject* seq, Py_ssize_t i0, Py_ssize_t n, _Scratch sc,
                               dict bad_types) except -1:
    """Pin payloads ``i0, i0+1, ...`` for a GIL-free parse: record pointer and
    length in ``sc.cptrs`` / ``sc.clens`` and hold a reference until
    ``sc.unpin()``.  Only immutable ``bytes`` are pinned: any other buffer is
    copied to ``bytes`` first, so no other thread can change a payload while
    we parse it.  Stops after ``sc.chunk_cap`` payloads or about
    ``_NOGIL_CHUNK_BYTES`` bytes.  Returns the index of the first payload not
    collected."""
    cdef Py_ssize_t i = i0, k = 0, nbytes = 0, max_bytes = _NOGIL_CHUNK_BYTES
    cdef PyObject** items = _seq_fast_items(seq)
    cdef PyObject* item
    cdef PyObject* ahead
    cdef object copy
    while i < n and k < sc.chunk_cap and nbytes < max_bytes:
        if i + 8 < n:
            ahead = items[i + 8]
            _prefetch(ahead)
            _prefetch(<char*>ahead + 64)
        item = items[i]
        if _is_bytes(item):
            _incref(item)
            sc.crefs[k] = item
            sc.n_pinned = k + 1
            sc.cptrs[k] = <const uint8_t*>_bytes_data(item)
            sc.clens[k] = _bytes_len(item)
        else:
            # Slow path: memoryview() may run arbitrary code, so re-read the
            # sequence afterwards.
            sc.crefs[k] = NULL
            sc.n_pinned = k + 1
            obj = <object>item
            mv = _payload_view(obj)
            if type(mv) is int:
                if mv == -1:
                    bad_types[i] = type(obj).__name__
                sc.cptrs[k] = NULL
                sc.clens[k] = mv
            else:
                with mv:
                    copy = mv.tobytes()
                _incref(<PyObject*>copy)
                sc.crefs[k] = <PyObject*>copy
                sc.cptrs[k] = <const uint8_t*>_bytes_data(<PyObject*>copy)
                sc.clens[k] = _bytes_len(<PyObject*>copy)
                copy = None
            obj = mv = None
            if _seq_fast_size(seq) != n:
                raise RuntimeError("payloads changed size during decode")
            items = _seq_fast_items(seq)
        if sc.clens[k] > 0:
            nbytes += sc.clens[k]
        nbytes += 64                          # the object itself
        i += 1
        k += 1
    return i


def decode_msgpack_maps(payloads, Schema schema not None, *, release_gil=None):
    """Decode a batch of msgpack-map payloads into typed columns.

    ``payloads`` is a sequence of bytes-like objects (``bytes``,
    ``memoryview``, ``bytearray``, any C-contiguous buffer).  Bad payloads
    (including non-bytes items) never raise: they are listed in
    ``DecodedBatch.rejects`` with a reason, and every other row is exact.

    ``release_gil``: ``False`` parses in one pass straight from the payload
    objects with the GIL held (fastest single-threaded).  ``True`` works in
    chunks: pin the chunk's payloads (GIL held), parse them with the GIL
    released so other threads run meanwhile, build their strings (GIL
    held); about 1.3-1.5x the CPU time of ``False``.  ``None`` (default)
    releases it for batches of at least ``_NOGIL_MIN_PAYLOADS`` payloads.
    Results are identical either way.
    """
    schema._check()
    if isinstance(payloads, (bytes, bytearray, memoryview, str)):
        raise TypeError("payloads must be a sequence of bytes-like objects, "
                        f"not a single {type(payloads).__name__}")
    cdef Py_ssize_t nf = schema.nfields
    cdef tuple fields = schema._fields
    cdef const FieldSpec* specs = schema.specs
    cdef _Scratch sc = _Scratch(nf)
    cdef Py_ssize_t i, i1, r, row0, f, n_rows
    cdef int rc
    cdef ParseState st
    cdef int kind
    cdef int64_t* src
    cdef dict bad_types = {}
    cdef PyObject* seq = _seq_fast(payloads, "payloads must be a sequence of bytes-like objects")
    cdef Py_ssize_t n = _seq_fast_size(seq)
    cdef bint nogil_mode
    if release_gil is None:
        nogil_mode = n >= _NOGIL_MIN_PAYLOADS
    else:
        nogil_mode = bool(release_gil)
    try:
        # ---- output buffers
        col_arrays = []
        valid_arrays = []
        for f in range(nf):
            kind = specs[f].kind
            if kind == K_INT64:
                arr = np.empty(n, dtype=np.int64)
            elif kind == K_FLOAT64:
                arr = np.empty(n, dtype=np.float64)
            elif kind == K_BOOL:
                arr = np.empty(n, dtype=np.bool_)
            else:
                # (offset, length) per row; the GIL-holding pass builds each
                # row's strings at once and needs just one pair
                arr = np.empty(2 * n if nogil_mode else 2, dtype=np.int64)
            col_arrays.append(arr)
            sc.cols[f].data = <char*>cnp.PyArray_DATA(<cnp.ndarray>arr)
            sc.cols[f].str_step = 2 if nogil_mode else 0
            if specs[f].required:
                valid_arrays.append(None)
                sc.cols[f].valid = NULL
            else:
                varr = np.empty(n, dtype=np.bool_)
                valid_arrays.append(varr)
                sc.cols[f].valid = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>varr)
        source_index = np.empty(n, dtype=np.int64)
        src = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>source_index)

        str_arrays = {}
        for f in range(nf):
            if specs[f].kind == K_STRING:
                out = np.empty(n, dtype=object)           # None-filled
                str_arrays[f] = out
                sc.str_fields[sc.n_str] = <int>f
                sc.str_slots[sc.n_str] = <PyObject**>cnp.PyArray_DATA(<cnp.ndarray>out)
                sc.n_str += 1

        if not nogil_mode:
            n_rows = _decode_holding_gil(seq, n, specs, nf, sc, src, bad_types)
        else:
            # Chunks: pin payloads and note their buffers (GIL held), parse
            # them (GIL released), build their strings and unpin (GIL held).
            # Pinning touches each object once, like the parse itself, and a
            # bounded chunk is still cache-warm when it is unpinned.
            sc.alloc_chunk(max(1, min(n, <Py_ssize_t>_NOGIL_CHUNK_PAYLOADS)))
            memset(sc.seen, 0, nf * sizeof(uint32_t))
            st.row = 0
            st.gen = 0
            i = 0
            while i < n:
                i1 = _collect_chunk(seq, i, n, sc, bad_types)
                row0 = st.row
                with nogil:
                    rc = parse_chunk(specs, nf, sc.cptrs, sc.clens, i, i1 - i,
                                     sc.cols, src, sc.seen, &sc.rl, &st)
                if rc < 0:
                    raise MemoryError()
                for r in range(row0, st.row):
                    sc.emit_strings(sc.cptrs[src[r] - i], r)
                sc.unpin()
                i = i1
            n_rows = st.row
    finally:
        Py_DECREF(seq)

    # ---- python objects
    rejects = [(sc.rl.items[r].index, _reason(&sc.rl.items[r], fields, bad_types))
               for r in range(sc.rl.n)]
    columns = {}
    valid = {}
    for f in range(nf):
        name = fields[f][0]
        if specs[f].kind == K_STRING:
            arr = str_arrays[f]
        else:
            arr = col_arrays[f]
        if n_rows < len(arr):
            arr.resize(n_rows, refcheck=False)     # we are the sole owner
        columns[name] = arr
        varr = valid_arrays[f]
        if varr is not None:
            if n_rows < n:
                varr.resize(n_rows, refcheck=False)
            valid[name] = varr
    if n_rows < n:
        source_index.resize(n_rows, refcheck=False)

    cdef DecodedBatch batch = DecodedBatch.__new__(DecodedBatch)
    batch.n_rows = n_rows
    batch.columns = columns
    batch.valid = valid
    batch.source_index = source_index
    batch.rejects = rejects
    return batch
