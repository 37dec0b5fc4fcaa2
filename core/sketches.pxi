# Included by arena.pyx: the arenas whose state per entity is more than a
# number or two. Each follows the same contract as FeatureArena.

from libc.stdlib cimport free, malloc, qsort

cdef extern from "tally_hash.h":
    int tally_clz64(uint64_t x) noexcept nogil


cdef class LastNArena(TiledArena):
    """The N most recent values per entity, by event time (ties: the later
    arrival is the more recent). Memory: 16 bytes x N + 8 per entity.

    State is the last N events overall; a window filters them when read, which
    is exact for reads as of the newest event time or later (the last N events
    of a window are among the last N overall). Values are read most recent
    first. No event is ever "too late": one older than all N is not among
    them."""

    cdef readonly int64_t n
    cdef int64_t read_window_ms, read_hop_ms
    cdef int64_t* ts
    cdef double* val
    cdef int64_t* fill

    def __init__(self, int64_t n, int64_t window_ms=0, int64_t hop_ms=0,
                 int64_t lateness_ms=0, int64_t capacity=1024, str value_type="float64"):
        if n < 1 or n > 4096:
            raise ValueError(f"last_n: n={n} must be between 1 and 4096")
        TiledArena.__init__(self, window_ms, hop_ms, lateness_ms)   # validates the window
        self.read_window_ms, self.read_hop_ms = window_ms, hop_ms
        TiledArena.__init__(self, 0, 0, 0)        # storage: one list per slot
        self._set_value_type(value_type, "last_n")
        self.n = n
        self._declare("ts", np.int64, n, 0)
        self._declare("val", np.float64, n, np.nan)
        self._declare("fill", np.int64, 1, 0)
        self.reserve(capacity)

    cdef void _bind(self):
        self.ts = <int64_t*>cnp.PyArray_DATA(self._arrays["ts"])
        self.val = <double*>cnp.PyArray_DATA(self._arrays["val"])
        self.fill = <int64_t*>cnp.PyArray_DATA(self._arrays["fill"])

    def describe(self):
        return self._describe_value_type(
            {"aggregation": "last_n", "param": self.n, "window_ms": self.read_window_ms,
             "hop_ms": self.read_hop_ms, "lateness_ms": 0})

    def update(self, slots, timestamps, values, mask=None):
        cdef Batch b = Batch(slots, timestamps, values, mask, True, "last_n", self.bits)
        self.reserve(b.max_slot + 1)
        cdef Py_ssize_t i
        cdef bint nulls_skip = not self.bits
        with nogil:
            for i in range(b.n):
                if not b.skips(i, nulls_skip):
                    self._insert(b.slots[i], b.ts[i], b.values[i])

    cdef void _insert(self, int64_t slot, int64_t ts, double value) noexcept nogil:
        """Insert in event-time order, after entries of equal time."""
        cdef int64_t* t = self.ts + slot * self.n
        cdef double* v = self.val + slot * self.n
        cdef int64_t count = self.fill[slot]
        cdef int64_t at = count
        while at > 0 and t[at - 1] > ts:
            at -= 1
        cdef int64_t j
        if count < self.n:
            j = count
            while j > at:
                t[j] = t[j - 1]
                v[j] = v[j - 1]
                j -= 1
            t[at] = ts
            v[at] = value
            self.fill[slot] = count + 1
        elif at > 0:                 # full: the oldest entry leaves
            for j in range(at - 1):
                t[j] = t[j + 1]
                v[j] = v[j + 1]
            t[at - 1] = ts
            v[at - 1] = value

    def merge(self, TiledArena later, dst_slots):
        if type(later) is not type(self) or later.describe() != self.describe():
            raise ValueError(f"cannot merge {later!r} into {self!r}: different definitions")
        cdef LastNArena other = <LastNArena>later
        cdef const int64_t[::1] dst = np.ascontiguousarray(dst_slots, dtype=np.int64)
        if dst.shape[0] == 0:
            return
        self.reserve(np.max(np.asarray(dst)) + 1)
        cdef Py_ssize_t src
        cdef int64_t j
        for src in range(dst.shape[0]):
            # later's events arrived after ours: inserting them in their own
            # order reproduces sequential processing exactly
            for j in range(other.fill[src]):
                self._insert(dst[src], other.ts[src * self.n + j], other.val[src * self.n + j])

    def read(self, slots, as_of):
        """Lists of the last N values in the window, most recent first (an
        empty list for an empty window); invalid for unknown slots."""
        cdef const int64_t[::1] s = np.ascontiguousarray(slots, dtype=np.int64)
        cdef Py_ssize_t n_slots = s.shape[0]
        cdef const int64_t[::1] t = np.ascontiguousarray(
            np.broadcast_to(np.asarray(as_of, dtype=np.int64), (n_slots,)))
        values = np.empty(n_slots, dtype=object)
        valid = np.zeros(n_slots, dtype=np.bool_)
        cdef uint8_t[::1] ok = valid.view(np.uint8)
        cdef int64_t hop = self.read_hop_ms
        cdef int64_t tiles = self.read_window_ms // hop if hop else 0
        cdef int64_t* bits = <int64_t*>self.val
        cdef int64_t slot, current = 0, epoch, j, base
        cdef Py_ssize_t k
        cdef list items
        # one typed pass per slot, newest first (items are stored oldest first)
        for k in range(n_slots):
            slot = s[k]
            if slot < 0 or slot >= self.capacity:
                values[k] = None
                continue
            ok[k] = 1
            if hop:
                current = floor_div(t[k], hop)
            base = slot * self.n
            items = []
            for j in range(base + self.fill[slot] - 1, base - 1, -1):
                if hop:
                    epoch = floor_div(self.ts[j], hop)
                    if epoch <= current - tiles or epoch > current:
                        continue
                items.append(bits[j] if self.bits else self.val[j])
            values[k] = items
        return values, valid


