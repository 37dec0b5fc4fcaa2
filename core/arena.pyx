# cython: language_level=3
"""State arenas: the state of one aggregation over one window, for every entity.

An arena is a few typed, columnar numpy arrays indexed by slot (no per-entity
Python objects). Windowed arenas index them by ``slot * ring_tiles + tile``
and keep, per slot, ``head``: the epoch (``event_time // hop``) of the newest
tile.

Windows are built from tiles of one hop each (the model is Chronon's hops):

* lifetime: one tile that never expires (``hop_ms == 0``; no ``head``);
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

Value types: an arena keeps float64 values (NaN is a null and is skipped)
unless it is made with ``value_type="int64"`` (first, last, last_n, top_k,
distinct_count): then it takes int64 values -- an int64 column's, or a
string column's 64-bit codes -- and keeps them exactly, as bit patterns in
the same float64 cells (the kernels only copy and compare them, never
compute with them), so the float path is unchanged. Such an arena has no
in-band null: its nulls are left out by the mask. Reads return int64 values.

Every arena has the same contract: ``update`` (a batch of slots, event times,
values and an optional mask), ``merge`` (fold the state of the later part of a
stream), ``read`` (finalised values as of a time), and ``describe`` /
``export_arrays`` / ``from_arrays`` (snapshots by bulk copy). ``make_arena``
builds the right class for an aggregation name.
"""
from libc.math cimport NAN, isnan, log, pow
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from "tally_hash.h":
    uint64_t tally_hash_u64(uint64_t x) noexcept nogil
    void TALLY_PREFETCH(const void* p) noexcept nogil

cdef enum Kind:
    COUNT = 0
    SUM = 1
    MEAN = 2
    MIN = 3
    MAX = 4
    FIRST = 5
    LAST = 6

SCALAR_KINDS = {"count": COUNT, "sum": SUM, "mean": MEAN, "min": MIN, "max": MAX,
                "first": FIRST, "last": LAST}
# aggregation -> its integer parameter (None: it takes none) and that parameter's default
PARAMETERS = {"last_n": ("n", 10), "distinct_count": ("precision", 10), "top_k": ("k", 10),
              "histogram": ("k", 32)}
KINDS = {**SCALAR_KINDS, **{name: None for name in PARAMETERS}}

# Which arrays each scalar kind keeps per tile, and their value in an empty tile.
_SCALAR_LAYOUT = {
    COUNT: {"i64": 0},
    SUM: {"f64": 0.0},
    MEAN: {"f64": 0.0, "i64": 0},
    MIN: {"f64": np.nan},
    MAX: {"f64": np.nan},
    FIRST: {"f64": np.nan, "i64": INT64_MAX},
    LAST: {"f64": np.nan, "i64": INT64_MIN},
}

cdef int64_t NO_TILE = INT64_MIN
# Event times are epoch milliseconds within +-2^62 (+-146 million years), so
# that INT64_MIN and INT64_MAX stay free as "no event" markers.
MIN_EVENT_TIME = -(1 << 62)
MAX_EVENT_TIME = 1 << 62


VALUE_TYPES = ("float64", "int64")


def make_arena(str aggregation, int64_t window_ms=0, int64_t hop_ms=0, int64_t lateness_ms=0,
               param=None, int64_t capacity=1024, str value_type="float64"):
    """The arena of an aggregation; ``param`` is N of last_n, K of top_k or the
    precision (log2 of the register count) of distinct_count; ``value_type``
    "int64" keeps int64 values exactly (see the module doc)."""
    if aggregation in SCALAR_KINDS:
        if param is not None:
            raise ValueError(f"{aggregation} takes no parameter (got {param!r})")
        return FeatureArena(aggregation, window_ms, hop_ms, lateness_ms, capacity, value_type)
    if aggregation not in PARAMETERS:
        raise ValueError(f"unknown aggregation {aggregation!r}; "
                         f"expected one of {', '.join(KINDS)}")
    param = PARAMETERS[aggregation][1] if param is None else param
    if aggregation == "histogram":
        return TopKArena(param, window_ms, hop_ms, lateness_ms, capacity, value_type,
                         "histogram")
    cls = {"last_n": LastNArena, "distinct_count": DistinctCountArena,
           "top_k": TopKArena}[aggregation]
    return cls(param, window_ms, hop_ms, lateness_ms, capacity, value_type)


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


