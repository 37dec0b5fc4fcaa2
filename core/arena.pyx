# cython: language_level=3
"""State arenas: the state of one aggregation over one window, for every entity.

An arena is a few typed, columnar arrays indexed by ``slot * ring + tile``:

* ``f64`` holds a float per tile (sum, min, max, the value of first/last);
* ``i64`` holds an int per tile (count, or the event time of first/last);
* ``head`` holds, per slot, the epoch (``event_time // hop``) of the newest tile.

Windows are built from tiles of one hop each (the model is Chronon's hops):

* lifetime: one tile that never expires (``hop == 0``; no ``head``);
* tumbling of size W: hop W, one tile in the window;
* sliding of size W and hop H (H divides W): W / H tiles in the window.

The ring of a windowed arena keeps ``window_tiles + lateness_tiles`` tiles per
slot. An event whose tile has already left its entity's ring can no longer
change any value the arena can produce, so it is counted in ``late_dropped``
and not applied. Because that rule depends only on the entity's own newest
tile, ``a.merge(b)`` of two arenas built from consecutive parts of a stream
equals the arena built from the whole stream: a tile dropped in one order is
cleared by the ring advance in the other. Only the ``late_dropped`` counter can
differ (a merge counts no events).

A value read as of time ``t`` combines the tiles with epochs in
``(t // hop - window_tiles, t // hop]``, so a window is accurate to its hop and
expires by time, not only when the entity's next event arrives.
"""
from libc.math cimport NAN, isnan
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint8_t

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef enum Kind:
    COUNT = 0
    SUM = 1
    MEAN = 2
    MIN = 3
    MAX = 4
    FIRST = 5
    LAST = 6

KINDS = {"count": COUNT, "sum": SUM, "mean": MEAN, "min": MIN, "max": MAX,
         "first": FIRST, "last": LAST}

# Which arrays each kind keeps per tile, and their value when the tile is empty.
# (kind: (f64 empty value or None, i64 empty value or None))
_LAYOUT = {
    COUNT: (None, 0),
    SUM: (0.0, None),
    MEAN: (0.0, 0),
    MIN: (np.nan, None),
    MAX: (np.nan, None),
    FIRST: (np.nan, INT64_MAX),
    LAST: (np.nan, INT64_MIN),
}

cdef int64_t NO_TILE = INT64_MIN


