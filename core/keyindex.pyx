# cython: language_level=3
"""Key index: entity key -> dense slot, for int64 and string keys.

Slots are dense (0, 1, 2, ...) in order of first appearance, so every state
arena is a plain array indexed by slot. The table is open addressing with
linear probing at a load factor of at most 1/2; a batch reserves room for all
its keys before probing, so no growth happens inside the nogil loop.

Memory: an int64 index costs 16 bytes per bucket (2-4 buckets per key) plus
8 bytes per key for the reverse map, i.e. 40-72 bytes per key.
"""
from cpython.bytes cimport PyBytes_AsStringAndSize, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef struct CInt64Bucket:
    int64_t key
    int64_t slot            # -1 marks an empty bucket


cdef struct CStringBucket:
    uint64_t hash
    int64_t slot            # -1 marks an empty bucket


cdef extern from "tally_hash.h":
    uint64_t tally_hash_u64(uint64_t x) noexcept nogil
    uint64_t tally_hash_bytes(const char* data, size_t length) noexcept nogil
    void TALLY_PREFETCH(const void* p) noexcept nogil

# How far ahead the probe loop prefetches buckets: enough to cover a cache
# miss (~100 ns) with the ~5 ns of work per key.
cdef enum:
    PREFETCH_DISTANCE = 16
    MIN_CAPACITY = 1024


cdef uint64_t _capacity_for(int64_t n_keys):
    """The smallest power of two keeping the load factor at or below 1/2."""
    cdef uint64_t capacity = MIN_CAPACITY
    while capacity < <uint64_t>(2 * n_keys):
        capacity <<= 1
    return capacity


def _snapshot_arrays(arrays, names, table_key_count):
    """The named arrays of a key index snapshot, checked for presence and for a
    table whose occupied buckets hold each slot [0, n) exactly once."""
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ValueError(f"key index snapshot: missing arrays {missing}; "
                         f"expected {sorted(names)}, found {sorted(arrays)}")
    table = np.ascontiguousarray(arrays["table"], dtype=np.int64)
    slots_in_table = table[1::2]
    occupied = slots_in_table[slots_in_table != -1]
    n_keys = table_key_count(arrays)
    if not np.array_equal(np.sort(occupied), np.arange(n_keys)):
        raise ValueError(f"key index snapshot: the table's {len(occupied)} occupied buckets "
                         f"do not hold each of the {n_keys} slots exactly once")
    return table


cdef void* _checked_realloc(void* ptr, size_t size) except NULL:
    cdef void* grown = realloc(ptr, size if size > 0 else 1)
    if grown == NULL:
        raise MemoryError(f"key index: cannot allocate {size} bytes")
    return grown