def _values_array(values, Py_ssize_t n, bint bits, bint needs_values, str name):
    """An update's values as contiguous float64 cells: float64 values, or (an
    int64 arena) int64 values as their bit patterns."""
    if values is None:
        if needs_values:
            raise ValueError(f"{name} needs values")
        values = np.zeros(n, dtype=np.float64)
    elif bits:
        values = np.asarray(values)
        if values.dtype.kind not in "iu":
            raise TypeError(f"{name} keeps int64 values, but got {values.dtype} values; "
                            "pass int64 values (a string column's codes)")
        values = np.ascontiguousarray(values, dtype=np.int64).view(np.float64)
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.shape[0] != n:
        raise ValueError(f"{name}: values and slots differ in length")
    return values


def _grown(array, Py_ssize_t size, fill):
    """A copy of ``array`` extended to ``size`` entries, the new ones ``fill``."""
    grown = np.empty(size, dtype=array.dtype)
    grown[:len(array)] = array
    grown[len(array):] = fill
    return grown


cdef class Batch:
    """Validated, contiguous views of one update batch."""
    cdef const int64_t[::1] slots
    cdef const int64_t[::1] ts
    cdef const double[::1] values
    cdef const uint8_t[::1] mask
    cdef bint has_mask
    cdef Py_ssize_t n
    cdef int64_t max_slot

    def __init__(self, slots, timestamps, values, mask, bint needs_values, str name,
                 bint bits=False):
        self.slots = np.ascontiguousarray(slots, dtype=np.int64)
        self.ts = np.ascontiguousarray(timestamps, dtype=np.int64)
        self.n = self.slots.shape[0]
        if self.ts.shape[0] != self.n:
            raise ValueError("slots and timestamps differ in length")
        if self.n and (np.min(np.asarray(self.ts)) < MIN_EVENT_TIME
                       or np.max(np.asarray(self.ts)) > MAX_EVENT_TIME):
            raise ValueError(f"event times must lie within [-2**62, 2**62] epoch ms; "
                             f"this batch spans [{np.min(np.asarray(self.ts))}, "
                             f"{np.max(np.asarray(self.ts))}]")
        self.values = _values_array(values, self.n, bits, needs_values, name)
        self.has_mask = mask is not None
        if self.has_mask:
            self.mask = np.ascontiguousarray(mask, dtype=np.bool_).view(np.uint8)
            if self.mask.shape[0] != self.n:
                raise ValueError("mask and slots differ in length")
        self.max_slot = -1
        if self.n:
            if np.min(np.asarray(self.slots)) < 0:
                raise ValueError("negative slot in update")
            self.max_slot = np.max(np.asarray(self.slots))

    cdef inline bint skips(self, Py_ssize_t i, bint nulls_skip) noexcept nogil:
        """Whether event i is filtered out, or a null that this aggregation skips."""
        return (self.has_mask and not self.mask[i]) or (nulls_skip and isnan(self.values[i]))