cdef inline int64_t floor_div(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a // b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef inline int64_t floor_mod(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t r = a % b
    if r < 0:
        r += b
    return r


cdef class FeatureArena:
    """The state of one aggregation over one window for every slot."""

    cdef readonly str aggregation
    cdef int kind
    cdef readonly int64_t hop_ms            # 0: lifetime
    cdef readonly int64_t window_tiles
    cdef readonly int64_t ring_tiles
    cdef readonly int64_t capacity          # slots allocated
    cdef readonly int64_t late_dropped
    cdef object _f64, _i64, _head           # numpy owners of the memory below
    cdef double* f64
    cdef int64_t* i64
    cdef int64_t* head
    cdef double f64_empty
    cdef int64_t i64_empty

    def __init__(self, str aggregation, int64_t window_ms=0, int64_t hop_ms=0,
                 int64_t lateness_ms=0, int64_t capacity=1024):
        if aggregation not in KINDS:
            raise ValueError(f"unknown aggregation {aggregation!r}; "
                             f"expected one of {', '.join(KINDS)}")
        self.aggregation = aggregation
        self.kind = KINDS[aggregation]
        if window_ms == 0:
            self.hop_ms = 0
            self.window_tiles = self.ring_tiles = 1
        else:
            if hop_ms <= 0 or window_ms <= 0 or window_ms % hop_ms:
                raise ValueError(f"window {window_ms} ms must be a positive multiple "
                                 f"of its hop {hop_ms} ms")
            self.hop_ms = hop_ms
            self.window_tiles = window_ms // hop_ms
            self.ring_tiles = self.window_tiles + (lateness_ms + hop_ms - 1) // hop_ms
        f_empty, i_empty = _LAYOUT[self.kind]
        self.f64_empty = NAN if f_empty is None else f_empty
        self.i64_empty = 0 if i_empty is None else i_empty
        self.capacity = 0
        self.late_dropped = 0
        self._f64 = np.empty(0, np.float64) if f_empty is not None else None
        self._i64 = np.empty(0, np.int64) if i_empty is not None else None
        self._head = np.empty(0, np.int64) if self.hop_ms else None
        self.reserve(capacity)

    @property
    def window_ms(self):
        return self.hop_ms * self.window_tiles

    @property
    def lateness_ms(self):
        return self.hop_ms * (self.ring_tiles - self.window_tiles)

    @property
    def dtype(self):
        """The dtype of finalised values."""
        return np.dtype(np.int64) if self.kind == COUNT else np.dtype(np.float64)

    @property
    def bytes_per_slot(self):
        tile_bytes = 8 * ((self._f64 is not None) + (self._i64 is not None))
        return tile_bytes * self.ring_tiles + (8 if self.hop_ms else 0)

    def reserve(self, int64_t n_slots):
        """Make room for ``n_slots`` slots; new slots start empty."""
        if n_slots <= self.capacity:
            return
        cdef int64_t new_capacity = max(n_slots, self.capacity + self.capacity // 2)
        cdef int64_t cells = new_capacity * self.ring_tiles
        if self._f64 is not None:
            self._f64 = _grown(self._f64, cells, self.f64_empty)
            self.f64 = <double*>cnp.PyArray_DATA(self._f64)
        if self._i64 is not None:
            self._i64 = _grown(self._i64, cells, self.i64_empty)
            self.i64 = <int64_t*>cnp.PyArray_DATA(self._i64)
        if self._head is not None:
            self._head = _grown(self._head, new_capacity, NO_TILE)
            self.head = <int64_t*>cnp.PyArray_DATA(self._head)
        self.capacity = new_capacity

    # -- update ---------------------------------------------------------------

    def update(self, slots, timestamps, values=None, mask=None):
        """Fold a batch of events into the arena.

        ``slots`` and ``timestamps`` (event time, epoch ms) are int64 arrays;
        ``values`` a float64 array (NaN is a null and is skipped; unused by
        count); ``mask`` an optional bool array of the events to apply (a
        feature's filter). Events are applied in array order.
        """
        cdef const int64_t[::1] s = np.ascontiguousarray(slots, dtype=np.int64)
        cdef const int64_t[::1] t = np.ascontiguousarray(timestamps, dtype=np.int64)
        cdef Py_ssize_t n = s.shape[0]
        if t.shape[0] != n:
            raise ValueError("slots and timestamps differ in length")
        cdef const double[::1] v
        if values is None:
            if self.kind != COUNT:
                raise ValueError(f"{self.aggregation} needs values")
            v = np.zeros(n, dtype=np.float64)
        else:
            v = np.ascontiguousarray(values, dtype=np.float64)
            if v.shape[0] != n:
                raise ValueError("values and slots differ in length")
        cdef const uint8_t[::1] m
        cdef bint has_mask = mask is not None
        if has_mask:
            m = np.ascontiguousarray(mask, dtype=np.bool_).view(np.uint8)
            if m.shape[0] != n:
                raise ValueError("mask and slots differ in length")
        if n == 0:
            return
        max_slot = np.max(np.asarray(s))
        if np.min(np.asarray(s)) < 0:
            raise ValueError("negative slot in update")
        self.reserve(max_slot + 1)
        cdef Py_ssize_t i
        cdef int64_t cell
        with nogil:
            for i in range(n):
                if has_mask and not m[i]:
                    continue
                if self.kind != COUNT and isnan(v[i]):
                    continue
                cell = self._cell_for_event(s[i], t[i])
                if cell >= 0:
                    self._apply(cell, t[i], v[i])

    cdef inline int64_t _cell_for_event(self, int64_t slot, int64_t ts) noexcept nogil:
        """The cell an event lands in, advancing the slot's ring; -1 if too late."""
        if self.hop_ms == 0:
            return slot
        cdef int64_t epoch = floor_div(ts, self.hop_ms)
        cdef int64_t newest = self.head[slot]
        if epoch > newest:
            self._advance(slot, newest, epoch)
        elif epoch <= newest - self.ring_tiles:
            self.late_dropped += 1
            return -1
        return slot * self.ring_tiles + floor_mod(epoch, self.ring_tiles)

    cdef inline void _advance(self, int64_t slot, int64_t newest, int64_t epoch) noexcept nogil:
        """Empty the tiles that epochs (newest, epoch] reuse, and move the head."""
        cdef int64_t n_clear = self.ring_tiles
        if newest != NO_TILE and epoch - newest < n_clear:
            n_clear = epoch - newest
        cdef int64_t j
        for j in range(n_clear):
            self._clear(slot * self.ring_tiles + floor_mod(epoch - j, self.ring_tiles))
        self.head[slot] = epoch

    cdef inline void _clear(self, int64_t cell) noexcept nogil:
        if self.f64 != NULL:
            self.f64[cell] = self.f64_empty
        if self.i64 != NULL:
            self.i64[cell] = self.i64_empty

    cdef inline void _apply(self, int64_t cell, int64_t ts, double value) noexcept nogil:
        """Apply one event: it is a tile holding that single event."""
        cdef int64_t one_event = ts if (self.kind == FIRST or self.kind == LAST) else 1
        self._combine(cell, value, one_event)

    cdef inline void _combine(self, int64_t cell, double f, int64_t i) noexcept nogil:
        """Fold a tile's state (f, i), later in the stream, into ``cell``."""
        cdef double cell_f = self.f64[cell] if self.f64 != NULL else 0
        cdef int64_t cell_i = self.i64[cell] if self.i64 != NULL else 0
        _combine_into(self.kind, &cell_f, &cell_i, f, i)
        if self.f64 != NULL:
            self.f64[cell] = cell_f
        if self.i64 != NULL:
            self.i64[cell] = cell_i

    # -- merge ----------------------------------------------------------------

    def merge(self, FeatureArena later, dst_slots):
        """Fold ``later`` (built from the part of the stream after this one)
        into this arena; ``dst_slots[i]`` is this arena's slot for its slot i."""
        self._check_compatible(later)
        cdef const int64_t[::1] dst = np.ascontiguousarray(dst_slots, dtype=np.int64)
        if dst.shape[0] > later.capacity:
            raise ValueError("merge: more slot mappings than the other arena has slots")
        if dst.shape[0] == 0:
            return
        self.reserve(np.max(np.asarray(dst)) + 1)
        cdef Py_ssize_t src
        cdef int64_t d, newest, lo, e, src_cell
        with nogil:
            for src in range(dst.shape[0]):
                d = dst[src]
                if self.hop_ms == 0:
                    self._combine(d, later.f64[src] if later.f64 != NULL else 0,
                                  later.i64[src] if later.i64 != NULL else 0)
                    continue
                newest = later.head[src]
                if newest == NO_TILE:
                    continue
                if newest > self.head[d]:
                    self._advance(d, self.head[d], newest)
                # later's tiles that are still inside this slot's (advanced) ring
                lo = self.head[d] - self.ring_tiles + 1
                for e in range(lo, newest + 1):
                    src_cell = src * self.ring_tiles + floor_mod(e, self.ring_tiles)
                    self._combine(d * self.ring_tiles + floor_mod(e, self.ring_tiles),
                                  later.f64[src_cell] if later.f64 != NULL else 0,
                                  later.i64[src_cell] if later.i64 != NULL else 0)
        self.late_dropped += later.late_dropped

    def _check_compatible(self, FeatureArena other):
        if (other.kind, other.hop_ms, other.window_tiles, other.ring_tiles) != \
                (self.kind, self.hop_ms, self.window_tiles, self.ring_tiles):
            raise ValueError(f"cannot merge {other!r} into {self!r}: different definitions")

    # -- read -----------------------------------------------------------------

    def read(self, slots, as_of):
        """Finalised values for ``slots`` as of event time ``as_of`` (epoch ms;
        a scalar or one per slot). Returns ``(values, valid)``: ``valid`` is
        false for slot -1 (unknown entity) and for empty windows of
        aggregations that have no value then (mean, min, max, first, last;
        count and sum of an empty window are 0)."""
        cdef const int64_t[::1] s = np.ascontiguousarray(slots, dtype=np.int64)
        cdef Py_ssize_t n = s.shape[0]
        cdef const int64_t[::1] t = np.ascontiguousarray(
            np.broadcast_to(np.asarray(as_of, dtype=np.int64), (n,)))
        values = np.empty(n, dtype=self.dtype)
        valid = np.empty(n, dtype=np.bool_)
        cdef uint8_t[::1] ok = valid.view(np.uint8)
        cdef double[::1] out_f
        cdef int64_t[::1] out_i
        if self.kind == COUNT:
            out_i = values
        else:
            out_f = values
        cdef Py_ssize_t k
        cdef double f
        cdef int64_t i
        with nogil:
            for k in range(n):
                if s[k] < 0 or s[k] >= self.capacity:
                    ok[k] = 0
                    if self.kind == COUNT:
                        out_i[k] = 0
                    else:
                        out_f[k] = NAN
                    continue
                self._window_state(s[k], t[k], &f, &i)
                if self.kind == COUNT:
                    out_i[k] = i
                    ok[k] = 1
                else:
                    out_f[k] = self._finalize(f, i, &ok[k])
        return values, valid

    cdef inline void _window_state(self, int64_t slot, int64_t as_of, double* f,
                                   int64_t* i) noexcept nogil:
        """Combine the tiles of the window ending at ``as_of`` into (f, i)."""
        f[0] = self.f64_empty
        i[0] = self.i64_empty
        if self.hop_ms == 0:
            if self.f64 != NULL:
                f[0] = self.f64[slot]
            if self.i64 != NULL:
                i[0] = self.i64[slot]
            return
        cdef int64_t newest = self.head[slot]
        if newest == NO_TILE:
            return
        cdef int64_t current = floor_div(as_of, self.hop_ms)
        cdef int64_t lo = max(current - self.window_tiles + 1, newest - self.ring_tiles + 1)
        cdef int64_t hi = min(current, newest)
        cdef int64_t e, cell
        for e in range(lo, hi + 1):
            cell = slot * self.ring_tiles + floor_mod(e, self.ring_tiles)
            _combine_into(self.kind, f, i,
                          self.f64[cell] if self.f64 != NULL else 0,
                          self.i64[cell] if self.i64 != NULL else 0)

    cdef inline double _finalize(self, double f, int64_t i, uint8_t* ok) noexcept nogil:
        cdef int kind = self.kind
        ok[0] = 1
        if kind == SUM:
            return f
        if kind == MEAN:
            if i == 0:
                ok[0] = 0
                return NAN
            return f / i
        if kind == FIRST or kind == LAST:
            if i == INT64_MAX or i == INT64_MIN:
                ok[0] = 0
            return f
        # MIN, MAX: NaN marks an empty window
        if isnan(f):
            ok[0] = 0
        return f

    # -- snapshot -------------------------------------------------------------

    def describe(self):
        """The parameters that, with ``export_arrays``, recreate this arena."""
        return {"aggregation": self.aggregation, "window_ms": self.window_ms,
                "hop_ms": self.hop_ms, "lateness_ms": self.lateness_ms}

    def export_arrays(self, int64_t n_slots):
        """The state of slots [0, n_slots) as arrays (copies), plus counters."""
        n_slots = min(n_slots, self.capacity)
        arrays = {"late_dropped": np.array([self.late_dropped], dtype=np.int64)}
        if self._f64 is not None:
            arrays["f64"] = self._f64[:n_slots * self.ring_tiles].copy()
        if self._i64 is not None:
            arrays["i64"] = self._i64[:n_slots * self.ring_tiles].copy()
        if self._head is not None:
            arrays["head"] = self._head[:n_slots].copy()
        return arrays

    @classmethod
    def from_arrays(cls, params, arrays):
        """Recreate an arena from ``describe()`` and ``export_arrays()``: bulk copies."""
        cdef FeatureArena arena = cls(**params, capacity=0)
        owners = {name: owner for name, owner in
                  (("f64", arena._f64), ("i64", arena._i64), ("head", arena._head))
                  if owner is not None}
        found = sorted(set(arrays) - {"late_dropped"})
        if found != sorted(owners) or "late_dropped" not in arrays:
            raise ValueError(f"{arena.aggregation} arena snapshot: expected arrays "
                             f"{sorted(owners) + ['late_dropped']}, found {sorted(arrays)}")
        cell_array = "f64" if "f64" in owners else "i64"
        n_cells = len(arrays[cell_array])
        if n_cells % arena.ring_tiles:
            raise ValueError(f"{arena.aggregation} arena snapshot: {n_cells} cells is not "
                             f"a multiple of {arena.ring_tiles} tiles")
        n_slots = n_cells // arena.ring_tiles
        for name in owners:
            expected = n_slots if name == "head" else n_cells
            if len(arrays[name]) != expected:
                raise ValueError(f"{arena.aggregation} arena snapshot: array {name} has "
                                 f"{len(arrays[name])} entries, expected {expected}")
        arena.reserve(n_slots)
        if arena._f64 is not None:
            arena._f64[:n_cells] = arrays["f64"]
        if arena._i64 is not None:
            arena._i64[:n_cells] = arrays["i64"]
        if arena._head is not None:
            arena._head[:n_slots] = arrays["head"]
        arena.late_dropped = int(arrays["late_dropped"][0])
        return arena

    def __repr__(self):
        window = "lifetime" if self.hop_ms == 0 else \
            f"window={self.window_ms}ms hop={self.hop_ms}ms lateness={self.lateness_ms}ms"
        return f"<FeatureArena {self.aggregation} {window} capacity={self.capacity}>"


cdef inline void _combine_into(int kind, double* f, int64_t* i, double tf, int64_t ti) noexcept nogil:
    """Fold tile (tf, ti), later in the stream, into the accumulator (f, i)."""
    if kind == COUNT:
        i[0] += ti
    elif kind == SUM:
        f[0] += tf
    elif kind == MEAN:
        f[0] += tf
        i[0] += ti
    elif kind == MIN:
        if not isnan(tf) and (isnan(f[0]) or tf < f[0]):
            f[0] = tf
    elif kind == MAX:
        if not isnan(tf) and (isnan(f[0]) or tf > f[0]):
            f[0] = tf
    elif kind == FIRST:
        # strictly earlier: among equal times the first to arrive stays
        if ti < i[0]:
            i[0] = ti
            f[0] = tf
    elif kind == LAST:
        # equal times: the last to arrive wins (an empty tile has INT64_MIN)
        if ti != INT64_MIN and ti >= i[0]:
            i[0] = ti
            f[0] = tf


def _grown(array, Py_ssize_t size, fill):
    """A copy of ``array`` extended to ``size`` entries, the new ones ``fill``."""
    grown = np.empty(size, dtype=array.dtype)
    grown[:len(array)] = array
    grown[len(array):] = fill
    return grown
