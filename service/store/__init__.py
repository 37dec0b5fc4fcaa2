"""Online stores: where served feature records live, behind one interface.

Every backend implements :class:`OnlineStore` and passes the same contract
tests (``tests/test_store_contract.py``): the embedded LMDB store
(``lmdb.LmdbStore``, the default) and Aerospike (``aerospike.AerospikeStore``,
for scale). Stores receive records as columns (``tally.core.record.Records``)
and lay them out their own way. :func:`open_store` opens one from a URL:

* ``lmdb:///var/lib/tally/store`` or a plain path: the embedded store;
* ``aerospike://host:3000[,host2:3000]/namespace[?set_prefix=tally_]``.
"""
import os
import urllib.parse
from typing import Protocol, runtime_checkable

from tally.core.errors import TallyError


class StoreError(TallyError, LookupError):
    """An unknown view or version, or a store that cannot be opened."""


class RecordRefused(StoreError):
    """The store refuses these records for good (too large, an invalid key,
    a TTL the namespace forbids): writing them again cannot succeed."""
    permanent = True


def is_permanent(error):
    """Whether retrying a failed write cannot mend it."""
    return bool(getattr(error, "permanent", False))


@runtime_checkable
class OnlineStore(Protocol):
    """What the pipeline, the bootstrap and the readers need of a store."""

    def register_view(self, schema, current=True):
        """Create a view version's records and record its schema; a version
        registered with ``current=False`` (a candidate) is served only once
        promoted."""

    def promote(self, view, version):
        """Serve ``version`` of ``view`` from now on, atomically for readers."""

    def schema(self, view, version=None):
        """The ``ViewSchema`` of the served version of ``view`` (or of ``version``)."""

    def views(self):
        """The names of the views the store serves."""

    def write(self, view, keys, records, version=None):
        """Put one record per key (``Records``) into the served version or ``version``."""

    def get_many(self, view, keys, version=None):
        """Decoded records for ``keys``; None for an entity with no record."""

    def get(self, view, key, version=None):
        """The decoded record of one key, or None."""

    def count(self, view, version=None):
        """The number of records of a view version."""

    def put_service(self, name, definition):
        """Store a feature service's definition (bytes: ``tally.core.serving``)."""

    def service(self, name):
        """The stored definition of feature service ``name`` (StoreError if none)."""

    def services(self):
        """The names of the feature services the store holds."""

    def drop_service(self, name):
        """Forget a feature service (no error if unknown)."""

    def flush(self):
        """Make every write so far durable (called before a checkpoint)."""

    def close(self):
        """Release the store."""


DEFAULT_PATH = os.path.join(".tally", "store")


def open_store(url=None, readonly=False, **options):
    """The online store a URL names (see the module docstring); ``None`` is
    the default embedded store. ``options`` go to the backend's constructor."""
    url = url or DEFAULT_PATH
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme in ("", "lmdb", "file"):
        from tally.service.store.lmdb import LmdbStore
        path = parts.path if parts.scheme else str(url)
        return LmdbStore(path, readonly=readonly, **options)
    if parts.scheme == "aerospike":
        from tally.service.store.aerospike import AerospikeStore
        namespace = parts.path.strip("/")
        if not parts.netloc or not namespace or "/" in namespace:
            raise StoreError(f"store URL {url!r}: write aerospike://host:port[,host:port]/"
                             "namespace")
        query = dict(urllib.parse.parse_qsl(parts.query))
        if "set_prefix" in query:
            options.setdefault("set_prefix", query.pop("set_prefix"))
        if query:
            raise StoreError(f"store URL {url!r}: unknown options {sorted(query)}; the "
                             "known one is set_prefix")
        return AerospikeStore(parts.netloc, namespace, **options)
    raise StoreError(f"store URL {url!r}: the scheme {parts.scheme!r} is unknown; use "
                     "lmdb:///path or aerospike://host:port/namespace")
