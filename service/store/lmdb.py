"""The embedded online store: LMDB, one named database per feature view version.

Readers in other processes (the C API, ``tally get``) open the environment
read-only; LMDB's MVCC means they never block the writer and never see a
half-written record. The ``__schemas__`` database maps a view name to the
binary ``ViewSchema`` (see ``tally.core.record``) of the version it serves,
and ``<view>@v<n>`` to version n's; version n's records live in the database
``view:<view>@v<n>``, as ``tally.core.record`` bytes (layout 1 for a
numbers-only view, layout 2 with strings and lists). Promoting a version rewrites the one schema entry, so
readers switch atomically.
"""
import itertools
import os

import lmdb

from tally.core.errors import RecordError
from tally.core.events import MAX_KEY_BYTES   # longer (or empty) keys are never stored
from tally.core.record import ViewSchema, decode_key, decode_records, encode_keys
from tally.service.store import RecordRefused, StoreError

SCHEMAS_DB = b"__schemas__"
# feature services live in __schemas__ too, under "_service:<name>" (view names
# never start with "_"), so that readers switch to a new one atomically
SERVICE_PREFIX = b"_service:"
DEFAULT_MAP_SIZE = 64 << 30     # address space only; the file grows as written


class LmdbStore:
    def __init__(self, path, readonly=False, map_size=DEFAULT_MAP_SIZE, max_views=126):
        self.path = str(path)
        if readonly and not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise StoreError(f"no online store at {self.path!r}; run the pipeline first "
                             "or pass the right --store path")
        if not readonly:
            os.makedirs(self.path, exist_ok=True)
        # sync=False: a crash can lose the newest writes, never corrupt the file;
        # the checkpoint, not the store, is the durable truth, and records are
        # rewritten idempotently on replay. flush() syncs at checkpoints.
        try:
            self.env = lmdb.open(self.path, map_size=map_size, max_dbs=max_views + 1,
                                 readonly=readonly, sync=False, lock=True)
        except lmdb.Error as error:
            raise StoreError(f"the online store {self.path!r} cannot be opened: {error}; "
                             "if it is corrupt, delete it with its checkpoints and let tally "
                             "serve recompute both from the topic") from None
        self._check_not_truncated()
        self.readonly = readonly
        self._schemas_db = self.env.open_db(SCHEMAS_DB, create=not readonly)
        self._dbs = {}

    def _check_not_truncated(self):
        """A data file shorter than its own last page: reading past its end
        through the memory map would kill the process with SIGBUS."""
        data = os.path.join(self.path, "data.mdb")
        needed = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        actual = os.path.getsize(data) if os.path.exists(data) else needed
        if actual < needed:
            self.env.close()
            raise StoreError(f"the online store {self.path!r} is truncated: data.mdb has "
                             f"{actual:,} bytes, its pages need {needed:,}; delete it with its "
                             "checkpoints and let tally serve recompute both from the topic")

    def close(self):
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def register_view(self, schema: ViewSchema, current=True, expiry_ms=0):
        """Create the database of this view version and record its schema; a
        version registered with ``current=False`` (a candidate being computed
        beside the serving one) is served only once ``promote``d. LMDB keeps
        records until rewritten: ``expiry_ms`` is not used."""
        self._db(schema.view, schema.version, create=True)
        with self.env.begin(write=True, db=self._schemas_db) as txn:
            txn.put(_versioned(schema.view, schema.version), schema.to_bytes())
            if current:
                txn.put(schema.view.encode(), schema.to_bytes())

    def promote(self, view, version):
        """Serve ``version`` of ``view`` from now on: one atomic pointer switch."""
        with self.env.begin(write=True, db=self._schemas_db) as txn:
            raw = txn.get(_versioned(view, version))
            if raw is None:
                raise StoreError(f"view {view!r} has no version {version} in this store")
            txn.put(view.encode(), raw)

    def schema(self, view, version=None) -> ViewSchema:
        """The schema of the served version of ``view`` (or of ``version``)."""
        key = view.encode() if version is None else _versioned(view, version)
        with self.env.begin(db=self._schemas_db) as txn:
            raw = txn.get(key)
        if raw is None:
            raise StoreError(f"unknown view {view!r}" +
                             (f" version {version}" if version is not None else "") +
                             f"; known views: {self.views()}")
        return ViewSchema.from_bytes(view, raw)

    def views(self):
        with self.env.begin(db=self._schemas_db) as txn:
            return [bytes(k).decode() for k in txn.cursor().iternext(values=False)
                    if b"@v" not in bytes(k) and not bytes(k).startswith(SERVICE_PREFIX)]

    def put_service(self, name, definition):
        """Store feature service ``name``'s definition (bytes, see
        ``tally.core.serving``), replacing the one before atomically."""
        with self.env.begin(write=True, db=self._schemas_db) as txn:
            txn.put(SERVICE_PREFIX + name.encode(), bytes(definition))

    def service(self, name):
        """The stored definition of feature service ``name``."""
        with self.env.begin(db=self._schemas_db) as txn:
            raw = txn.get(SERVICE_PREFIX + name.encode())
        if raw is None:
            raise StoreError(f"unknown feature service {name!r}; known: {self.services()}")
        return bytes(raw)

    def services(self):
        with self.env.begin(db=self._schemas_db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(SERVICE_PREFIX):
                return []
            return [bytes(k)[len(SERVICE_PREFIX):].decode()
                    for k in cursor.iternext(values=False)
                    if bytes(k).startswith(SERVICE_PREFIX)]

    def drop_service(self, name):
        with self.env.begin(write=True, db=self._schemas_db) as txn:
            txn.delete(SERVICE_PREFIX + name.encode())

    def _db(self, view, version, create=False):
        name = _db_name(view, version)
        if name not in self._dbs:
            self._dbs[name] = self.env.open_db(name, create=create)
        return self._dbs[name]

    def write(self, view, keys, records, version=None):
        """Put one record per key (:class:`tally.core.record.Records`), in one
        write transaction, into the served version or the given one."""
        schema = self.schema(view, version)
        try:
            encoded = records.encode(schema)
        except RecordError as error:       # a value its type cannot hold, a record too big
            raise RecordRefused(f"view {view!r}: {error}") from error
        items = zip(encode_keys(schema.key_type, keys), encoded)
        try:
            with self.env.begin(write=True, db=self._db(view, schema.version)) as txn:
                txn.cursor().putmulti(items)
        except lmdb.BadValsizeError as error:
            raise RecordRefused(f"view {view!r}: LMDB refused a key or record ({error})") \
                from error

    def get_many(self, view, keys, version=None):
        """Decoded records for ``keys``; None for entities with no record. The
        schema and the records are read in one transaction, so a concurrent
        promotion is seen whole or not at all."""
        schema_key = view.encode() if version is None else _versioned(view, version)
        while True:
            # LMDB: a database handle opened after a transaction began is not
            # usable in it, so open the version's database first.
            db = self._db(view, self.schema(view, version).version)
            with self.env.begin(buffers=True) as txn:
                schema = ViewSchema.from_bytes(view, txn.get(schema_key, db=self._schemas_db))
                if _db_name(view, schema.version) not in self._dbs:
                    continue                   # promoted in between: open the new one
                db = self._dbs[_db_name(view, schema.version)]
                raws = [txn.get(k, db=db) if 0 < len(k) <= MAX_KEY_BYTES else None
                        for k in encode_keys(schema.key_type, keys)]
                return decode_records(schema, raws)

    def get(self, view, key, version=None):
        return self.get_many(view, [key], version)[0]

    def keys(self, view, limit, version=None):
        """Up to ``limit`` entity keys of the served version of ``view`` (or
        of ``version``), in the store's key order: entities to sample."""
        schema = self.schema(view, version)
        db = self._db(view, schema.version)
        with self.env.begin(db=db) as txn:
            raws = itertools.islice(txn.cursor().iternext(values=False), limit)
            return [decode_key(schema.key_type, raw) for raw in raws]

    def count(self, view, version=None):
        db = self._db(view, self.schema(view, version).version)
        with self.env.begin() as txn:
            return txn.stat(db)["entries"]

    def flush(self):
        self.env.sync(True)


def _db_name(view, version):
    return f"view:{view}@v{version}".encode()


def _versioned(view, version):
    return f"{view}@v{version}".encode()
