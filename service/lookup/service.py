"""The lookups themselves, whatever the transport: the store adapters, the
view catalog, and LookupService, which checks a request and answers it.

**Reads** of the embedded store go through libtally (``EmbeddedReader``):
read-only, never blocking the writer, which is another process (the
pipeline). They run inline on the event loop: a single-key lookup costs a few
microseconds and 100 keys a few hundred (see bench/RESULTS.md), less than
handing the work to a thread and back. A server living inside the writer's
own process must read through that ``LmdbStore`` instead (LMDB allows one
open per process): pass the store object rather than a path. A remote store
(``aerospike://...``) is read in the store's thread pool (``RemoteStore``):
its round trips and retries never block the event loop, and the server keeps
no local files.

**The view catalog** (names and served schemas, for ``views`` and the key and
feature checks) is reloaded every ``catalog_refresh`` seconds (1) and when a
request names a view the catalog lacks but the store has -- at most once per
``catalog_refresh`` for such requests, whatever names they give, and names
no view can have (see ``check_view_name``) never reach the store. libtally
lists the views (``tally_store_views``) and binds an open view to the version
served when it was opened: when a reload finds a view served at another
version than the reader's, the reader is reopened, so a promotion is served
within ``catalog_refresh`` seconds.
"""
import asyncio
import hmac
import logging
import time

from tally.core.errors import RecordError
from tally.core.serving import ServedService
from tally.service.lookup.protocol import (DEFAULT_MAX_BATCH, MAX_VIEW_NAME_LENGTH, OPEN_OPS,
                                           OPS, RequestError, check_features, check_keys,
                                           check_view_name, describe_all, select, shorten)
from tally.service.store import StoreError
from tally.service.store import lmdb_path
from tally.service.store import open_store as open_online_store
from tally.service.store.lmdb import LmdbStore

DEFAULT_CATALOG_REFRESH_SECONDS = 1.0

log = logging.getLogger("tally.server")


# ---- stores --------------------------------------------------------------------

class EmbeddedStore:
    """Reads through libtally; the writer is another process."""
    blocking = False                        # its calls take microseconds: run them inline

    def __init__(self, path):
        self.path = str(path)
        self.reader = self._open_reader()

    def _open_reader(self):
        from tally.service.store.embedded import EmbeddedReader
        return EmbeddedReader(self.path)

    def _get_many(self, view, keys):
        if len(keys) == 1:                  # skips get_many's array set-up
            return [self.reader.get(view, keys[0])]
        return self.reader.get_many(view, keys)

    async def get_many(self, view, keys):
        return self._get_many(view, keys)

    async def get_views(self, reads):
        """{view: records} for {view: keys}: microseconds each, so in turn."""
        return {view: self._get_many(view, keys) for view, keys in reads.items()}

    def service(self, name):
        return self.reader.service(name)

    def has_view(self, view):
        """Cheap (libtally opens the view, or finds none), unlike listing. Only
        a view that opens is kept open, so the handles are bounded by the
        store's views, not by the names clients send."""
        try:
            self.reader.schema(view)
        except (StoreError, RecordError):   # none, or one that cannot be served
            return False
        return True

    def load_schemas(self):
        """{view: ViewSchema of its served version}, reopening the reader
        first if it reads a view at another version than the one served now
        (between two requests: all of them run on the event loop's thread)."""
        served = self._served_versions()
        schemas = self._reader_schemas(served)
        if any(schema.version != served[view] for view, schema in schemas.items()):
            log.info("a view version was promoted; reopening the store")
            self.reader.close()
            self.reader = self._open_reader()
            schemas = self._reader_schemas(served)
        return schemas

    def _served_versions(self):
        """{view: version served now}, each view opened afresh."""
        served = {}
        for view in self.reader.views():
            try:
                served[view] = self.reader.served_version(view)
            except (StoreError, RecordError) as error:  # no records yet, a bad schema
                log.debug("view %r is not served: %s", view, error)
        return served

    def _reader_schemas(self, views):
        """{view: the schema the reader decodes it with}; views that cannot be
        opened are left out, so that the others still load."""
        schemas = {}
        for view in views:
            try:
                schemas[view] = self.reader.schema(view)
            except (StoreError, RecordError):           # dropped since listed
                pass
        return schemas

    def close(self):
        self.reader.close()


