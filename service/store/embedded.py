"""The embedded reader: Tally's C API (``cext/``, libtally) driven from Python
through ctypes, for a process that serves features without the Python LMDB
binding, and as the Python twin that tests the C library.

``EmbeddedReader(path).get(view, key)`` answers exactly as
``LmdbStore.get`` does (same dict, same None for a missing entity), but the
lookup, the key encoding and the record checks run in libtally: each call
takes a fresh snapshot (``tally_txn_renew``), finds the record, decodes it
where it lies in the memory map with ``tally.core.record``'s decoder (as
LmdbStore decodes its copies) and releases the snapshot (``tally_txn_reset``).
``views()`` lists the store's views (``tally_store_views``);
``service_vectors(name, rows)`` reads a feature service's vectors through
``tally_service_get``, as ``ServedService.read`` does over any store.

libtally binds an open view to the version served when it was opened, and
so does a reader: ``schema(view)`` is that version's, ``served_version(view)``
the one served now; a feature service is bound, with its views, when the
reader first reads it. A reader that must follow promotions compares the two
and reopens (the lookup server does, between requests).

The library is built by ``setup.py`` as ``tally/_libtally.<abi>.so`` (a plain
C shared library, never imported); ``TALLY_LIBTALLY=/path/to/libtally.so``
overrides it, e.g. with ``cext/build/libtally.so`` from ``make -C cext``.

As with LMDB itself, open a store once per process: do not keep an
``EmbeddedReader`` and an ``LmdbStore`` on the same path open together in one
process (another process may write meanwhile, that is the point).
"""
import ctypes
import importlib.util
import os
import threading

import numpy as np

from tally.core.errors import RecordError
from tally.core.record import INT64_MAX, INT64_MIN, RecordDecoder, ViewSchema
from tally.core.serving import ServedColumn, ServedService
from tally.core.types import KEY_TYPES, VALUE_TYPES
from tally.service.store import StoreError

# Return codes, as in cext/tally.h.
TALLY_NOTFOUND = -30500
TALLY_ENOVIEW = -30501
TALLY_EINVAL = -30502
TALLY_ECORRUPT = -30503
TALLY_ESCHEMA = -30504
TALLY_ELAYOUT = -30505
TALLY_EVIEWS = -30506
TALLY_ETRUNCATED = -30507
TALLY_ENOSERVICE = -30508
TALLY_ESPACE = -30509
TALLY_KEY_INT64, TALLY_KEY_STRING = 0, 1
_ENOENT = 2
# tally_view_name_fn; the name as a pointer, since string_at(name, len) reads
# it whole where c_char_p would stop at a NUL.
_VIEW_NAME_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


class LibtallyError(OSError):
    """A failure reported by libtally with no closer Python meaning (an LMDB
    or system error); ``errno`` is the library's return code."""


class _Record(ctypes.Structure):
    """tally_record: never read its fields except to copy the bytes out (the
    record decoder reads them in C: ``RecordDecoder.decode_found``)."""
    _fields_ = [("data", ctypes.c_void_p), ("view", ctypes.c_void_p),
                ("size", ctypes.c_size_t)]


class _Key(ctypes.Structure):
    """tally_key: one entity's key of a feature service request."""
    _fields_ = [("int64", ctypes.c_int64), ("string", ctypes.c_char_p),
                ("len", ctypes.c_size_t)]


def library_path():
    """Where libtally is: $TALLY_LIBTALLY, else the one setup.py built."""
    path = os.environ.get("TALLY_LIBTALLY")
    if path:
        return path
    spec = importlib.util.find_spec("tally._libtally")
    if spec is None or not spec.origin:
        raise ImportError("libtally is not built: run `python setup.py build_ext --inplace` "
                          "(or `pip install -e .`), or set TALLY_LIBTALLY to "
                          "cext/build/libtally.so after `make -C cext`")
    return spec.origin


_lib = None
_lib_lock = threading.Lock()


