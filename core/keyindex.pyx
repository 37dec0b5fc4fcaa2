# cython: language_level=3
"""Key index: entity key -> dense slot, for int64 and string keys.

Slots are dense (0, 1, 2, ...) in order of first appearance, so every state
arena is a plain array indexed by slot. Each index keeps its keys in slot
order (int64: a key column; string: a blob and offsets), which is what
keys_of reads. The table (tally_keytable.h) maps 38 bits of a key's hash to
candidate slots in 8-byte buckets kept 54-75% full; a candidate is confirmed
against the slot's key.

A batch resolves in passes over all its keys -- hash, find candidates
(prefetching buckets), confirm them (prefetching the candidates' keys), then
insert the missing ones after reserving room for all of them -- so no growth
happens inside a nogil loop.

Memory: an int64 index costs 10.7-14.9 bytes of table per key plus 8-9 of
key column (grown by an eighth at a time); a string index the same table plus
8-10 bytes of offsets (grown 1.25x at a time) plus its key bytes (slack up to
a quarter).

Snapshots hold the keys only; restoring rebuilds the table from them.
Snapshots written before this table also hold the old one ("table"), which is
checked against the keys and otherwise not used.
"""
from cpython.bytes cimport PyBytes_AsStringAndSize, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy

import numpy as np
cimport numpy as cnp

cnp.import_array()


cdef extern from "tally_hash.h":
    uint64_t tally_hash_u64(uint64_t x) noexcept nogil
    uint64_t tally_hash_bytes(const char* data, size_t length) noexcept nogil
    void TALLY_PREFETCH(const void* p) noexcept nogil


cdef extern from "tally_keytable.h":
    ctypedef struct tally_bucket:
        uint32_t tag
        uint32_t slot
    ctypedef struct tally_segment:
        tally_bucket* buckets
    ctypedef struct tally_keytable:
        pass
    uint32_t TALLY_EMPTY_SLOT
    tally_segment* tally_segment_of(tally_keytable* t, uint64_t hash) noexcept nogil
    void tally_prefetch(tally_keytable* t, uint64_t hash) noexcept nogil
    uint32_t tally_tag(uint64_t hash) noexcept nogil
    uint64_t tally_seek(const tally_segment* s, uint32_t tag) noexcept nogil
    bint tally_holds(const tally_segment* s, uint64_t i, uint32_t tag) noexcept nogil
    int tally_insert_at(tally_segment* s, uint64_t i, uint32_t tag, uint32_t slot) noexcept nogil
    int tally_keytable_reserve_hashes(tally_keytable* t, const uint64_t* hashes,
                                      const int64_t* idx, int64_t m) noexcept nogil
    int tally_keytable_init(tally_keytable* t, uint64_t expected) noexcept nogil
    void tally_keytable_free(tally_keytable* t) noexcept nogil
    uint64_t tally_keytable_buckets(const tally_keytable* t) noexcept nogil
    void* tally_column_resize(void* column, size_t old_bytes, size_t new_bytes) noexcept nogil
    void tally_column_free(void* column, size_t bytes) noexcept nogil


# How far ahead the probe loops prefetch. A lookup makes two dependent reads
# that miss the cache at 10M keys (its bucket, then its candidate's key), and
# the core keeps many misses in flight: 128 keys ahead beat 16, 32 and 64
# (bench/RESULTS.md, "Key index memory (#18)").
cdef enum:
    PREFETCH_DISTANCE = 128
    MIN_KEYS = 1024
    INSERT_FAILED = -2          # _find_or_insert: malloc failed growing a segment's tail

# A slot must fit a bucket's 32 bits, UINT32_MAX being the empty mark.
MAX_SLOTS = 0xFFFFFFFF


cdef void _check_slots(int64_t needed) except *:
    if needed > MAX_SLOTS:
        raise OverflowError(f"key index: {needed} keys, at most {MAX_SLOTS} fit")


