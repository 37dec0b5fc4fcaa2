# Included by arena.pyx (after sketches.pxi): point-in-time replay kernels.
#
# A training set is built by replaying a view's events in event-time order
# (stable in log order) through the same arenas as the online path, and
# reading each spine row's features right after the events with event time
# <= the row's time were applied. Each kernel below merges one segment of
# time-sorted events with a segment of time-sorted queries in one loop:
#
#     while queries remain:
#         if the next event's time <= the next query's time: apply the event
#         else: answer the query (read the slot's window as of the query time)
#     apply the events left over (they are <= the segment's horizon)
#
# Events are applied exactly as ``update`` applies them (same cell, same
# filter and null rules) and queries are answered exactly as ``read`` answers
# them (``_window_state`` with its modulo hoisted, then ``_finalize``), so a
# value equals what the online path reads at that time, bit for bit.
# The scalar and distinct-count kernels run without the GIL; last_n writes
# its lists straight into Arrow-style (offsets, values) buffers; top_k holds
# the GIL because its Misra-Gries merge allocates (still one C loop).


cdef class _ReplaySegment:
    """Validated, contiguous views of one (events, queries) segment."""
    cdef const int64_t[::1] ev_slots
    cdef const int64_t[::1] ev_ts
    cdef const double[::1] ev_values
    cdef const uint8_t[::1] ev_mask
    cdef bint has_mask
    cdef bint nulls_skip                  # NaN is a null: a float64 arena that takes values
    cdef Py_ssize_t ne
    cdef const int64_t[::1] q_slots
    cdef const int64_t[::1] q_ts
    cdef Py_ssize_t nq

    def __init__(self, TiledArena arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts,
                 bint takes_values=True):
        self.ev_slots = np.ascontiguousarray(ev_slots, dtype=np.int64)
        self.ev_ts = np.ascontiguousarray(ev_ts, dtype=np.int64)
        self.ne = self.ev_slots.shape[0]
        if self.ev_ts.shape[0] != self.ne:
            raise ValueError("replay: event slots and times differ in length")
        self.ev_values = _values_array(ev_values, self.ne, arena.bits, False, "replay")
        self.nulls_skip = takes_values and not arena.bits
        self.has_mask = ev_mask is not None
        if self.has_mask:
            self.ev_mask = np.ascontiguousarray(ev_mask, dtype=np.bool_).view(np.uint8)
            if self.ev_mask.shape[0] != self.ne:
                raise ValueError("replay: event mask and slots differ in length")
        self.q_slots = np.ascontiguousarray(q_slots, dtype=np.int64)
        self.q_ts = np.ascontiguousarray(q_ts, dtype=np.int64)
        self.nq = self.q_slots.shape[0]
        if self.q_ts.shape[0] != self.nq:
            raise ValueError("replay: query slots and times differ in length")
        ev_ts_array = np.asarray(self.ev_ts)
        if self.ne:
            if np.min(np.asarray(self.ev_slots)) < 0:
                raise ValueError("replay: negative event slot")
            if ev_ts_array.min() < MIN_EVENT_TIME or ev_ts_array.max() > MAX_EVENT_TIME:
                raise ValueError("replay: event times must lie within [-2**62, 2**62] epoch ms")
            if self.ne > 1 and np.any(np.diff(ev_ts_array) < 0):
                raise ValueError("replay: events must be sorted by event time")
            arena.reserve(np.max(np.asarray(self.ev_slots)) + 1)
        q_ts_array = np.asarray(self.q_ts)
        if self.nq > 1 and np.any(np.diff(q_ts_array) < 0):
            raise ValueError("replay: queries must be sorted by time")

    cdef inline bint skips(self, Py_ssize_t i) noexcept nogil:
        return (self.has_mask and not self.ev_mask[i]) or \
            (self.nulls_skip and isnan(self.ev_values[i]))