cdef class TiledArena:
    """The ring-of-tiles bookkeeping shared by windowed arenas, and the storage
    of their arrays: ``_arrays[name]`` holds ``_widths[name]`` cells per slot,
    new cells filled with ``_fills[name]``."""

    cdef readonly int64_t hop_ms            # 0: lifetime
    cdef readonly int64_t window_tiles
    cdef readonly int64_t ring_tiles
    cdef readonly int64_t capacity          # slots allocated
    cdef readonly int64_t late_dropped
    cdef readonly str value_type
    cdef bint bits                          # value_type int64: cells hold int64 bits
    cdef dict _arrays, _widths, _fills
    cdef int64_t* head

    def __init__(self, int64_t window_ms, int64_t hop_ms, int64_t lateness_ms):
        if window_ms == 0:
            self.hop_ms = 0
            self.window_tiles = self.ring_tiles = 1
        else:
            if hop_ms <= 0 or window_ms <= 0 or window_ms % hop_ms:
                raise ValueError(f"window {window_ms} ms must be a positive multiple "
                                 f"of its hop {hop_ms} ms")
            if lateness_ms < 0:
                raise ValueError(f"lateness {lateness_ms} ms must not be negative")
            self.hop_ms = hop_ms
            self.window_tiles = window_ms // hop_ms
            self.ring_tiles = self.window_tiles + (lateness_ms + hop_ms - 1) // hop_ms
        self.capacity = 0
        self.late_dropped = 0
        self.value_type, self.bits = "float64", False
        self._arrays, self._widths, self._fills = {}, {}, {}
        if self.hop_ms:
            self._declare("head", np.int64, 1, NO_TILE)

    def _set_value_type(self, str value_type, str name):
        if value_type not in VALUE_TYPES:
            raise ValueError(f"{name}: value_type {value_type!r} is unknown; use one of "
                             f"{', '.join(VALUE_TYPES)}")
        self.value_type, self.bits = value_type, value_type == "int64"

    def _typed(self, values, valid):
        """Read values from float64 cells as the arena's value type: an int64
        arena's cells hold int64 bit patterns (0 where invalid)."""
        if not self.bits:
            return values
        values = values.view(np.int64)
        values[~np.asarray(valid, dtype=bool)] = 0
        return values

    def _describe_value_type(self, dict params):
        # only int64 arenas name their value type: float64 arenas describe
        # themselves as they did before there were value types, so their
        # snapshots stay loadable unchanged
        if self.bits:
            params["value_type"] = self.value_type
        return params

    def _declare(self, name, dtype, width, fill):
        self._arrays[name] = np.empty(0, dtype)
        self._widths[name] = width
        self._fills[name] = fill

    cdef void _bind(self):
        """Refresh raw pointers after the arrays were replaced."""
        if self.hop_ms:
            self.head = <int64_t*>cnp.PyArray_DATA(self._arrays["head"])

    @property
    def window_ms(self):
        return self.hop_ms * self.window_tiles

    @property
    def lateness_ms(self):
        return self.hop_ms * (self.ring_tiles - self.window_tiles)

    @property
    def bytes_per_slot(self):
        return sum(self._arrays[name].dtype.itemsize * width
                   for name, width in self._widths.items())

    @property
    def nbytes(self):
        return sum(array.nbytes for array in self._arrays.values())

    def reserve(self, int64_t n_slots):
        """Make room for ``n_slots`` slots; new slots start empty."""
        if n_slots <= self.capacity:
            return
        cdef int64_t new_capacity = max(n_slots, self.capacity + self.capacity // 2)
        for name, array in self._arrays.items():
            self._arrays[name] = _grown(array, new_capacity * self._widths[name],
                                        self._fills[name])
        self.capacity = new_capacity
        self._bind()

    # -- the ring -------------------------------------------------------------

    cdef int64_t _cell_for_event(self, int64_t slot, int64_t ts) noexcept nogil:
        """The cell (slot * ring + tile) an event lands in, advancing the
        slot's ring; -1 if the event is too late."""
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

    cdef void _advance(self, int64_t slot, int64_t newest, int64_t epoch) noexcept nogil:
        """Empty the tiles that epochs (newest, epoch] reuse, and move the head."""
        cdef int64_t n_clear = self.ring_tiles
        if newest != NO_TILE and epoch - newest < n_clear:
            n_clear = epoch - newest
        cdef int64_t j
        for j in range(n_clear):
            self._clear(slot * self.ring_tiles + floor_mod(epoch - j, self.ring_tiles))
        self.head[slot] = epoch

    cdef void _clear(self, int64_t cell) noexcept nogil:
        pass

    cdef bint _window(self, int64_t slot, int64_t as_of, int64_t* lo, int64_t* hi) noexcept nogil:
        """The epochs [lo, hi] of the slot's tiles inside the window ending at
        ``as_of``; false if there are none. Lifetime: the single cell."""
        if self.hop_ms == 0:
            lo[0] = hi[0] = 0
            return True
        cdef int64_t newest = self.head[slot]
        if newest == NO_TILE:
            return False
        cdef int64_t current = floor_div(as_of, self.hop_ms)
        lo[0] = max(current - self.window_tiles + 1, newest - self.ring_tiles + 1)
        hi[0] = min(current, newest)
        return lo[0] <= hi[0]

    cdef inline int64_t _cell(self, int64_t slot, int64_t epoch) noexcept nogil:
        if self.hop_ms == 0:
            return slot
        return slot * self.ring_tiles + floor_mod(epoch, self.ring_tiles)

    # -- merge ----------------------------------------------------------------

    def merge(self, TiledArena later, dst_slots):
        """Fold ``later`` (built from the part of the stream after this one)
        into this arena; ``dst_slots[i]`` is this arena's slot for its slot i."""
        if type(later) is not type(self) or later.describe() != self.describe():
            raise ValueError(f"cannot merge {later!r} into {self!r}: different definitions")
        cdef const int64_t[::1] dst = np.ascontiguousarray(dst_slots, dtype=np.int64)
        if dst.shape[0] > later.capacity:
            raise ValueError("merge: more slot mappings than the other arena has slots")
        if dst.shape[0] == 0:
            return
        self.reserve(np.max(np.asarray(dst)) + 1)
        cdef Py_ssize_t src
        cdef int64_t d, newest, e
        for src in range(dst.shape[0]):
            d = dst[src]
            if self.hop_ms == 0:
                self._combine_cell(d, later, src)
                continue
            newest = later.head[src]
            if newest == NO_TILE:
                continue
            if newest > self.head[d]:
                self._advance(d, self.head[d], newest)
            # later's tiles that are still inside this slot's (advanced) ring
            for e in range(self.head[d] - self.ring_tiles + 1, newest + 1):
                self._combine_cell(self._cell(d, e), later, later._cell(src, e))
        self.late_dropped += later.late_dropped

    cdef void _combine_cell(self, int64_t dst, TiledArena later, int64_t src):
        """Fold cell ``src`` of ``later`` into this arena's cell ``dst``."""
        raise NotImplementedError

    # -- snapshot -------------------------------------------------------------

    def describe(self):
        """The parameters that, with ``export_arrays``, recreate this arena."""
        raise NotImplementedError

    def export_arrays(self, int64_t n_slots):
        """The state of slots [0, n_slots) as arrays (copies), plus counters."""
        n_slots = min(n_slots, self.capacity)
        arrays = {name: array[:n_slots * self._widths[name]].copy()
                  for name, array in self._arrays.items()}
        arrays["late_dropped"] = np.array([self.late_dropped], dtype=np.int64)
        return arrays

    @classmethod
    def from_arrays(cls, params, arrays):
        """Recreate an arena from ``describe()`` and ``export_arrays()``: bulk copies."""
        cdef TiledArena arena = make_arena(**params, capacity=0)
        if type(arena) is not cls and cls is not TiledArena:
            raise ValueError(f"{cls.__name__} snapshot describes a {type(arena).__name__}")
        arena._restore(arrays)
        return arena

    def _restore(self, arrays):
        name = self.describe()["aggregation"]
        expected = sorted(list(self._arrays) + ["late_dropped"])
        if sorted(arrays) != expected:
            raise ValueError(f"{name} arena snapshot: expected arrays {expected}, "
                             f"found {sorted(arrays)}")
        widths = self._widths
        first = next(iter(self._arrays))
        if len(arrays[first]) % widths[first]:
            raise ValueError(f"{name} arena snapshot: array {first} has {len(arrays[first])} "
                             f"entries, not a multiple of {widths[first]} per slot")
        n_slots = len(arrays[first]) // widths[first]
        for array_name, width in widths.items():
            if len(arrays[array_name]) != n_slots * width:
                raise ValueError(f"{name} arena snapshot: array {array_name} has "
                                 f"{len(arrays[array_name])} entries, expected "
                                 f"{n_slots * width}")
        self.reserve(n_slots)
        for array_name, width in widths.items():
            self._arrays[array_name][:n_slots * width] = arrays[array_name]
        self.late_dropped = int(arrays["late_dropped"][0])

    def _window_text(self):
        if self.hop_ms == 0:
            return "lifetime"
        return f"window={self.window_ms}ms hop={self.hop_ms}ms lateness={self.lateness_ms}ms"

    def __repr__(self):
        return (f"<{type(self).__name__} {self.describe()['aggregation']} "
                f"{self._window_text()} capacity={self.capacity}>")


cdef class FeatureArena(TiledArena):
    """count, sum, mean, min, max, first and last.

    Per tile: ``f64`` holds a float (sum, min, max, the value of first/last),
    ``i64`` an int (count, or the event time of first/last)."""

    cdef readonly str aggregation
    cdef int kind
    cdef double* f64
    cdef int64_t* i64
    cdef double f64_empty
    cdef int64_t i64_empty

    def __init__(self, str aggregation, int64_t window_ms=0, int64_t hop_ms=0,
                 int64_t lateness_ms=0, int64_t capacity=1024, str value_type="float64"):
        if aggregation not in SCALAR_KINDS:
            raise ValueError(f"unknown aggregation {aggregation!r}; "
                             f"expected one of {', '.join(SCALAR_KINDS)}")
        super().__init__(window_ms, hop_ms, lateness_ms)
        self.aggregation = aggregation
        self.kind = SCALAR_KINDS[aggregation]
        self._set_value_type(value_type, aggregation)
        if self.bits and self.kind != FIRST and self.kind != LAST:
            raise ValueError(f"{aggregation} computes with its values: only first and last "
                             "keep int64 values")
        layout = _SCALAR_LAYOUT[self.kind]
        self.f64_empty = layout.get("f64", NAN)
        self.i64_empty = layout.get("i64", 0)
        for name, dtype in (("f64", np.float64), ("i64", np.int64)):
            if name in layout:
                self._declare(name, dtype, self.ring_tiles, layout[name])
        self.reserve(capacity)

    cdef void _bind(self):
        TiledArena._bind(self)
        self.f64 = <double*>cnp.PyArray_DATA(self._arrays["f64"]) if "f64" in self._arrays else NULL
        self.i64 = <int64_t*>cnp.PyArray_DATA(self._arrays["i64"]) if "i64" in self._arrays else NULL

    @property
    def dtype(self):
        """The dtype of finalised values."""
        return np.dtype(np.int64) if self.kind == COUNT or self.bits else np.dtype(np.float64)

    def describe(self):
        return self._describe_value_type(
            {"aggregation": self.aggregation, "window_ms": self.window_ms,
             "hop_ms": self.hop_ms, "lateness_ms": self.lateness_ms})

    def update(self, slots, timestamps, values=None, mask=None):
        """Fold a batch of events into the arena.

        ``slots`` and ``timestamps`` (event time, epoch ms) are int64 arrays;
        ``values`` a float64 array (NaN is a null and is skipped; unused by
        count), int64 for an int64 arena; ``mask`` an optional bool array of
        the events to apply (a feature's filter, and the nulls of an int64
        arena). Events are applied in array order.
        """
        cdef Batch b = Batch(slots, timestamps, values, mask, self.kind != COUNT,
                             self.aggregation, self.bits)
        self.reserve(b.max_slot + 1)
        if b.n == 0:
            return
        cdef const int64_t* s = &b.slots[0]
        cdef const int64_t* t = &b.ts[0]
        cdef const double* v = &b.values[0]
        cdef Py_ssize_t i
        cdef int64_t cell, hop = self.hop_ms, ring = self.ring_tiles
        cdef int64_t epoch = 0, tile = 0, epoch_lo = 1, epoch_hi = 0
        cdef bint nulls_skip = self.kind != COUNT and not self.bits
        with nogil:
            for i in range(b.n):
                if i + 16 < b.n:
                    if hop:
                        TALLY_PREFETCH(&self.head[s[i + 16]])
                    if self.f64 != NULL:
                        TALLY_PREFETCH(&self.f64[s[i + 16] * ring])
                    if self.i64 != NULL:
                        TALLY_PREFETCH(&self.i64[s[i + 16] * ring])
                if b.skips(i, nulls_skip):
                    continue
                if hop == 0:
                    cell = s[i]
                else:
                    if not (epoch_lo <= t[i] < epoch_hi):   # another epoch: divide
                        epoch = floor_div(t[i], hop)
                        tile = floor_mod(epoch, ring)
                        epoch_lo = epoch * hop
                        epoch_hi = epoch_lo + hop
                    cell = self._event_cell(s[i], epoch, tile)
                    if cell < 0:
                        continue
                self._apply(cell, t[i], v[i])

    cdef inline int64_t _event_cell(self, int64_t slot, int64_t epoch, int64_t tile) noexcept nogil:
        """_cell_for_event without virtual calls or a division per cleared tile."""
        cdef int64_t newest = self.head[slot]
        cdef int64_t base = slot * self.ring_tiles
        cdef int64_t n_clear, j, k
        if epoch > newest:
            n_clear = self.ring_tiles
            if newest != NO_TILE and epoch - newest < n_clear:
                n_clear = epoch - newest
            k = tile
            for j in range(n_clear):
                if self.f64 != NULL:
                    self.f64[base + k] = self.f64_empty
                if self.i64 != NULL:
                    self.i64[base + k] = self.i64_empty
                k = k - 1 if k > 0 else self.ring_tiles - 1
            self.head[slot] = epoch
        elif epoch <= newest - self.ring_tiles:
            self.late_dropped += 1
            return -1
        return base + tile

    cdef void _clear(self, int64_t cell) noexcept nogil:
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

    cdef void _combine_cell(self, int64_t dst, TiledArena later, int64_t src):
        cdef FeatureArena other = <FeatureArena>later
        self._combine(dst, other.f64[src] if other.f64 != NULL else 0,
                      other.i64[src] if other.i64 != NULL else 0)

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
        values = np.empty(n, dtype=np.int64 if self.kind == COUNT else np.float64)
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
        return self._typed(values, valid), valid

    cdef inline void _window_state(self, int64_t slot, int64_t as_of, double* f,
                                   int64_t* i) noexcept nogil:
        """Combine the tiles of the window ending at ``as_of`` into (f, i)."""
        f[0] = self.f64_empty
        i[0] = self.i64_empty
        cdef int64_t lo, hi, e, cell
        if not self._window(slot, as_of, &lo, &hi):
            return
        for e in range(lo, hi + 1):
            cell = self._cell(slot, e)
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


include "sketches.pxi"
include "replay.pxi"
