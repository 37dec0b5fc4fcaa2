# cython: language_level=3
"""Key routing: the partition a producer sends an entity's events to.

State is sharded by partition, so the service checks every event against the
partition its key routes to, by the scheme its source declares
(``Source.routing``): a whole key column per batch, in C. A key's partition
key string is ``str(key)`` (an integer's decimal form); the schemes are
Pulsar's (see ``core/includes/tally_routing.h`` for the formulas):

* ``murmur3`` -- ``Murmur3_32Hash`` (Tally's own producers; Java, C++ and Go
  clients with ``hashingScheme=Murmur3_32Hash``);
* ``java_string_hash`` -- ``JavaStringHash``, the Java client's default
  (``String.hashCode`` over UTF-16 code units);
* ``go_java_string_hash`` -- the Go client's default, which hashes UTF-8
  bytes and keeps bit 31: the same partitions as ``java_string_hash`` for
  ASCII keys on a power-of-two partition count, else not.

The C++ client's default (and so the Python and Node.js clients'),
``BoostHash``, is ``boost::hash`` of the key, whose value depends on the Boost
version the client was built with: no other program can compute it, so no
source may declare it (:func:`routing_code` says what to use instead).
"""
import numpy as np
import pyarrow as pa

cimport numpy as cnp
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint32_t

from tally.core.types import ROUTINGS

cnp.import_array()

cdef extern from "tally_routing.h":
    uint32_t tally_key_hash(const unsigned char* key, size_t length, int routing) noexcept nogil
    uint32_t tally_murmur3_32(const unsigned char* data, size_t length) noexcept nogil
    unsigned char* tally_decimal(int64_t value, unsigned char* buf) noexcept nogil

UNREPRODUCIBLE = {
    "boost_hash": "BoostHash (the C++, Python and Node.js clients' default) is boost::hash "
                  "of the key, which depends on the Boost build of the client and cannot "
                  "be computed by anyone else",
}


def routing_code(routing):
    """The scheme's code in tally_routing.h; ValueError naming what to do for
    an unknown or unreproducible scheme."""
    name = str(routing).lower()
    if name in ("boosthash", "boost"):
        name = "boost_hash"
    if name in UNREPRODUCIBLE:
        raise ValueError(f"routing {routing!r} cannot be checked: {UNREPRODUCIBLE[name]}; "
                         "configure the producers with hashingScheme Murmur3_32Hash "
                         "(routing 'murmur3') or JavaStringHash ('java_string_hash')")
    if routing not in ROUTINGS:
        raise ValueError(f"routing {routing!r} is not a key routing Tally knows; use one of "
                         f"{', '.join(ROUTINGS)}")
    return ROUTINGS.index(routing)


def key_hashes(keys, routing="murmur3"):
    """The hash each key's partition is computed from (uint32 array: what the
    client's router takes modulo the partition count). ``keys``: a numpy array
    of integers or of ``str``, a list, or a pyarrow integer or string array,
    without nulls."""
    cdef int code = routing_code(routing)
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if isinstance(keys, pa.Array):
        return _arrow_hashes(keys, code)
    if not isinstance(keys, np.ndarray):
        keys = np.asarray(keys)
    out = np.empty(len(keys), np.uint32)
    if keys.dtype.kind in "iuf":          # a float column: integral keys of a table with nulls
        _int64_hashes(np.ascontiguousarray(keys, np.int64), code, out)
    elif keys.dtype.kind in "OU":
        _str_hashes(keys.astype(object, copy=False), code, out)
    else:
        raise TypeError(f"entity keys must be integers or strings, got {keys.dtype}")
    return out


def partitions_of(keys, n_partitions, routing="murmur3"):
    """The partition of every key of a column (int64 array; see :func:`key_hashes`)."""
    if not 1 <= n_partitions < 2 ** 31:
        raise ValueError(f"a topic has 1 to 2**31-1 partitions, not {n_partitions}")
    return (key_hashes(keys, routing) % np.uint32(n_partitions)).astype(np.int64)


def partition_of(key, n_partitions, routing="murmur3"):
    """The partition of one entity key."""
    keys = np.array([key], dtype=object if isinstance(key, str) else np.int64)
    return int(partitions_of(keys, n_partitions, routing)[0])


def murmur3_32(const unsigned char[::1] data):
    """MurmurHash3 x86 32-bit (seed 0) of bytes, unmasked: the hash Pulsar's
    Key_Shared subscriptions take modulo 65536."""
    if data.shape[0] == 0:
        return tally_murmur3_32(NULL, 0)
    return tally_murmur3_32(&data[0], data.shape[0])


cdef void _int64_hashes(const int64_t[::1] keys, int code, uint32_t[::1] out) noexcept nogil:
    cdef unsigned char buf[20]
    cdef unsigned char* start
    cdef Py_ssize_t i
    for i in range(keys.shape[0]):
        start = tally_decimal(keys[i], buf)
        out[i] = tally_key_hash(start, buf + 20 - start, code)


cdef int _str_hashes(object[:] keys, int code, uint32_t[::1] out) except -1:
    # A compact ASCII str hands out its own bytes: no copy, no allocation.
    cdef Py_ssize_t i, length
    cdef const char* data
    for i in range(keys.shape[0]):
        key = keys[i]
        if type(key) is not str:
            if key is None:
                raise ValueError("the key column has nulls; every event needs an entity key")
            key = str(key)
        data = PyUnicode_AsUTF8AndSize(key, &length)
        out[i] = tally_key_hash(<const unsigned char*>data, length, code)
    return 0


def _arrow_hashes(array, int code):
    if array.null_count:
        raise ValueError("the key column has nulls; every event needs an entity key")
    out = np.empty(len(array), np.uint32)
    if pa.types.is_integer(array.type):
        _int64_hashes(array.cast(pa.int64()).to_numpy(), code, out)
        return out
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise TypeError(f"entity keys must be integers or strings, got {array.type}")
    array = array.cast(pa.large_string())
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, len(array) + 1, array.offset * 8)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else None
    _utf8_hashes(offsets, data if data is not None and len(data) else np.zeros(1, np.uint8),
                 code, out)
    return out


cdef void _utf8_hashes(const int64_t[::1] offsets, const unsigned char[::1] data, int code,
                       uint32_t[::1] out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(out.shape[0]):
        out[i] = tally_key_hash(&data[0] + offsets[i], offsets[i + 1] - offsets[i], code)