cdef int64_t _grown(int64_t needed, int64_t capacity, int64_t slack_divisor) except -1:
    """A column's new capacity: grown by 1/slack_divisor at a time, so its
    slack stays within that (a big column is remapped, not copied, so growing
    often is cheap)."""
    return max(needed, capacity + capacity // slack_divisor, MIN_KEYS)


cdef void* _checked_realloc(void* ptr, size_t size) except NULL:
    cdef void* grown = realloc(ptr, size if size > 0 else 1)
    if grown == NULL:
        raise MemoryError(f"key index: cannot allocate {size} bytes")
    return grown


cdef class _Table:
    """The bucket table and the per-batch bookkeeping both indexes share."""
    cdef tally_keytable table
    cdef int64_t n_slots

    def __cinit__(self, int64_t expected_keys=0):
        self.n_slots = 0
        if tally_keytable_init(&self.table, max(expected_keys, 0)):
            raise MemoryError("key index: cannot allocate its table")

    def __dealloc__(self):
        tally_keytable_free(&self.table)

    def __len__(self):
        return self.n_slots

    @property
    def capacity(self):
        """Buckets allocated."""
        return tally_keytable_buckets(&self.table)

    cdef void _reserve_buckets(self, const uint64_t* hashes, const int64_t* missing,
                               int64_t m) except *:
        if tally_keytable_reserve_hashes(&self.table, hashes, missing, m):
            raise MemoryError("key index: cannot grow its table")


cdef inline int64_t _candidate(tally_keytable* t, uint64_t h) noexcept nogil:
    """The slot of the first entry with h's tag, or -1 if there is none."""
    cdef tally_segment* s = tally_segment_of(t, h)
    cdef uint32_t tag = tally_tag(h)
    cdef uint64_t i = tally_seek(s, tag)
    return s.buckets[i].slot if tally_holds(s, i, tag) else -1


cdef inline void _candidates(tally_keytable* table, const uint64_t* hashes, Py_ssize_t n,
                             int64_t* out) noexcept nogil:
    """Each hash's first candidate slot (-1: none), the table prefetched ahead."""
    cdef Py_ssize_t i
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            tally_prefetch(table, hashes[i + PREFETCH_DISTANCE])
        out[i] = _candidate(table, hashes[i])


def _check_legacy_table(arrays, int64_t n_keys):
    """An old snapshot's table (16-byte buckets: key or hash, then slot; -1 empty)
    must hold each slot [0, n) exactly once; returns its occupied buckets."""
    table = np.ascontiguousarray(arrays["table"], dtype=np.int64)
    if len(table) % 2:
        raise ValueError("key index snapshot: the table has an odd length")
    buckets = table.reshape(-1, 2)
    used = buckets[buckets[:, 1] != -1]
    if not np.array_equal(np.sort(used[:, 1]), np.arange(n_keys)):
        raise ValueError(f"key index snapshot: the table's {len(used)} occupied buckets "
                         f"do not hold each of the {n_keys} slots exactly once")
    return used


def _require(arrays, names):
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ValueError(f"key index snapshot: missing arrays {missing}; "
                         f"expected {sorted(names)}, found {sorted(arrays)}")


cdef class Int64KeyIndex(_Table):
    """Entity key (int64) -> dense slot; the keys live in a slot -> key column."""
    cdef int64_t* keys              # slot -> key
    cdef int64_t keys_capacity

    def __cinit__(self, int64_t expected_keys=0):
        self.keys = NULL
        self.keys_capacity = 0
        self._reserve_keys(expected_keys)

    def __dealloc__(self):
        tally_column_free(self.keys, self.keys_capacity * sizeof(int64_t))

    @property
    def nbytes(self):
        return self.capacity * sizeof(tally_bucket) + self.keys_capacity * sizeof(int64_t)

    cdef void _reserve_keys(self, int64_t n_total) except *:
        _check_slots(n_total)
        if n_total <= self.keys_capacity and self.keys != NULL:
            return
        cdef int64_t capacity = _grown(n_total, self.keys_capacity, 8)
        cdef void* grown = tally_column_resize(self.keys, self.keys_capacity * sizeof(int64_t),
                                               capacity * sizeof(int64_t))
        if grown == NULL:
            raise MemoryError(f"key index: cannot allocate {capacity} keys")
        self.keys = <int64_t*>grown
        self.keys_capacity = capacity

    cdef inline int64_t _probe(self, int64_t key, uint64_t h, tally_segment** segment,
                               uint64_t* at) noexcept nogil:
        """The key's slot, or -1 with ``segment`` and ``at`` where it would go."""
        cdef tally_segment* s = tally_segment_of(&self.table, h)
        cdef uint32_t tag = tally_tag(h)
        cdef uint64_t i = tally_seek(s, tag)
        while tally_holds(s, i, tag):
            if self.keys[s.buckets[i].slot] == key:
                return s.buckets[i].slot
            i += 1
        segment[0], at[0] = s, i
        return -1

    cdef int64_t _find(self, int64_t key, uint64_t h) noexcept nogil:
        cdef tally_segment* s
        cdef uint64_t i
        return self._probe(key, h, &s, &i)

    cdef int64_t _find_or_insert(self, int64_t key, uint64_t h) noexcept nogil:
        cdef tally_segment* s
        cdef uint64_t i
        cdef int64_t slot = self._probe(key, h, &s, &i)
        if slot >= 0:
            return slot
        if tally_insert_at(s, i, tally_tag(h), <uint32_t>self.n_slots):
            return INSERT_FAILED
        self.keys[self.n_slots] = key
        self.n_slots += 1
        return self.n_slots - 1

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
        cdef int64_t* missing = <int64_t*>malloc(n * sizeof(int64_t))
        if hashes == NULL or missing == NULL:
            free(hashes); free(missing)
            raise MemoryError()
        cdef Py_ssize_t i, ahead
        cdef int64_t m = 0
        try:
            with nogil:
                for i in range(n):
                    hashes[i] = tally_hash_u64(<uint64_t>k[i])
                _candidates(&self.table, hashes, n, &o[0])
                for i in range(n):
                    ahead = i + PREFETCH_DISTANCE
                    if ahead < n and o[ahead] >= 0:
                        TALLY_PREFETCH(&self.keys[o[ahead]])
                    if o[i] >= 0 and self.keys[o[i]] != k[i]:
                        o[i] = self._find(k[i], hashes[i])
                    if o[i] < 0:
                        missing[m] = i
                        m += 1
            if insert and m:
                self._insert_missing(&k[0], hashes, missing, m, &o[0])
        finally:
            free(hashes); free(missing)
        return out

    cdef void _insert_missing(self, const int64_t* k, const uint64_t* hashes,
                              const int64_t* missing, int64_t m, int64_t* o) except *:
        """Room for the keys missing (a key repeated in the batch is counted
        twice), then insert them in order of first appearance: a repeat finds
        the slot its first occurrence got."""
        self._reserve_keys(self.n_slots + m)
        self._reserve_buckets(hashes, missing, m)
        cdef int64_t i, j
        cdef bint failed = False
        with nogil:
            for j in range(m):
                if j + PREFETCH_DISTANCE < m:
                    tally_prefetch(&self.table, hashes[missing[j + PREFETCH_DISTANCE]])
                i = missing[j]
                o[i] = self._find_or_insert(k[i], hashes[i])
                if o[i] == INSERT_FAILED:
                    failed = True
                    break
        if failed:
            raise MemoryError("key index: cannot grow its table")

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
            o[i] = self.keys[s[i]]
        return out

    def all_keys(self):
        """Every key, in slot order."""
        out = np.empty(self.n_slots, dtype=np.int64)
        cdef int64_t[::1] o = out
        if self.n_slots:
            memcpy(&o[0], self.keys, self.n_slots * sizeof(int64_t))
        return out

    def export_arrays(self):
        """Arrays for a snapshot: the keys in slot order."""
        return {"keys": self.all_keys()}

    @classmethod
    def from_arrays(cls, arrays):
        """Restore from ``export_arrays`` output (or an old snapshot's, which also
        has the old table): the table is rebuilt from the keys."""
        _require(arrays, ("keys",))
        keys = np.ascontiguousarray(arrays["keys"], dtype=np.int64)
        if "table" in arrays:
            used = _check_legacy_table(arrays, len(keys))
            if not np.array_equal(keys[used[:, 1]], used[:, 0]):
                raise ValueError("key index snapshot: the table's keys differ from the slots' keys")
        index = cls(len(keys))
        index.slots(keys)
        if len(index) != len(keys):
            raise ValueError(f"key index snapshot: {len(keys)} keys of which only "
                             f"{len(index)} are distinct")
        return index


cdef class StringKeyIndex(_Table):
    """Entity key (UTF-8 string) -> dense slot; key bytes live in one growing blob."""
    cdef char* blob                 # key bytes of every slot, back to back
    cdef int64_t blob_size
    cdef int64_t blob_capacity
    cdef int64_t* offsets           # slot i's bytes are blob[offsets[i]:offsets[i+1]]
    cdef int64_t keys_capacity

    def __cinit__(self, int64_t expected_keys=0):
        self.blob = NULL
        self.offsets = NULL
        self.blob_size = 0
        self.blob_capacity = 0
        self.keys_capacity = 0
        self._reserve_keys(expected_keys, 0)

    def __dealloc__(self):
        free(self.blob)
        free(self.offsets)

    @property
    def nbytes(self):
        return (self.capacity * sizeof(tally_bucket) + self.blob_capacity
                + (self.keys_capacity + 1) * sizeof(int64_t))

    cdef void _reserve_keys(self, int64_t n_total, int64_t extra_bytes) except *:
        _check_slots(n_total)
        if n_total > self.keys_capacity or self.offsets == NULL:
            self.keys_capacity = _grown(n_total, self.keys_capacity, 4)
            self.offsets = <int64_t*>_checked_realloc(
                self.offsets, (self.keys_capacity + 1) * sizeof(int64_t))
            self.offsets[self.n_slots] = self.blob_size
        if self.blob_size + extra_bytes > self.blob_capacity or self.blob == NULL:
            self.blob_capacity = max(self.blob_size + extra_bytes,
                                     self.blob_capacity + self.blob_capacity // 4, 4096)
            self.blob = <char*>_checked_realloc(self.blob, self.blob_capacity)

    cdef inline bint _is(self, int64_t slot, const char* key, int64_t length) noexcept nogil:
        return (self.offsets[slot + 1] - self.offsets[slot] == length
                and memcmp(self.blob + self.offsets[slot], key, length) == 0)

    cdef inline int64_t _probe(self, const char* key, int64_t length, uint64_t h,
                               tally_segment** segment, uint64_t* at) noexcept nogil:
        """The key's slot, or -1 with ``segment`` and ``at`` where it would go."""
        cdef tally_segment* s = tally_segment_of(&self.table, h)
        cdef uint32_t tag = tally_tag(h)
        cdef uint64_t i = tally_seek(s, tag)
        while tally_holds(s, i, tag):
            if self._is(s.buckets[i].slot, key, length):
                return s.buckets[i].slot
            i += 1
        segment[0], at[0] = s, i
        return -1

    cdef int64_t _find(self, const char* key, int64_t length, uint64_t h) noexcept nogil:
        cdef tally_segment* s
        cdef uint64_t i
        return self._probe(key, length, h, &s, &i)

    cdef int64_t _find_or_insert(self, const char* key, int64_t length,
                                 uint64_t h) noexcept nogil:
        cdef tally_segment* s
        cdef uint64_t i
        cdef int64_t slot = self._probe(key, length, h, &s, &i)
        if slot >= 0:
            return slot
        if tally_insert_at(s, i, tally_tag(h), <uint32_t>self.n_slots):
            return INSERT_FAILED
        cdef int64_t start = self.offsets[self.n_slots]
        memcpy(self.blob + start, key, length)
        self.offsets[self.n_slots + 1] = start + length
        self.blob_size = start + length
        self.n_slots += 1
        return self.n_slots - 1

    cdef void _resolve(self, const char** ptrs, const int64_t* lengths, Py_ssize_t n,
                       bint insert, int64_t* o) except *:
        """Slots of n keys given as UTF-8 pointers and lengths, into ``o``."""
        cdef uint64_t* hashes = <uint64_t*>malloc(n * sizeof(uint64_t))
        cdef int64_t* missing = <int64_t*>malloc(n * sizeof(int64_t))
        if hashes == NULL or missing == NULL:
            free(hashes); free(missing)
            raise MemoryError()
        cdef Py_ssize_t i, j, ahead
        cdef int64_t m = 0, missing_bytes = 0
        cdef bint failed = False
        try:
            with nogil:
                for i in range(n):
                    hashes[i] = tally_hash_bytes(ptrs[i], lengths[i])
                _candidates(&self.table, hashes, n, o)
                for i in range(n):
                    # a candidate's offsets, then (half as far ahead) its bytes
                    ahead = i + PREFETCH_DISTANCE
                    if ahead < n and o[ahead] >= 0:
                        TALLY_PREFETCH(&self.offsets[o[ahead]])
                    ahead = i + PREFETCH_DISTANCE // 2
                    if ahead < n and o[ahead] >= 0:
                        TALLY_PREFETCH(self.blob + self.offsets[o[ahead]])
                    if o[i] >= 0 and not self._is(o[i], ptrs[i], lengths[i]):
                        o[i] = self._find(ptrs[i], lengths[i], hashes[i])
                    if o[i] < 0:
                        missing[m] = i
                        m += 1
                        missing_bytes += lengths[i]
            if insert and m:
                self._reserve_keys(self.n_slots + m, missing_bytes)
                self._reserve_buckets(hashes, missing, m)
                with nogil:
                    for j in range(m):
                        if j + PREFETCH_DISTANCE < m:
                            tally_prefetch(&self.table, hashes[missing[j + PREFETCH_DISTANCE]])
                        i = missing[j]
                        o[i] = self._find_or_insert(ptrs[i], lengths[i], hashes[i])
                        if o[i] == INSERT_FAILED:
                            failed = True
                            break
                if failed:
                    raise MemoryError("key index: cannot grow its table")
        finally:
            free(hashes); free(missing)

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
        if ptrs == NULL or lengths == NULL:
            free(ptrs); free(lengths)
            raise MemoryError()
        cdef Py_ssize_t i, length
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
            self._resolve(ptrs, lengths, n, insert, &o[0])
        finally:
            free(ptrs); free(lengths)
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
        """Arrays for a snapshot: the key bytes and their offsets, in slot order."""
        blob = np.empty(self.blob_size, dtype=np.uint8)
        offsets = np.empty(self.n_slots + 1, dtype=np.int64)
        cdef unsigned char[::1] b = blob
        cdef int64_t[::1] off = offsets
        if self.blob_size:
            memcpy(&b[0], self.blob, self.blob_size)
        memcpy(&off[0], self.offsets, (self.n_slots + 1) * sizeof(int64_t))
        return {"blob": blob, "offsets": offsets}

    @classmethod
    def from_arrays(cls, arrays):
        """Restore from ``export_arrays`` output (or an old snapshot's, which also
        has the old table of key hashes): the table is rebuilt from the keys."""
        _require(arrays, ("blob", "offsets"))
        cdef const unsigned char[::1] blob = np.ascontiguousarray(arrays["blob"], dtype=np.uint8)
        cdef const int64_t[::1] offsets = np.ascontiguousarray(arrays["offsets"], dtype=np.int64)
        cdef int64_t n = offsets.shape[0] - 1
        if (n < 0 or offsets[0] != 0 or offsets[n] != blob.shape[0]
                or np.any(np.diff(np.asarray(offsets)) < 0)):
            raise ValueError("key index snapshot: arrays are inconsistent")
        cdef const char* base = <const char*>&blob[0] if blob.shape[0] else NULL
        if "table" in arrays:
            used = _check_legacy_table(arrays, n)
            for h, slot in used.tolist():
                if <uint64_t><int64_t>h != tally_hash_bytes(base + offsets[slot],
                                                   offsets[slot + 1] - offsets[slot]):
                    raise ValueError("key index snapshot: a key's bytes do not match the "
                                     "hash the table stores for it")
        cdef StringKeyIndex index = cls(n)
        if n == 0:
            return index
        cdef const char** ptrs = <const char**>malloc(n * sizeof(char*))
        cdef int64_t* lengths = <int64_t*>malloc(n * sizeof(int64_t))
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] o = out
        cdef int64_t i
        if ptrs == NULL or lengths == NULL:
            free(ptrs); free(lengths)
            raise MemoryError()
        try:
            for i in range(n):
                ptrs[i] = base + offsets[i]
                lengths[i] = offsets[i + 1] - offsets[i]
            index._resolve(ptrs, lengths, n, True, &o[0])
        finally:
            free(ptrs); free(lengths)
        if index.n_slots != n:
            raise ValueError(f"key index snapshot: {n} keys of which only "
                             f"{index.n_slots} are distinct")
        return index