cdef class Int64KeyIndex:
    """Entity key (int64) -> dense slot, by open addressing with linear probing."""
    cdef CInt64Bucket* table
    cdef uint64_t mask              # capacity - 1; capacity is a power of two
    cdef int64_t* slot_keys         # slot -> key, for writing results back out
    cdef int64_t n_slots
    cdef int64_t keys_capacity

    def __cinit__(self, int64_t expected_keys=0):
        self.table = NULL
        self.slot_keys = NULL
        self.n_slots = 0
        self.keys_capacity = 0
        self._rehash(_capacity_for(expected_keys))

    def __dealloc__(self):
        free(self.table)
        free(self.slot_keys)

    def __len__(self):
        return self.n_slots

    @property
    def capacity(self):
        return self.mask + 1

    @property
    def nbytes(self):
        return (self.mask + 1) * sizeof(CInt64Bucket) + self.keys_capacity * sizeof(int64_t)

    cdef void _reserve(self, int64_t n_total) except *:
        if <uint64_t>(2 * n_total) > self.mask + 1:
            self._rehash(_capacity_for(n_total))
        if n_total > self.keys_capacity:
            self.keys_capacity = max(n_total, 2 * self.keys_capacity, MIN_CAPACITY)
            self.slot_keys = <int64_t*>_checked_realloc(
                self.slot_keys, self.keys_capacity * sizeof(int64_t))

    cdef void _rehash(self, uint64_t capacity) except *:
        cdef CInt64Bucket* table = <CInt64Bucket*>malloc(capacity * sizeof(CInt64Bucket))
        if table == NULL:
            raise MemoryError(f"key index: cannot allocate {capacity} buckets")
        # 0xff bytes make every slot -1, i.e. empty.
        memset(table, 0xff, capacity * sizeof(CInt64Bucket))
        free(self.table)
        self.table = table
        self.mask = capacity - 1
        cdef int64_t slot
        cdef uint64_t i
        with nogil:
            for slot in range(self.n_slots):
                i = tally_hash_u64(<uint64_t>self.slot_keys[slot]) & self.mask
                while self.table[i].slot != -1:
                    i = (i + 1) & self.mask
                self.table[i].key = self.slot_keys[slot]
                self.table[i].slot = slot

    cdef int64_t _find_or_insert(self, int64_t key, uint64_t h, bint insert) noexcept nogil:
        cdef uint64_t i = h & self.mask
        while True:
            if self.table[i].slot == -1:
                if not insert:
                    return -1
                self.table[i].key = key
                self.table[i].slot = self.n_slots
                self.slot_keys[self.n_slots] = key
                self.n_slots += 1
                return self.table[i].slot
            if self.table[i].key == key:
                return self.table[i].slot
            i = (i + 1) & self.mask

    def slots(self, keys, bint insert=True):
        """Slots of ``keys`` (int64 array); new keys get new slots unless
        ``insert`` is false, in which case unknown keys map to -1."""
        cdef const int64_t[::1] k = np.ascontiguousarray(keys, dtype=np.int64)
        cdef Py_ssize_t n = k.shape[0]
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] o = out
        if n == 0:
            return out
        cdef uint64_t* hashes = <uint64_t*>malloc(n * sizeof(uint64_t))
        if hashes == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        cdef int64_t misses = 0
        with nogil:
            for i in range(n):
                hashes[i] = tally_hash_u64(<uint64_t>k[i])
            for i in range(n):
                if i + PREFETCH_DISTANCE < n:
                    TALLY_PREFETCH(&self.table[hashes[i + PREFETCH_DISTANCE] & self.mask])
                o[i] = self._find_or_insert(k[i], hashes[i], False)
                if o[i] < 0:
                    misses += 1
        if insert and misses:
            # Grow for the keys actually missing, then insert them in order of
            # first appearance (a key repeated in the batch finds its new slot).
            try:
                self._reserve(self.n_slots + misses)
            except MemoryError:
                free(hashes)
                raise
            with nogil:
                for i in range(n):
                    if o[i] < 0:
                        o[i] = self._find_or_insert(k[i], hashes[i], True)
        free(hashes)
        return out

    def lookup(self, keys):
        """Slots of existing keys; -1 for keys never seen."""
        return self.slots(keys, insert=False)

    def keys_of(self, slots):
        """The keys of the given slots, as an int64 array."""
        cdef const int64_t[::1] s = np.ascontiguousarray(slots, dtype=np.int64)
        out = np.empty(s.shape[0], dtype=np.int64)
        cdef int64_t[::1] o = out
        cdef Py_ssize_t i
        for i in range(s.shape[0]):
            if s[i] < 0 or s[i] >= self.n_slots:
                raise IndexError(f"slot {s[i]} out of range [0, {self.n_slots})")
            o[i] = self.slot_keys[s[i]]
        return out

    def all_keys(self):
        """Every key, in slot order."""
        return np.asarray(<int64_t[:self.n_slots]>self.slot_keys).copy() \
            if self.n_slots else np.empty(0, dtype=np.int64)

    def export_arrays(self):
        """Arrays for a snapshot: the keys in slot order and the raw table."""
        table = np.empty(2 * (self.mask + 1), dtype=np.int64)
        cdef int64_t[::1] t = table
        memcpy(&t[0], self.table, (self.mask + 1) * sizeof(CInt64Bucket))
        return {"keys": self.all_keys(), "table": table}

    @classmethod
    def from_arrays(cls, arrays):
        """Restore from ``export_arrays`` output: two bulk copies, no per-key work."""
        cdef const int64_t[::1] table = _snapshot_arrays(
            arrays, ("keys", "table"), lambda a: len(a["keys"]))
        cdef const int64_t[::1] keys = np.ascontiguousarray(arrays["keys"], dtype=np.int64)
        buckets = np.asarray(table).reshape(-1, 2)
        used = buckets[buckets[:, 1] != -1]
        if not np.array_equal(np.asarray(keys)[used[:, 1]], used[:, 0]):
            raise ValueError("key index snapshot: the table's keys differ from the slots' keys")
        cdef uint64_t capacity = table.shape[0] // 2
        if capacity < MIN_CAPACITY or capacity & (capacity - 1) or <uint64_t>keys.shape[0] * 2 > capacity:
            raise ValueError("key index snapshot: table size is inconsistent with its keys")
        cdef Int64KeyIndex index = cls()
        index._reserve(keys.shape[0])
        free(index.table)
        index.table = <CInt64Bucket*>malloc(capacity * sizeof(CInt64Bucket))
        if index.table == NULL:
            raise MemoryError()
        index.mask = capacity - 1
        memcpy(index.table, &table[0], capacity * sizeof(CInt64Bucket))
        if keys.shape[0]:
            memcpy(index.slot_keys, &keys[0], keys.shape[0] * sizeof(int64_t))
        index.n_slots = keys.shape[0]
        return index