cdef class DistinctCountArena(TiledArena):
    """Approximate distinct count: HyperLogLog with 2^precision one-byte
    registers per tile (64-bit hashes, linear counting for small
    cardinalities). Standard error 1.04 / sqrt(2^precision): 3.25% at the
    default precision 10 (1 KiB per entity per tile). Merging takes the
    register-wise maximum, so merged parts give exactly the sketch of
    sequential processing. Values are hashed as float64 bit patterns
    (-0.0 counts as 0.0), or int64 ones in an int64 arena."""

    cdef readonly int precision
    cdef int64_t m
    cdef uint8_t* reg

    def __init__(self, int precision=10, int64_t window_ms=0, int64_t hop_ms=0,
                 int64_t lateness_ms=0, int64_t capacity=1024, str value_type="float64"):
        if precision < 4 or precision > 16:
            raise ValueError(f"distinct_count: precision={precision} must be between 4 and 16")
        TiledArena.__init__(self, window_ms, hop_ms, lateness_ms)
        self._set_value_type(value_type, "distinct_count")
        self.precision = precision
        self.m = 1 << precision
        self._declare("reg", np.uint8, self.ring_tiles * self.m, 0)
        self.reserve(capacity)

    cdef void _bind(self):
        TiledArena._bind(self)
        self.reg = <uint8_t*>cnp.PyArray_DATA(self._arrays["reg"])

    def describe(self):
        return self._describe_value_type(
            {"aggregation": "distinct_count", "param": self.precision,
             "window_ms": self.window_ms, "hop_ms": self.hop_ms,
             "lateness_ms": self.lateness_ms})

    @property
    def standard_error(self):
        return 1.04 / (<double>self.m) ** 0.5

    def update(self, slots, timestamps, values, mask=None):
        cdef Batch b = Batch(slots, timestamps, values, mask, True, "distinct_count", self.bits)
        self.reserve(b.max_slot + 1)
        cdef Py_ssize_t i
        cdef int64_t cell
        cdef bint nulls_skip = not self.bits
        with nogil:
            for i in range(b.n):
                if b.skips(i, nulls_skip):
                    continue
                cell = self._cell_for_event(b.slots[i], b.ts[i])
                if cell >= 0:
                    self._add(cell, b.values[i])

    cdef inline void _add(self, int64_t cell, double value) noexcept nogil:
        """Count one value in a cell's registers."""
        cdef uint64_t h = _value_bits(value, self.bits)
        h = tally_hash_u64(h)
        cdef int p = self.precision
        cdef uint64_t rest = h << p
        cdef uint8_t rank = (64 - p + 1) if rest == 0 else tally_clz64(rest) + 1
        if rank > self.reg[cell * self.m + (h >> (64 - p))]:
            self.reg[cell * self.m + (h >> (64 - p))] = rank

    cdef void _clear(self, int64_t cell) noexcept nogil:
        memset(self.reg + cell * self.m, 0, self.m)

    cdef void _combine_cell(self, int64_t dst, TiledArena later, int64_t src):
        cdef DistinctCountArena other = <DistinctCountArena>later
        cdef int64_t j
        for j in range(self.m):
            if other.reg[src * self.m + j] > self.reg[dst * self.m + j]:
                self.reg[dst * self.m + j] = other.reg[src * self.m + j]

    def read(self, slots, as_of):
        """Estimated distinct counts (int64); 0 for an empty window."""
        cdef const int64_t[::1] s = np.ascontiguousarray(slots, dtype=np.int64)
        cdef Py_ssize_t n = s.shape[0]
        cdef const int64_t[::1] t = np.ascontiguousarray(
            np.broadcast_to(np.asarray(as_of, dtype=np.int64), (n,)))
        values = np.zeros(n, dtype=np.int64)
        valid = np.zeros(n, dtype=np.bool_)
        cdef int64_t[::1] out = values
        cdef uint8_t[::1] ok = valid.view(np.uint8)
        merged_array = np.zeros(self.m, dtype=np.uint8)
        cdef uint8_t[::1] merged = merged_array
        cdef Py_ssize_t k
        cdef int64_t lo, hi, e, j, cell
        with nogil:
            for k in range(n):
                if s[k] < 0 or s[k] >= self.capacity:
                    continue
                ok[k] = 1
                if not self._window(s[k], t[k], &lo, &hi):
                    continue
                memset(&merged[0], 0, self.m)
                for e in range(lo, hi + 1):
                    cell = self._cell(s[k], e)
                    for j in range(self.m):
                        if self.reg[cell * self.m + j] > merged[j]:
                            merged[j] = self.reg[cell * self.m + j]
                out[k] = <int64_t>(_hll_estimate(&merged[0], self.m) + 0.5)
        return values, valid