class SharedLmdbStore:
    """Reads through the writer's own LmdbStore, for a server in its process
    (it follows promotions by itself)."""
    blocking = False

    def __init__(self, store):
        self.path = store.path
        self.store = store

    async def get_many(self, view, keys):
        return self.store.get_many(view, keys)

    async def get_views(self, reads):
        return {view: self.store.get_many(view, keys) for view, keys in reads.items()}

    def service(self, name):
        return self.store.service(name)

    def has_view(self, view):
        try:
            self.store.schema(view)
        except (StoreError, RecordError):
            return False
        return True

    def load_schemas(self):
        return {view: self.store.schema(view) for view in self.store.views()}

    def close(self):
        pass                                # the writer owns the store


class RemoteStore:
    """Reads an online store whose calls block (Aerospike: round trips,
    retries) in that store's thread pool, through its ``get_many_async`` (and
    ``get_views_async``, the views of a feature service in one batch, if it
    has it); the catalog loads it off the event loop too. It follows
    promotions by itself (within its ``meta_refresh_s``)."""
    blocking = True

    def __init__(self, store, path, owned=True):
        self.store, self.path, self.owned = store, path, owned

    async def get_many(self, view, keys):
        return await self.store.get_many_async(view, keys)

    async def get_views(self, reads):
        """One multi-view read if the store has one, else the views' reads at
        once (in the store's thread pool)."""
        get_views_async = getattr(self.store, "get_views_async", None)
        if get_views_async is not None:
            return await get_views_async(reads)
        views = list(reads)
        records = await asyncio.gather(*(self.store.get_many_async(view, reads[view])
                                         for view in views))
        return dict(zip(views, records))

    def service(self, name):
        return self.store.service(name)

    def has_view(self, view):
        """No round trip on the event loop for a name the catalog lacks: a
        view created since is served from the catalog's next reload."""
        return False

    def load_schemas(self):
        return {view: self.store.schema(view) for view in self.store.views()}

    def close(self):
        if self.owned:
            self.store.close()


def open_store(store):
    """A path -> EmbeddedStore; an aerospike:// URL -> RemoteStore; an open
    LmdbStore (the writer's) -> SharedLmdbStore; another open store with
    ``get_many_async`` -> RemoteStore."""
    if isinstance(store, LmdbStore):
        return SharedLmdbStore(store)
    if hasattr(store, "get_many_async"):
        return RemoteStore(store, f"{type(store).__name__}", owned=False)
    path = lmdb_path(store)
    if path is None:
        return RemoteStore(open_online_store(str(store)), str(store))
    return EmbeddedStore(path)


# ---- the catalog ----------------------------------------------------------------