cdef inline void _window_state_hoisted(FeatureArena arena, int64_t slot, int64_t as_of,
                                      double* f, int64_t* n) noexcept nogil:
    """``FeatureArena._window_state`` with the tile index advanced by one per
    epoch instead of a modulo per tile: the same tiles combined in the same
    order, so bit-identical results (a 7-day window of hourly tiles is 168
    tiles per read; the modulo was most of a read's cost)."""
    cdef int64_t lo, hi, e, ring = arena.ring_tiles, tile, base
    cdef double acc_f
    cdef int64_t acc_i
    if arena.hop_ms == 0:
        arena._window_state(slot, as_of, f, n)
        return
    f[0] = arena.f64_empty
    n[0] = arena.i64_empty
    if not arena._window(slot, as_of, &lo, &hi):
        return
    base = slot * ring
    tile = floor_mod(lo, ring)
    if arena.kind == SUM:
        acc_f = f[0]
        for e in range(hi - lo + 1):
            acc_f += arena.f64[base + tile]
            tile += 1
            if tile == ring:
                tile = 0
        f[0] = acc_f
    elif arena.kind == COUNT:
        acc_i = n[0]
        for e in range(hi - lo + 1):
            acc_i += arena.i64[base + tile]
            tile += 1
            if tile == ring:
                tile = 0
        n[0] = acc_i
    else:
        for e in range(hi - lo + 1):
            _combine_into(arena.kind, f, n,
                          arena.f64[base + tile] if arena.f64 != NULL else 0,
                          arena.i64[base + tile] if arena.i64 != NULL else 0)
            tile += 1
            if tile == ring:
                tile = 0


def replay_scalar(FeatureArena arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts):
    """Replay one segment through a count/sum/mean/min/max/first/last arena.

    Events (``ev_*``, sorted by time) are applied as ``update`` applies them;
    query ``j`` (``q_slots[j]``, ``q_ts[j]``, sorted by time) is answered as
    ``read(q_slots[j], q_ts[j])`` answers it, after every event with time <=
    ``q_ts[j]`` and before any later one. Every event of the segment is
    applied. Returns ``(values, valid)`` in query order."""
    cdef _ReplaySegment g = _ReplaySegment(arena, ev_slots, ev_ts, ev_values, ev_mask,
                                           q_slots, q_ts, arena.kind != COUNT)
    values = np.empty(g.nq, dtype=np.int64 if arena.kind == COUNT else np.float64)
    valid = np.empty(g.nq, dtype=np.bool_)
    cdef uint8_t[::1] ok = valid.view(np.uint8)
    cdef double[::1] out_f
    cdef int64_t[::1] out_i
    if arena.kind == COUNT:
        out_i = values
    else:
        out_f = values
    cdef Py_ssize_t i = 0, j = 0
    cdef int64_t cell, slot, hop = arena.hop_ms, ring = arena.ring_tiles
    cdef int64_t epoch = 0, tile = 0, epoch_lo = 1, epoch_hi = 0, ts
    cdef int64_t capacity = arena.capacity
    cdef bint is_count = arena.kind == COUNT
    cdef double f
    cdef int64_t n
    with nogil:
        while i < g.ne or j < g.nq:
            if i < g.ne and (j == g.nq or g.ev_ts[i] <= g.q_ts[j]):
                # apply event i, exactly as FeatureArena.update does
                if not g.skips(i):
                    ts = g.ev_ts[i]
                    if hop == 0:
                        cell = g.ev_slots[i]
                    else:
                        if not (epoch_lo <= ts < epoch_hi):
                            epoch = floor_div(ts, hop)
                            tile = floor_mod(epoch, ring)
                            epoch_lo = epoch * hop
                            epoch_hi = epoch_lo + hop
                        cell = arena._event_cell(g.ev_slots[i], epoch, tile)
                    if cell >= 0:
                        arena._apply(cell, ts, g.ev_values[i])
                i += 1
            else:
                # answer query j, exactly as FeatureArena.read does
                slot = g.q_slots[j]
                if slot < 0 or slot >= capacity:
                    ok[j] = 0
                    if is_count:
                        out_i[j] = 0
                    else:
                        out_f[j] = NAN
                else:
                    _window_state_hoisted(arena, slot, g.q_ts[j], &f, &n)
                    if is_count:
                        out_i[j] = n
                        ok[j] = 1
                    else:
                        out_f[j] = arena._finalize(f, n, &ok[j])
                j += 1
    return arena._typed(values, valid), valid