cdef class StringKeyIndex:
    """Entity key (UTF-8 string) -> dense slot; key bytes live in one growing blob."""
    cdef CStringBucket* table
    cdef uint64_t mask
    cdef char* blob                 # key bytes of every slot, back to back
    cdef int64_t blob_size
    cdef int64_t blob_capacity
    cdef int64_t* offsets           # slot i's bytes are blob[offsets[i]:offsets[i+1]]
    cdef int64_t n_slots
    cdef int64_t keys_capacity

    def __cinit__(self, int64_t expected_keys=0):
        self.table = NULL
        self.blob = NULL
        self.offsets = NULL
        self.blob_size = 0
        self.blob_capacity = 0
        self.n_slots = 0
        self.keys_capacity = 0
        self._reserve(expected_keys, 0)
        self._rehash(_capacity_for(expected_keys))

    def __dealloc__(self):
        free(self.table)
        free(self.blob)
        free(self.offsets)

    def __len__(self):
        return self.n_slots

    @property
    def nbytes(self):
        return ((self.mask + 1) * sizeof(CStringBucket) + self.blob_capacity
                + (self.keys_capacity + 1) * sizeof(int64_t))

    cdef void _reserve(self, int64_t n_total, int64_t extra_bytes) except *:
        if self.table != NULL and <uint64_t>(2 * n_total) > self.mask + 1:
            self._rehash(_capacity_for(n_total))
        if n_total > self.keys_capacity or self.offsets == NULL:
            self.keys_capacity = max(n_total, 2 * self.keys_capacity, MIN_CAPACITY)
            self.offsets = <int64_t*>_checked_realloc(
                self.offsets, (self.keys_capacity + 1) * sizeof(int64_t))
            self.offsets[self.n_slots] = self.blob_size
        if self.blob_size + extra_bytes > self.blob_capacity or self.blob == NULL:
            self.blob_capacity = max(self.blob_size + extra_bytes, 2 * self.blob_capacity, 4096)
            self.blob = <char*>_checked_realloc(self.blob, self.blob_capacity)

    cdef void _rehash(self, uint64_t capacity) except *:
        cdef CStringBucket* table = <CStringBucket*>malloc(capacity * sizeof(CStringBucket))
        if table == NULL:
            raise MemoryError(f"key index: cannot allocate {capacity} buckets")
        memset(table, 0xff, capacity * sizeof(CStringBucket))
        free(self.table)
        self.table = table
        self.mask = capacity - 1
        cdef int64_t slot
        cdef uint64_t h, i
        with nogil:
            for slot in range(self.n_slots):
                h = tally_hash_bytes(self.blob + self.offsets[slot],
                                     self.offsets[slot + 1] - self.offsets[slot])
                i = h & self.mask
                while self.table[i].slot != -1:
                    i = (i + 1) & self.mask
                self.table[i].hash = h
                self.table[i].slot = slot

    cdef int64_t _find_or_insert(self, const char* key, int64_t length, uint64_t h,
                                 bint insert) noexcept nogil:
        cdef uint64_t i = h & self.mask
        cdef int64_t slot, start
        while True:
            slot = self.table[i].slot
            if slot == -1:
                if not insert:
                    return -1
                slot = self.n_slots
                start = self.offsets[slot]
                memcpy(self.blob + start, key, length)
                self.offsets[slot + 1] = start + length
                self.blob_size = start + length
                self.table[i].hash = h
                self.table[i].slot = slot
                self.n_slots += 1
                return slot
            if (self.table[i].hash == h
                    and self.offsets[slot + 1] - self.offsets[slot] == length
                    and memcmp(self.blob + self.offsets[slot], key, length) == 0):
                return slot
            i = (i + 1) & self.mask

    def slots(self, keys, bint insert=True):
        """Slots of ``keys`` (a sequence of str or bytes); see Int64KeyIndex.slots."""
        keys = list(keys)     # keeps every str alive while we hold its UTF-8 pointer
        cdef Py_ssize_t n = len(keys)
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] o = out
        if n == 0:
            return out
        cdef const char** ptrs = <const char**>malloc(n * sizeof(char*))
        cdef int64_t* lengths = <int64_t*>malloc(n * sizeof(int64_t))
        cdef uint64_t* hashes = <uint64_t*>malloc(n * sizeof(uint64_t))
        if ptrs == NULL or lengths == NULL or hashes == NULL:
            free(ptrs); free(lengths); free(hashes)
            raise MemoryError()
        cdef Py_ssize_t i, length
        cdef int64_t misses = 0, missing_bytes = 0
        cdef char* data
        try:
            for i in range(n):
                key = keys[i]
                if isinstance(key, str):
                    ptrs[i] = PyUnicode_AsUTF8AndSize(key, &length)
                elif isinstance(key, bytes):
                    key.decode()    # keys must be UTF-8: keys_of hands them back as str
                    PyBytes_AsStringAndSize(key, &data, &length)
                    ptrs[i] = data
                else:
                    raise TypeError(f"string key index: key {key!r} is {type(key).__name__}, "
                                    "expected str or bytes")
                lengths[i] = length
            with nogil:
                for i in range(n):
                    hashes[i] = tally_hash_bytes(ptrs[i], lengths[i])
                for i in range(n):
                    if i + PREFETCH_DISTANCE < n:
                        TALLY_PREFETCH(&self.table[hashes[i + PREFETCH_DISTANCE] & self.mask])
                    o[i] = self._find_or_insert(ptrs[i], lengths[i], hashes[i], False)
                    if o[i] < 0:
                        misses += 1
                        missing_bytes += lengths[i]
            if insert and misses:
                self._reserve(self.n_slots + misses, missing_bytes)
                with nogil:
                    for i in range(n):
                        if o[i] < 0:
                            o[i] = self._find_or_insert(ptrs[i], lengths[i], hashes[i], True)
        finally:
            free(ptrs); free(lengths); free(hashes)
        return out

    def lookup(self, keys):
        return self.slots(keys, insert=False)

    def keys_of(self, slots):
        """The keys of the given slots, as a list of str."""
        out = []
        cdef int64_t s
        for s in np.asarray(slots, dtype=np.int64):
            if s < 0 or s >= self.n_slots:
                raise IndexError(f"slot {s} out of range [0, {self.n_slots})")
            out.append(PyBytes_FromStringAndSize(
                self.blob + self.offsets[s], self.offsets[s + 1] - self.offsets[s]).decode())
        return out

    def all_keys(self):
        return self.keys_of(np.arange(self.n_slots))

    def export_arrays(self):
        blob = np.empty(self.blob_size, dtype=np.uint8)
        offsets = np.empty(self.n_slots + 1, dtype=np.int64)
        table = np.empty(2 * (self.mask + 1), dtype=np.int64)
        cdef unsigned char[::1] b = blob
        cdef int64_t[::1] off = offsets
        cdef int64_t[::1] t = table
        if self.blob_size:
            memcpy(&b[0], self.blob, self.blob_size)
        memcpy(&off[0], self.offsets, (self.n_slots + 1) * sizeof(int64_t))
        memcpy(&t[0], self.table, (self.mask + 1) * sizeof(CStringBucket))
        return {"blob": blob, "offsets": offsets, "table": table}

    @classmethod
    def from_arrays(cls, arrays):
        cdef const int64_t[::1] table = _snapshot_arrays(
            arrays, ("blob", "offsets", "table"), lambda a: len(a["offsets"]) - 1)
        cdef const unsigned char[::1] blob = np.ascontiguousarray(arrays["blob"], dtype=np.uint8)
        cdef const int64_t[::1] offsets = np.ascontiguousarray(arrays["offsets"], dtype=np.int64)
        cdef int64_t n = offsets.shape[0] - 1
        cdef uint64_t capacity = table.shape[0] // 2
        if (n < 0 or capacity < MIN_CAPACITY or capacity & (capacity - 1)
                or <uint64_t>n * 2 > capacity or offsets[0] != 0 or offsets[n] != blob.shape[0]
                or np.any(np.diff(np.asarray(offsets)) < 0)):
            raise ValueError("key index snapshot: arrays are inconsistent")
        cdef int64_t b, slot
        for b in range(capacity):
            slot = table[2 * b + 1]
            if slot != -1 and <uint64_t>table[2 * b] != tally_hash_bytes(
                    <const char*>&blob[0] + offsets[slot] if blob.shape[0] else NULL,
                    offsets[slot + 1] - offsets[slot]):
                raise ValueError("key index snapshot: a key's bytes do not match the "
                                 "hash the table stores for it")
        cdef StringKeyIndex index = cls()
        index._reserve(n, blob.shape[0])
        free(index.table)
        index.table = <CStringBucket*>malloc(capacity * sizeof(CStringBucket))
        if index.table == NULL:
            raise MemoryError()
        index.mask = capacity - 1
        memcpy(index.table, &table[0], capacity * sizeof(CStringBucket))
        memcpy(index.offsets, &offsets[0], (n + 1) * sizeof(int64_t))
        if blob.shape[0]:
            memcpy(index.blob, &blob[0], blob.shape[0])
        index.blob_size = blob.shape[0]
        index.n_slots = n
        return index