cdef double _hll_estimate(const uint8_t* reg, int64_t m) noexcept nogil:
    cdef double alpha
    if m == 16:
        alpha = 0.673
    elif m == 32:
        alpha = 0.697
    elif m == 64:
        alpha = 0.709
    else:
        alpha = 0.7213 / (1.0 + 1.079 / m)
    cdef double harmonic = 0
    cdef int64_t zeros = 0, j
    for j in range(m):
        harmonic += pow(2.0, -<double>reg[j])
        if reg[j] == 0:
            zeros += 1
    cdef double estimate = alpha * m * m / harmonic
    if estimate <= 2.5 * m and zeros > 0:
        estimate = m * log(<double>m / zeros)        # linear counting
    return estimate


cdef class TopKArena(TiledArena):
    """Approximate top-K values per entity: a Misra-Gries summary of
    m = 4K counters per tile (16 bytes each). As ``histogram`` it keeps
    m = K counters and reports them all: exact counts of every value while a
    window holds at most K distinct values, the same guarantee beyond.

    Guarantee, for a window holding n events: every value occurring more than
    n / (m + 1) times is reported if it ranks in the top K of the summary, and
    each reported count is at most n / (m + 1) below the true count (never
    above it). Merging uses the mergeable-summaries rule (Agarwal et al.,
    2012), which keeps that guarantee; unlike the other arenas a merged
    summary need not be identical to the sequential one."""

    cdef readonly int64_t k
    cdef readonly str aggregation   # top_k or histogram
    cdef int64_t m
    cdef uint64_t* items           # bit patterns of the values (see _value_bits)
    cdef int64_t* counts

    def __init__(self, int64_t k=10, int64_t window_ms=0, int64_t hop_ms=0,
                 int64_t lateness_ms=0, int64_t capacity=1024, str value_type="float64",
                 str aggregation="top_k"):
        if k < 1 or k > 1024:
            raise ValueError(f"{aggregation}: k={k} must be between 1 and 1024")
        if aggregation not in ("top_k", "histogram"):
            raise ValueError(f"TopKArena: aggregation {aggregation!r} is top_k or histogram")
        TiledArena.__init__(self, window_ms, hop_ms, lateness_ms)
        self._set_value_type(value_type, aggregation)
        self.k = k
        self.aggregation = aggregation
        self.m = 4 * k if aggregation == "top_k" else k
        self._declare("items", np.float64, self.ring_tiles * self.m, 0.0)
        self._declare("counts", np.int64, self.ring_tiles * self.m, 0)
        self.reserve(capacity)

    cdef void _bind(self):
        TiledArena._bind(self)
        self.items = <uint64_t*>cnp.PyArray_DATA(self._arrays["items"])
        self.counts = <int64_t*>cnp.PyArray_DATA(self._arrays["counts"])

    @property
    def counters(self):
        return self.m

    def describe(self):
        return self._describe_value_type(
            {"aggregation": self.aggregation, "param": self.k, "window_ms": self.window_ms,
             "hop_ms": self.hop_ms, "lateness_ms": self.lateness_ms})

    def update(self, slots, timestamps, values, mask=None):
        cdef Batch b = Batch(slots, timestamps, values, mask, True, "top_k", self.bits)
        self.reserve(b.max_slot + 1)
        cdef Py_ssize_t i
        cdef int64_t cell
        cdef bint nulls_skip = not self.bits
        with nogil:
            for i in range(b.n):
                if b.skips(i, nulls_skip):
                    continue
                cell = self._cell_for_event(b.slots[i], b.ts[i])
                if cell >= 0:
                    _mg_add(self.items + cell * self.m, self.counts + cell * self.m,
                            self.m, _value_bits(b.values[i], self.bits), 1)

    cdef void _clear(self, int64_t cell) noexcept nogil:
        memset(self.counts + cell * self.m, 0, self.m * sizeof(int64_t))

    cdef void _combine_cell(self, int64_t dst, TiledArena later, int64_t src):
        cdef TopKArena other = <TopKArena>later
        _mg_merge(self.items + dst * self.m, self.counts + dst * self.m,
                  other.items + src * self.m, other.counts + src * self.m, self.m)

    def read(self, slots, as_of):
        """Lists of (value, count) pairs, largest count first (ties: smaller
        value first; of a string column: smaller code first), at most K; an
        empty list for an empty window."""
        slots = np.asarray(slots, dtype=np.int64)
        as_of = np.broadcast_to(np.asarray(as_of, dtype=np.int64), slots.shape)
        values = np.empty(len(slots), dtype=object)
        valid = (slots >= 0) & (slots < self.capacity)
        window_bits = np.zeros(self.m, dtype=np.uint64)
        window_items = window_bits.view(np.int64 if self.bits else np.float64)
        window_counts = np.zeros(self.m, dtype=np.int64)
        cdef uint64_t[::1] wi = window_bits
        cdef int64_t[::1] wc = window_counts
        cdef int64_t lo, hi, e, cell
        for k in range(len(slots)):
            if not valid[k]:
                values[k] = None
                continue
            window_counts[:] = 0
            if self._window(slots[k], as_of[k], &lo, &hi):
                for e in range(lo, hi + 1):
                    cell = self._cell(slots[k], e)
                    _mg_merge(&wi[0], &wc[0], self.items + cell * self.m,
                              self.counts + cell * self.m, self.m)
            present = window_counts > 0
            order = np.lexsort((window_items[present], -window_counts[present]))[:self.k]
            values[k] = list(zip(window_items[present][order].tolist(),
                                 window_counts[present][order].tolist()))
        return values, valid