def replay_distinct_count(DistinctCountArena arena, ev_slots, ev_ts, ev_values, ev_mask,
                          q_slots, q_ts):
    """``replay_scalar`` for the HyperLogLog arena: int64 estimates, as ``read``."""
    cdef _ReplaySegment g = _ReplaySegment(arena, ev_slots, ev_ts, ev_values, ev_mask,
                                           q_slots, q_ts)
    values = np.zeros(g.nq, dtype=np.int64)
    valid = np.zeros(g.nq, dtype=np.bool_)
    cdef int64_t[::1] out = values
    cdef uint8_t[::1] ok = valid.view(np.uint8)
    merged_array = np.zeros(arena.m, dtype=np.uint8)
    cdef uint8_t[::1] merged = merged_array
    cdef Py_ssize_t i = 0, j = 0
    cdef int64_t cell, slot, lo, hi, e, r
    cdef int64_t capacity = arena.capacity, m = arena.m
    with nogil:
        while i < g.ne or j < g.nq:
            if i < g.ne and (j == g.nq or g.ev_ts[i] <= g.q_ts[j]):
                if not g.skips(i):
                    cell = arena._cell_for_event(g.ev_slots[i], g.ev_ts[i])
                    if cell >= 0:
                        arena._add(cell, g.ev_values[i])
                i += 1
            else:
                slot = g.q_slots[j]
                if 0 <= slot < capacity:
                    ok[j] = 1
                    if arena._window(slot, g.q_ts[j], &lo, &hi):
                        memset(&merged[0], 0, m)
                        for e in range(lo, hi + 1):
                            cell = arena._cell(slot, e)
                            for r in range(m):
                                if arena.reg[cell * m + r] > merged[r]:
                                    merged[r] = arena.reg[cell * m + r]
                        out[j] = <int64_t>(_hll_estimate(&merged[0], m) + 0.5)
                j += 1
    return values, valid


def replay_last_n(LastNArena arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts):
    """``replay_scalar`` for last_n. Returns ``(offsets, values, valid)``: query
    j's list (most recent first, the window applied as ``read`` applies it) is
    ``values[offsets[j]:offsets[j + 1]]``, ready for an Arrow ListArray."""
    cdef _ReplaySegment g = _ReplaySegment(arena, ev_slots, ev_ts, ev_values, ev_mask,
                                           q_slots, q_ts)
    cdef int64_t n = arena.n
    offsets_array = np.zeros(g.nq + 1, dtype=np.int64)
    values_array = np.empty(g.nq * n, dtype=np.float64)
    valid = np.zeros(g.nq, dtype=np.bool_)
    cdef int64_t[::1] offsets = offsets_array
    cdef double[::1] out = values_array
    cdef uint8_t[::1] ok = valid.view(np.uint8)
    cdef Py_ssize_t i = 0, j = 0
    cdef int64_t slot, k, at = 0, current = 0, oldest = 0, epoch
    cdef int64_t capacity = arena.capacity
    cdef int64_t window_ms = arena.read_window_ms, hop = arena.read_hop_ms
    cdef int64_t* t
    cdef double* v
    with nogil:
        while i < g.ne or j < g.nq:
            if i < g.ne and (j == g.nq or g.ev_ts[i] <= g.q_ts[j]):
                if not g.skips(i):
                    arena._insert(g.ev_slots[i], g.ev_ts[i], g.ev_values[i])
                i += 1
            else:
                slot = g.q_slots[j]
                if 0 <= slot < capacity:
                    ok[j] = 1
                    t = arena.ts + slot * n
                    v = arena.val + slot * n
                    if window_ms:
                        current = floor_div(g.q_ts[j], hop)
                        oldest = current - window_ms // hop
                    k = arena.fill[slot] - 1
                    while k >= 0:
                        if window_ms:
                            epoch = floor_div(t[k], hop)
                            if not (oldest < epoch <= current):
                                k -= 1
                                continue
                        out[at] = v[k]
                        at += 1
                        k -= 1
                j += 1
                offsets[j] = at
    values_array = values_array[:at]
    return offsets_array, values_array.view(np.int64) if arena.bits else values_array, valid


cdef struct _TopEntry:
    uint64_t item                 # a value's bit pattern, as TopKArena keeps it
    int64_t count