class ViewCatalog:
    """The store's served view schemas, for key and feature checks and the
    ``views`` op. The server reloads it every ``refresh_seconds`` (a promoted
    version is followed within that time), and at once when a request names
    a view that the store has but the catalog lacks (one created since) --
    at most once per ``refresh_seconds`` for such requests: a view the store
    opens but never lists (a name holding "@v") would otherwise reload the
    catalog on every request naming it."""

    def __init__(self, store, refresh_seconds=DEFAULT_CATALOG_REFRESH_SECONDS):
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.schemas = {}
        self.services = {}                  # name -> (ServedService, time.monotonic() read)
        self._next_miss_reload = 0.0        # time.monotonic() from which a miss may reload

    async def reload(self):
        if self.store.blocking:
            loop = asyncio.get_running_loop()
            self.schemas = await loop.run_in_executor(None, self.store.load_schemas)
        else:                               # between two requests, on the loop's thread
            self.schemas = self.store.load_schemas()

    async def schema(self, view):
        schema = self.schemas.get(view)
        if schema is None:
            schema = await self._schema_of_new_view(view)
        return schema

    async def _schema_of_new_view(self, view):
        """A view the catalog lacks: perhaps one created since the last reload."""
        check_view_name(view, self.schemas)
        if self.store.has_view(view) and time.monotonic() >= self._next_miss_reload:
            self._next_miss_reload = time.monotonic() + self.refresh_seconds
            try:
                await self.reload()
            except StoreError as error:
                raise RequestError("store_error", str(error)) from error
        schema = self.schemas.get(view)
        if schema is None:
            raise RequestError("unknown_view", f"unknown view {view!r}; known views: "
                               f"{sorted(self.schemas)}")
        return schema

    async def service(self, name):
        """The served form of feature service ``name``, read again from the
        store once it is ``refresh_seconds`` old (so a new version is
        followed as promotions are)."""
        cached = self.services.get(name)
        if cached is not None and time.monotonic() - cached[1] < self.refresh_seconds:
            return cached[0]
        if not 0 < len(name) <= MAX_VIEW_NAME_LENGTH or "\0" in name:
            raise RequestError("unknown_service", "no feature service can be named "
                               f"{shorten(name)}")
        try:
            if self.store.blocking:
                raw = await asyncio.get_running_loop().run_in_executor(
                    None, self.store.service, name)
            else:
                raw = self.store.service(name)
            served = ServedService.from_bytes(name, raw)
        except StoreError as error:
            self.services.pop(name, None)
            raise RequestError("unknown_service", str(error)) from error
        except RecordError as error:
            raise RequestError("store_error", str(error)) from error
        if len(self.services) > 10_000:    # names clients send must not grow it forever
            self.services.clear()
        self.services[name] = (served, time.monotonic())
        return served

    async def refresh_every(self, seconds):
        """Reload forever, every ``seconds``; failures are logged, not fatal."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.reload()
            except Exception as error:
                log.warning("could not reload the view catalog: %s", error)


# ---- the service ----------------------------------------------------------------

class Session:
    """What a TCP connection remembers: whether it has shown the token."""
    __slots__ = ("authenticated",)

    def __init__(self, authenticated=False):
        self.authenticated = authenticated


class LookupService:
    """Checks and answers decoded requests, for both front ends. Embedded
    reads finish without suspending (too quick to be worth a thread); remote
    ones wait for the store's thread pool."""

    def __init__(self, store, token=None, max_batch=DEFAULT_MAX_BATCH,
                 catalog_refresh=DEFAULT_CATALOG_REFRESH_SECONDS):
        self.store = store
        self.catalog = ViewCatalog(store, catalog_refresh)
        self.token = None if token is None else token.encode()
        self.max_batch = max_batch
        self._plans = {}                    # service name -> (served, schemas, plan)
        self._ops = {"get": self._op_get, "service": self._op_service, "ping": self._op_ping,
                     "views": self._op_views, "auth": self._op_ping}

    def token_ok(self, token):
        """Compared in constant time, so response timing does not leak it."""
        return self.token is None or (token is not None and
                                      hmac.compare_digest(token.encode(), self.token))

    async def handle(self, request, session):
        """One decoded request map -> the reply's fields (besides id and ok)."""
        op = request.get("op")
        if not isinstance(op, str):
            raise RequestError("bad_request", "a request needs an 'op' string")
        handler = self._ops.get(op)
        if handler is None:
            raise RequestError("unknown_op", f"unknown op {op!r}; ops: {', '.join(OPS)}")
        self._authorize(op, request, session)
        return await handler(request)

    def _authorize(self, op, request, session):
        if self.token is None or op in OPEN_OPS:
            return
        token = request.get("token")
        if token is not None:
            if not isinstance(token, str):
                raise RequestError("bad_request", "'token' must be a string")
            if not self.token_ok(token):
                raise RequestError("unauthorized", "wrong token")
            session.authenticated = True
        elif not session.authenticated:
            raise RequestError("unauthorized", 'this server needs a token: send '
                               '{"op": "auth", "token": ...} first, or a "token" field')

    async def _op_ping(self, request):
        return {}

    async def _op_views(self, request):
        return {"views": describe_all(self.catalog.schemas)}

    async def _op_get(self, request):
        view = request.get("view")
        if not isinstance(view, str):
            raise RequestError("bad_request", "'get' needs a 'view' string")
        keys = request.get("keys")
        if not isinstance(keys, list):
            raise RequestError("bad_request", "'get' needs a 'keys' array")
        return {"records": await self.lookup(view, keys, request.get("features"))}

    async def _op_service(self, request):
        name = request.get("service")
        if not isinstance(name, str):
            raise RequestError("bad_request", "'service' needs a 'service' string")
        layout = request.get("layout", "rows")
        if layout not in ("rows", "columns"):
            raise RequestError("bad_request", f"'layout' is 'rows' (the default: one map "
                               f"per row) or 'columns' (one array per column), not {layout!r}")
        if layout == "columns":
            return {"columns": await self.lookup_service(name, request.get("rows"), True)}
        return {"vectors": await self.lookup_service(name, request.get("rows"))}

    async def lookup_service(self, name, rows, as_columns=False):
        """The feature vector of each request row (a map of entity keys):
        one dict of the service's columns per row, its views read at once
        (``as_columns``: {column: [value of each row]} instead)."""
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise RequestError("bad_request", "a feature service lookup needs 'rows': an "
                               "array of maps of entity keys, e.g. [{\"user\": 42, "
                               "\"article\": 7}]")
        if len(rows) > self.max_batch:
            raise RequestError("batch_too_big", f"{len(rows)} rows in one request; the "
                               f"limit is {self.max_batch}: split the batch")
        served = await self.catalog.service(name)
        plan = await self._service_plan(served)
        try:
            keys = served.keys_of(rows)
        except KeyError as error:
            raise RequestError("bad_request", error.args[0]) from None
        for view, entity, schema in plan:
            check_keys(schema, keys[entity])
        distinct = served.distinct_keys(keys)
        records = await self._read_views({view: distinct[entity][0]
                                          for view, entity, _ in plan})
        assemble = served.assemble_columns if as_columns else served.assemble
        return assemble(records, rows, {entity: where for entity, (_, where) in distinct.items()})

    async def _service_plan(self, served):
        """[(view, entity, schema)] of a service's views, their features
        checked against the schemas: once per served form and catalog load,
        not per request."""
        schemas = self.catalog.schemas      # a reload replaces the dict
        cached = self._plans.get(served.name)
        if cached is not None and cached[0] is served and cached[1] is schemas:
            return cached[2]
        plan = []
        for view, (entity, columns) in served.views.items():
            schema = await self.catalog.schema(view)
            check_features(schema, [feature for _, feature in columns])
            plan.append((view, entity, schema))
        self._plans[served.name] = (served, schemas, plan)
        return plan

    async def _read_views(self, reads):
        try:
            return await self.store.get_views(reads)
        except StoreError as error:
            raise RequestError("unknown_view", str(error)) from error
        except UnicodeEncodeError as error:
            raise RequestError("bad_key", f"a key is not valid Unicode: {error}") from error
        except (RecordError, OSError, ValueError, OverflowError) as error:
            log.warning("lookup of views %s failed: %s", sorted(reads), error)
            raise RequestError("store_error", f"{type(error).__name__}: {error}") from error

    async def lookup(self, view, keys, features=None):
        """Records of ``keys`` (None where an entity has none), with only
        ``features`` (plus the _-prefixed header fields) if given."""
        if len(keys) > self.max_batch:
            raise RequestError("batch_too_big", f"{len(keys)} keys in one request; the "
                               f"limit is {self.max_batch}: split the batch")
        schema = await self.catalog.schema(view)
        check_keys(schema, keys)
        wanted = check_features(schema, features)
        records = await self._read(view, keys)
        if wanted is None:
            return records
        return [None if r is None else select(r, wanted) for r in records]

    async def _read(self, view, keys):
        try:
            return await self.store.get_many(view, keys)
        except StoreError as error:         # dropped since the catalog loaded
            raise RequestError("unknown_view", str(error)) from error
        except UnicodeEncodeError as error:  # JSON can spell a lone surrogate, UTF-8 cannot
            raise RequestError("bad_key", f"a key is not valid Unicode: {error}") from error
        except (RecordError, OSError, ValueError, OverflowError) as error:
            log.warning("lookup in view %r failed: %s", view, error)
            raise RequestError("store_error", f"{type(error).__name__}: {error}") from error