cdef inline uint64_t _value_bits(double value, bint bits) noexcept nogil:
    """The bit pattern a sketch keeps for a value: an int64 arena's cells
    already hold one; a float's is taken after turning -0.0 into 0.0, so
    that bit equality is float equality (NaN, a null, never gets here)."""
    cdef uint64_t h
    if not bits:
        value = value + 0.0
    memcpy(&h, &value, 8)
    return h


cdef void _mg_add(uint64_t* items, int64_t* counts, int64_t m, uint64_t item,
                  int64_t count) noexcept nogil:
    """Misra-Gries: count ``item``; with no free counter, decrement them all."""
    cdef int64_t j, free_at = -1
    for j in range(m):
        if counts[j] > 0:
            if items[j] == item:
                counts[j] += count
                return
        elif free_at < 0:
            free_at = j
    if free_at >= 0:
        items[free_at] = item
        counts[free_at] = count
        return
    for j in range(m):
        counts[j] -= 1
        if counts[j] < 0:
            counts[j] = 0


cdef int _descending(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const int64_t*>a)[0]
    cdef int64_t y = (<const int64_t*>b)[0]
    return (x < y) - (x > y)


cdef void _mg_merge(uint64_t* items, int64_t* counts, const uint64_t* src_items,
                    const int64_t* src_counts, int64_t m):
    """Fold summary ``src`` into ``items/counts`` (both of m counters): add the
    counters, then, if more than m remain, subtract the (m+1)-th largest
    count and keep the positive ones."""
    cdef uint64_t* all_items = <uint64_t*>malloc(2 * m * sizeof(uint64_t))
    cdef int64_t* all_counts = <int64_t*>malloc(2 * m * sizeof(int64_t))
    cdef int64_t* sorted_counts = <int64_t*>malloc(2 * m * sizeof(int64_t))
    if all_items == NULL or all_counts == NULL or sorted_counts == NULL:
        free(all_items); free(all_counts); free(sorted_counts)
        raise MemoryError()
    cdef int64_t used = 0, j, i
    cdef bint found
    for j in range(m):
        if counts[j] > 0:
            all_items[used] = items[j]
            all_counts[used] = counts[j]
            used += 1
    for j in range(m):
        if src_counts[j] <= 0:
            continue
        found = False
        for i in range(used):
            if all_items[i] == src_items[j]:
                all_counts[i] += src_counts[j]
                found = True
                break
        if not found:
            all_items[used] = src_items[j]
            all_counts[used] = src_counts[j]
            used += 1
    cdef int64_t cut = 0
    if used > m:
        memcpy(sorted_counts, all_counts, used * sizeof(int64_t))
        qsort(sorted_counts, used, sizeof(int64_t), _descending)
        cut = sorted_counts[m]
    memset(counts, 0, m * sizeof(int64_t))
    cdef int64_t kept = 0
    for j in range(used):
        if all_counts[j] - cut > 0:
            items[kept] = all_items[j]
            counts[kept] = all_counts[j] - cut
            kept += 1
    free(all_items); free(all_counts); free(sorted_counts)
