"""The embedded online store: LMDB, one named database per feature view.

Readers in other processes (the C API, ``tally get``) open the environment
read-only; LMDB's MVCC means they never block the writer and never see a
half-written record. The ``__schemas__`` database maps a view name to its
binary ``ViewSchema`` (see ``tally.service.record``), which a reader needs to
decode records.
"""
import os

import lmdb

from tally.service.record import ViewSchema, decode_record, encode_keys

SCHEMAS_DB = b"__schemas__"
DEFAULT_MAP_SIZE = 64 << 30     # address space only; the file grows as written


class StoreError(LookupError):
    """An unknown view or a store that cannot be opened."""


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
        self.env = lmdb.open(self.path, map_size=map_size, max_dbs=max_views + 1,
                             readonly=readonly, sync=False, lock=True)
        self.readonly = readonly
        self._schemas_db = self.env.open_db(SCHEMAS_DB, create=not readonly)
        self._dbs = {}
        self._schemas = {}

    def close(self):
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def register_view(self, schema: ViewSchema):
        """Create (or update) the view's database and record its schema."""
        self._dbs[schema.view] = self.env.open_db(_db_name(schema.view), create=True)
        with self.env.begin(write=True, db=self._schemas_db) as txn:
            txn.put(schema.view.encode(), schema.to_bytes())
        self._schemas[schema.view] = schema

    def schema(self, view) -> ViewSchema:
        if view not in self._schemas:
            with self.env.begin(db=self._schemas_db) as txn:
                raw = txn.get(view.encode())
            if raw is None:
                raise StoreError(f"unknown view {view!r}; known views: {self.views()}")
            self._schemas[view] = ViewSchema.from_bytes(view, raw)
        return self._schemas[view]

    def views(self):
        with self.env.begin(db=self._schemas_db) as txn:
            return [bytes(k).decode() for k in txn.cursor().iternext(values=False)]

    def _db(self, view):
        if view not in self._dbs:
            self.schema(view)
            self._dbs[view] = self.env.open_db(_db_name(view), create=False)
        return self._dbs[view]

    def write(self, view, keys, records):
        """Put one record (row of ``records``, a uint8 array) per key, in one
        write transaction."""
        schema = self.schema(view)
        blob = records.tobytes()
        size = schema.record_size
        items = zip(encode_keys(schema.key_type, keys),
                    (blob[i * size:(i + 1) * size] for i in range(len(records))))
        with self.env.begin(write=True, db=self._db(view)) as txn:
            txn.cursor().putmulti(items)

    def get_many(self, view, keys):
        """Decoded records for ``keys``; None for entities with no record."""
        schema = self.schema(view)
        with self.env.begin(db=self._db(view), buffers=True) as txn:
            raws = [txn.get(k) for k in encode_keys(schema.key_type, keys)]
            return [None if raw is None else decode_record(schema, raw) for raw in raws]

    def get(self, view, key):
        return self.get_many(view, [key])[0]

    def count(self, view):
        with self.env.begin(db=self._db(view)) as txn:
            return txn.stat(self._db(view))["entries"]

    def flush(self):
        self.env.sync(True)


def _db_name(view):
    return b"view:" + view.encode()