cdef int _top_order_float(const void* a, const void* b) noexcept nogil:
    """Largest count first; ties: smaller value first (as TopKArena.read)."""
    cdef const _TopEntry* x = <const _TopEntry*>a
    cdef const _TopEntry* y = <const _TopEntry*>b
    if x.count != y.count:
        return -1 if x.count > y.count else 1
    cdef double u, v
    memcpy(&u, &x.item, 8)
    memcpy(&v, &y.item, 8)
    return (u > v) - (u < v)


cdef int _top_order_int(const void* a, const void* b) noexcept nogil:
    """_top_order_float for an int64 arena: ties ordered as int64."""
    cdef const _TopEntry* x = <const _TopEntry*>a
    cdef const _TopEntry* y = <const _TopEntry*>b
    if x.count != y.count:
        return -1 if x.count > y.count else 1
    cdef int64_t u = <int64_t>x.item, v = <int64_t>y.item
    return (u > v) - (u < v)


def replay_top_k(TopKArena arena, ev_slots, ev_ts, ev_values, ev_mask, q_slots, q_ts):
    """``replay_scalar`` for top_k. Returns ``(offsets, items, counts, valid)``:
    query j's (value, count) pairs, largest count first, are
    ``items/counts[offsets[j]:offsets[j + 1]]``, as ``read`` orders them. Runs
    with the GIL held (the Misra-Gries merge of a window's tiles allocates)."""
    cdef _ReplaySegment g = _ReplaySegment(arena, ev_slots, ev_ts, ev_values, ev_mask,
                                           q_slots, q_ts)
    cdef int64_t k = arena.k, m = arena.m
    offsets_array = np.zeros(g.nq + 1, dtype=np.int64)
    items_array = np.empty(g.nq * k, dtype=np.uint64)
    counts_array = np.empty(g.nq * k, dtype=np.int64)
    valid = np.zeros(g.nq, dtype=np.bool_)
    cdef int64_t[::1] offsets = offsets_array
    cdef uint64_t[::1] out_items = items_array
    cdef int64_t[::1] out_counts = counts_array
    cdef uint8_t[::1] ok = valid.view(np.uint8)
    window_items = np.zeros(m, dtype=np.uint64)
    window_counts = np.zeros(m, dtype=np.int64)
    cdef uint64_t[::1] wi = window_items
    cdef int64_t[::1] wc = window_counts
    entries = np.zeros(m * sizeof(_TopEntry), dtype=np.uint8)
    cdef _TopEntry* top = <_TopEntry*>cnp.PyArray_DATA(entries)
    cdef Py_ssize_t i = 0, j = 0
    cdef int64_t slot, cell, lo, hi, e, r, used, at = 0
    cdef int64_t capacity = arena.capacity
    while i < g.ne or j < g.nq:
        if i < g.ne and (j == g.nq or g.ev_ts[i] <= g.q_ts[j]):
            if not g.skips(i):
                cell = arena._cell_for_event(g.ev_slots[i], g.ev_ts[i])
                if cell >= 0:
                    _mg_add(arena.items + cell * m, arena.counts + cell * m, m,
                            _value_bits(g.ev_values[i], arena.bits), 1)
            i += 1
        else:
            slot = g.q_slots[j]
            if 0 <= slot < capacity:
                ok[j] = 1
                memset(&wc[0], 0, m * sizeof(int64_t))
                if arena._window(slot, g.q_ts[j], &lo, &hi):
                    for e in range(lo, hi + 1):
                        cell = arena._cell(slot, e)
                        _mg_merge(&wi[0], &wc[0], arena.items + cell * m,
                                  arena.counts + cell * m, m)
                used = 0
                for r in range(m):
                    if wc[r] > 0:
                        top[used].item = wi[r]
                        top[used].count = wc[r]
                        used += 1
                qsort(top, used, sizeof(_TopEntry),
                      _top_order_int if arena.bits else _top_order_float)
                for r in range(min(used, k)):
                    out_items[at] = top[r].item
                    out_counts[at] = top[r].count
                    at += 1
            j += 1
            offsets[j] = at
    items = items_array[:at].view(np.int64 if arena.bits else np.float64)
    return offsets_array, items, counts_array[:at], valid