def _library():
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _declare(ctypes.CDLL(library_path()))
        return _lib


def _declare(lib):
    p, i, sz, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_int64
    out = ctypes.POINTER(ctypes.c_void_p)
    rec = ctypes.POINTER(_Record)
    signatures = {
        "tally_version": (ctypes.c_char_p, [ctypes.POINTER(i)] * 3),
        "tally_strerror": (ctypes.c_char_p, [i]),
        "tally_store_open": (i, [ctypes.c_char_p, out]),
        "tally_store_close": (None, [p]),
        "tally_store_views": (i, [p, _VIEW_NAME_FN, p]),
        "tally_store_service": (i, [p, ctypes.c_char_p, ctypes.c_char_p, sz,
                                    ctypes.POINTER(sz)]),
        "tally_view_open": (i, [p, ctypes.c_char_p, out]),
        "tally_view_close": (None, [p]),
        "tally_view_version": (ctypes.c_uint32, [p]),
        "tally_view_key_type": (i, [p]),
        "tally_view_feature_count": (sz, [p]),
        "tally_view_record_size": (sz, [p]),
        "tally_view_feature_name": (ctypes.c_char_p, [p, sz]),
        "tally_view_feature_type": (i, [p, sz]),
        "tally_txn_begin": (i, [p, out]),
        "tally_txn_reset": (None, [p]),
        "tally_txn_renew": (i, [p]),
        "tally_txn_end": (None, [p]),
        "tally_get_int64": (i, [p, p, i64, rec]),
        "tally_get_string": (i, [p, p, ctypes.c_char_p, sz, rec]),
        "tally_get_many_int64": (i, [p, p, ctypes.POINTER(i64), sz, rec,
                                     ctypes.POINTER(i)]),
        "tally_get_many_string": (i, [p, p, ctypes.POINTER(ctypes.c_char_p),
                                      ctypes.POINTER(sz), sz, rec, ctypes.POINTER(i)]),
        "tally_view_name": (ctypes.c_char_p, [p]),
        "tally_service_open": (i, [p, ctypes.c_char_p, out]),
        "tally_service_close": (None, [p]),
        "tally_service_version": (ctypes.c_uint32, [p]),
        "tally_service_column_count": (sz, [p]),
        "tally_service_column_name": (ctypes.c_char_p, [p, sz]),
        "tally_service_column_view": (i, [p, sz]),
        "tally_service_column_feature": (i, [p, sz]),
        "tally_service_entity_count": (sz, [p]),
        "tally_service_entity_name": (ctypes.c_char_p, [p, sz]),
        "tally_service_entity_key_type": (i, [p, sz]),
        "tally_service_view_count": (sz, [p]),
        "tally_service_view": (p, [p, sz]),
        "tally_service_view_entity": (i, [p, sz]),
        "tally_service_get": (i, [p, p, ctypes.POINTER(_Key), rec, ctypes.POINTER(i)]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def library_version():
    """The loaded libtally's version string, e.g. "libtally 0.1.0"."""
    return _library().tally_version(None, None, None).decode()


def strerror(code):
    return _library().tally_strerror(code).decode()


def _error(code, what):
    """The exception for a libtally return code (one place, as pyarrow's
    check_status): the same classes LmdbStore raises where there is one."""
    message = f"{what}: {strerror(code)}"
    if code in (TALLY_ECORRUPT, TALLY_ESCHEMA, TALLY_ELAYOUT):
        return RecordError(message)
    if code == TALLY_EINVAL:
        return ValueError(message)
    return LibtallyError(code, message)


class _View:
    """An open tally_view, its schema as libtally read it, and its decoder."""

    def __init__(self, lib, handle, name):
        self.handle = handle
        self.key_type = lib.tally_view_key_type(handle)
        features = tuple((lib.tally_view_feature_name(handle, i).decode(),
                          VALUE_TYPES[lib.tally_view_feature_type(handle, i)])
                         for i in range(lib.tally_view_feature_count(handle)))
        self.schema = ViewSchema(name, lib.tally_view_version(handle), KEY_TYPES[self.key_type],
                                 features)
        size = lib.tally_view_record_size(handle)
        if size != self.schema.fixed_size:              # libtally and record.py disagree
            raise RecordError(f"view {name!r}: libtally's records have {size} fixed bytes, "
                              f"tally.core.record's {self.schema.fixed_size}")
        self.decoder = RecordDecoder(self.schema)
        self.decode = self.decoder.decode


class _Service:
    """An open tally_service: its views' decoders and its served form, both
    in libtally's order and read from the handle (so they agree with it)."""

    def __init__(self, lib, handle, name):
        self.handle = handle
        self.views = [_View(lib, view, lib.tally_view_name(view).decode())
                      for view in (lib.tally_service_view(handle, v)
                                   for v in range(lib.tally_service_view_count(handle)))]
        n_entities = lib.tally_service_entity_count(handle)
        self.entities = [lib.tally_service_entity_name(handle, e).decode()
                         for e in range(n_entities)]
        self.int64_keys = [lib.tally_service_entity_key_type(handle, e) == TALLY_KEY_INT64
                           for e in range(n_entities)]
        self.served = ServedService(name, lib.tally_service_version(handle), tuple(
            self._column(lib, i) for i in range(lib.tally_service_column_count(handle))))

    def _column(self, lib, i):
        v = lib.tally_service_column_view(self.handle, i)
        view = self.views[v].schema
        return ServedColumn(lib.tally_service_column_name(self.handle, i).decode(), view.view,
                            view.features[lib.tally_service_column_feature(self.handle, i)][0],
                            self.entities[lib.tally_service_view_entity(self.handle, v)])

    def set_keys(self, request, keys, r):
        """Row r's keys ({entity: [key per row]}) into the tally_key array."""
        for e, (entity, int64) in enumerate(zip(self.entities, self.int64_keys)):
            key = keys[entity][r]
            if int64:
                if not INT64_MIN <= key <= INT64_MAX:         # ctypes would wrap it
                    raise OverflowError(f"{entity} key {key!r} does not fit in an int64")
                request[e].int64 = key
            else:
                raw = str(key).encode()
                request[e].string, request[e].len = raw, len(raw)


class EmbeddedReader:
    """A read-only handle on an online store through libtally. Thread-safe:
    each thread gets its own read transaction."""

    def __init__(self, path):
        self.path = str(path)
        self._lib = _library()
        handle = ctypes.c_void_p()
        rc = self._lib.tally_store_open(os.fsencode(self.path), ctypes.byref(handle))
        if rc == _ENOENT:
            raise StoreError(f"no online store at {self.path!r}; run the pipeline first "
                             "or pass the right --store path")
        if rc == TALLY_ETRUNCATED:      # as LmdbStore's check says it
            raise StoreError(f"the online store {self.path!r} is truncated: data.mdb is "
                             "shorter than its last page; delete it with its checkpoints and "
                             "let tally serve recompute both from the topic")
        if rc:
            raise _error(rc, f"tally_store_open({self.path!r})")
        self._store = handle.value
        lib = self._lib                 # bound once: these run on every get
        self._renew, self._reset = lib.tally_txn_renew, lib.tally_txn_reset
        self._get_int64, self._get_string = lib.tally_get_int64, lib.tally_get_string
        self._views = {}
        self._services = {}             # name -> _Service
        self._txns = []                 # every thread's transaction, to end on close
        self._local = threading.local()
        self._lock = threading.Lock()

    def close(self):
        if self._store is None:
            return
        with self._lock:
            for txn in self._txns:
                self._lib.tally_txn_end(txn)
            for view in self._views.values():
                self._lib.tally_view_close(view.handle)
            for service in self._services.values():
                self._lib.tally_service_close(service.handle)
            self._lib.tally_store_close(self._store)
            self._txns, self._views, self._services, self._store = [], {}, {}, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _view(self, name):
        view = self._views.get(name)
        if view is not None:
            return view
        with self._lock:
            if name not in self._views:
                handle = self._open_view(name)
                try:
                    self._views[name] = _View(self._lib, handle, name)
                except Exception:
                    self._lib.tally_view_close(handle)
                    raise
            return self._views[name]

    def _open_view(self, name):
        """A new tally_view handle on ``name``: the caller closes it."""
        if self._store is None:
            raise ValueError("EmbeddedReader is closed")
        if "\0" in name:       # a C string would end there: "a\0x" would open "a"
            raise StoreError(f"unknown view {name!r} in {self.path!r}: no view name holds a NUL")
        handle = ctypes.c_void_p()
        rc = self._lib.tally_view_open(self._store, name.encode(), ctypes.byref(handle))
        if rc == TALLY_ENOVIEW:
            raise StoreError(f"unknown view {name!r} in {self.path!r}")
        if rc:
            raise _error(rc, f"tally_view_open({name!r})")
        return handle.value

    def _snapshot(self):
        """This thread's transaction and record, renewed: a fresh snapshot."""
        state = getattr(self._local, "state", None)
        if state is None:
            handle = ctypes.c_void_p()
            with self._lock:
                if self._store is None:
                    raise ValueError("EmbeddedReader is closed")
                rc = self._lib.tally_txn_begin(self._store, ctypes.byref(handle))
                if rc:
                    raise _error(rc, "tally_txn_begin")
                self._txns.append(handle.value)
            record = _Record()
            state = self._local.state = (handle.value, record, ctypes.byref(record))
            return state
        rc = self._renew(state[0])
        if rc:
            raise _error(rc, "tally_txn_renew")
        return state

    def views(self):
        """The names of the views the store serves, in the store's order (as
        ``LmdbStore.views``)."""
        names = []

        def collect(name, length, _ctx):
            names.append(ctypes.string_at(name, length))
            return 0
        with self._lock:                # not closed under the listing's feet
            if self._store is None:
                raise ValueError("EmbeddedReader is closed")
            rc = self._lib.tally_store_views(self._store, _VIEW_NAME_FN(collect), None)
        if rc:
            raise _error(rc, "tally_store_views")
        return [name.decode() for name in names]

    def service(self, name):
        """The stored definition (bytes) of feature service ``name``; see
        ``tally.core.serving``."""
        length, cap = ctypes.c_size_t(), 4096
        while True:
            buf = ctypes.create_string_buffer(cap)
            with self._lock:
                if self._store is None:
                    raise ValueError("EmbeddedReader is closed")
                rc = self._lib.tally_store_service(self._store, name.encode(), buf, cap,
                                                   ctypes.byref(length))
            if rc == TALLY_ESPACE:
                cap = length.value + 1
                continue
            if rc == TALLY_ENOSERVICE:
                raise StoreError(f"unknown feature service {name!r}")
            if rc:
                raise _error(rc, "tally_store_service")
            return buf.raw[:length.value]

    def _service(self, name):
        service = self._services.get(name)
        if service is not None:
            return service
        with self._lock:
            if name not in self._services:
                self._services[name] = self._open_service(name)
            return self._services[name]

    def _open_service(self, name):
        if self._store is None:
            raise ValueError("EmbeddedReader is closed")
        if "\0" in name:
            raise StoreError(f"unknown feature service {name!r}: no name holds a NUL")
        handle = ctypes.c_void_p()
        rc = self._lib.tally_service_open(self._store, name.encode(), ctypes.byref(handle))
        if rc == TALLY_ENOSERVICE:
            raise StoreError(f"unknown feature service {name!r} in {self.path!r}")
        if rc == TALLY_ENOVIEW:
            raise StoreError(f"feature service {name!r} reads a view {self.path!r} does not "
                             "serve; run tally serve for its views")
        if rc:
            raise _error(rc, f"tally_service_open({name!r})")
        try:
            return _Service(self._lib, handle.value, name)
        except Exception:
            self._lib.tally_service_close(handle.value)
            raise

    def service_vectors(self, name, rows):
        """The vectors of request ``rows`` (dicts of entity keys) of feature
        service ``name``, from one snapshot: as ``ServedService.read`` gives
        (a list of {column: value}, None where the entity has no record)."""
        service = self._service(name)
        keys = service.served.keys_of(rows)     # KeyError naming a missing entity
        n_views = len(service.views)
        request = (_Key * len(service.entities))()
        records, found = (_Record * n_views)(), (ctypes.c_int * n_views)()
        raws = [[] for _ in range(n_views)]
        txn = self._snapshot()[0]
        try:
            for r in range(len(rows)):
                service.set_keys(request, keys, r)
                rc = self._lib.tally_service_get(txn, service.handle, request, records, found)
                if rc:
                    raise _error(rc, f"service {name!r} row {r}")
                for v, view_raws in enumerate(raws):        # copy before the reset
                    view_raws.append(ctypes.string_at(records[v].data, records[v].size)
                                     if found[v] else None)
        finally:
            self._reset(txn)
        return service.served.assemble(
            {view.schema.view: [None if raw is None else view.decode(raw) for raw in view_raws]
             for view, view_raws in zip(service.views, raws)}, rows)

    def schema(self, view):
        """The ViewSchema this reader decodes ``view`` with: that of the
        version served when the reader first opened the view."""
        return self._view(view).schema

    def served_version(self, view):
        """The version of ``view`` the store serves now (read afresh, unlike
        ``schema``)."""
        with self._lock:
            handle = self._open_view(view)
        try:
            return self._lib.tally_view_version(handle)
        finally:
            self._lib.tally_view_close(handle)

    def get(self, view, key):
        """The decoded record for ``key``, or None if the entity has none."""
        v = self._views.get(view) or self._view(view)
        if v.key_type == TALLY_KEY_INT64:
            if not INT64_MIN <= key <= INT64_MAX:         # ctypes would wrap it
                raise OverflowError(f"key {key!r} does not fit in an int64")
        else:
            key = str(key).encode()
        txn, record, record_ref = self._snapshot()
        try:
            if v.key_type == TALLY_KEY_INT64:
                rc = self._get_int64(txn, v.handle, key, record_ref)
            else:
                rc = self._get_string(txn, v.handle, key, len(key), record_ref)
            if rc == TALLY_NOTFOUND:
                return None
            if rc:
                raise _error(rc, f"get {view!r} {key!r}")
            return v.decoder.decode_at(record.data, record.size)    # before the reset
        finally:
            self._reset(txn)

    def get_many(self, view, keys):
        """Decoded records for ``keys`` from one snapshot; None where an
        entity has no record."""
        v = self._view(view)
        n = len(keys)
        if n == 0:
            return []
        records = (_Record * n)()
        status = (ctypes.c_int * n)()
        if v.key_type == TALLY_KEY_INT64:
            ints = np.ascontiguousarray(np.asarray(keys, dtype=np.int64))
            args = (ints.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), n)
            call = self._lib.tally_get_many_int64
        else:
            raw_keys = [str(k).encode() for k in keys]
            args = ((ctypes.c_char_p * n)(*raw_keys),
                    (ctypes.c_size_t * n)(*map(len, raw_keys)), n)
            call = self._lib.tally_get_many_string
        txn = self._snapshot()[0]
        try:
            rc = call(txn, v.handle, *args, records, status)
            if rc:
                raise _error(rc, f"get_many {view!r}")
            # decoded in the memory map, before the reset: no copy
            return v.decoder.decode_found(ctypes.addressof(records), ctypes.addressof(status), n)
        finally:
            self._reset(txn)
