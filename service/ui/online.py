"""Online values as a model is served them: every read goes through the
lookup server's :class:`LookupService` (its key and feature checks, the
feature services' assembly and computed columns), over the same store.

An embedded store is opened once, read-only, and the lookups read through
that handle (LMDB must not be opened twice by one process); it also lists
keys, so a distribution can sample entities. A remote store is read as the
lookup server reads it, and distributions then need the keys typed in.
"""
import asyncio
import random

from tally.core.errors import TallyError
from tally.service.lookup.http import int64_key
from tally.service.lookup.protocol import RequestError
from tally.service.lookup.service import LookupService, open_store
from tally.service.store import StoreError, lmdb_path
from tally.service.store.lmdb import LmdbStore

SCAN_LIMIT = 100_000            # keys read to draw a sample from (in key order)
NUMBER_TYPES = ("int64", "float64")


class Online:
    """Lookups for the pages; ``error`` says why there are none (no store yet)."""

    def __init__(self, store_url, max_batch=1000):
        self.lmdb, self.service, self.error = None, None, None
        self.max_batch = max_batch
        try:
            path = lmdb_path(store_url)
            self.lmdb = LmdbStore(path, readonly=True) if path is not None else None
            self.service = LookupService(open_store(self.lmdb or store_url),
                                         max_batch=max_batch)
        except (StoreError, TallyError, OSError) as error:
            self.error = f"the online store {store_url}: {error}"
        self._refresher = None

    async def start(self, refresh_seconds=1.0):
        if self.service is not None:
            await self.service.catalog.reload()
            self._refresher = asyncio.ensure_future(
                self.service.catalog.refresh_every(refresh_seconds))

    def close(self):
        if self._refresher is not None:
            self._refresher.cancel()
        if self.service is not None:
            self.service.store.close()
        if self.lmdb is not None:
            self.lmdb.close()

    def _ready(self):
        if self.service is None:
            raise RequestError("store_error", self.error)

    async def key_type(self, view):
        self._ready()
        return (await self.service.catalog.schema(view)).key_type

    async def record(self, view, key_text):
        """(key, record or None) of the entity ``key_text`` names, as GET
        /v1/features/{view}/{key} answers it."""
        key = await self.parse_key(view, key_text)
        return key, (await self.service.lookup(view, [key]))[0]

    async def parse_key(self, view, text):
        return int64_key(view, text) if await self.key_type(view) == "int64" else text

    async def vector(self, name, fields):
        """(request row, feature vector) of one request row: ``fields``
        {field: text}, typed as the served service's request fields."""
        row = {}
        for field, kind in await self.request_fields(name):
            text = fields.get(field, "")
            if text == "":
                raise RequestError("bad_request", f"give {field} ({kind})")
            row[field] = typed(field, kind, text)
        return row, (await self.service.lookup_service(name, [row]))[0]

    async def request_fields(self, name):
        """[(field, type)] a request row of feature service ``name`` needs:
        its entities' keys, then its request-time fields."""
        self._ready()
        served = await self.service.catalog.service(name)
        if served.request:                  # a service with computed columns lists them all
            return list(served.request)
        fields = {}
        for view, (entity, _) in served.views.items():
            fields.setdefault(entity, (await self.service.catalog.schema(view)).key_type)
        return list(fields.items())

    async def sample(self, view, feature, n, key_texts=()):
        """[(key, value)] of ``feature`` for typed keys, or else for ``n``
        entities drawn from the first SCAN_LIMIT keys of the store (seeded,
        so a reload shows the same sample); entities without a value are
        left out."""
        self._ready()
        if key_texts:
            keys = [await self.parse_key(view, t) for t in key_texts]
        elif self.lmdb is not None:
            keys = self.lmdb.keys(view, SCAN_LIMIT)
            keys = random.Random(0).sample(keys, min(n, len(keys)))
        else:
            raise RequestError("bad_request", "this store cannot list its keys: type them")
        values = []
        for start in range(0, len(keys), self.max_batch):
            batch = keys[start:start + self.max_batch]
            for key, record in zip(batch, await self.service.lookup(view, batch, [feature])):
                if record is not None and isinstance(record.get(feature), (int, float)):
                    values.append((key, record[feature]))
        return values


def typed(field, kind, text):
    if kind == "string":
        return text
    try:
        return float(text) if kind == "float64" else int(text)
    except ValueError:
        raise RequestError("bad_request", f"{field} is {kind}; got {text!r}") from None
