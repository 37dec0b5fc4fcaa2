"""Online stores: where served feature records live, behind one interface.

Every backend implements :class:`OnlineStore` and passes the same contract
tests (``tests/test_store_contract.py``): the embedded LMDB store
(``lmdb.LmdbStore``, the default) and Aerospike (``aerospike.AerospikeStore``,
for scale). Stores receive records as columns (``tally.core.record.Records``)
and lay them out their own way. :func:`open_store` opens one from a URL:

* ``lmdb:///var/lib/tally/store`` or a plain path: the embedded store;
* ``aerospike://[user@]host:3000[,host2:3000]/namespace[?option=value&...]``:
  see :data:`AEROSPIKE_OPTIONS` (set prefix, timeouts, retry budget, TLS,
  authentication; the password comes from ``$TALLY_AEROSPIKE_PASSWORD``, so
  it is in no URL, no ``ps`` line and no log).
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

    def register_view(self, schema, current=True, expiry_ms=0):
        """Create a view version's records and record its schema; a version
        registered with ``current=False`` (a candidate) is served only once
        promoted. ``expiry_ms`` (the view's ``online_expiry``, 0: never) is
        how long a record lives after it was last written, where the store
        can expire records (Aerospike's TTL; LMDB keeps them)."""

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
PASSWORD_VARIABLE = "TALLY_AEROSPIKE_PASSWORD"

# URL option -> (what it means, how to parse it); the store's own keywords
# keep their names, the TLS and authentication ones become client config.
AEROSPIKE_OPTIONS = {
    "set_prefix": ("prefix of every set the store uses (default tally_)", str),
    "write_timeout_ms": ("total timeout of one write call (default 2000)", int),
    "read_timeout_ms": ("total timeout of one read call (default 1000)", int),
    "socket_timeout_ms": ("idle timeout of one attempt (default: a quarter of the total)", int),
    "retry_budget_s": ("how long failures are retried, e.g. across a node restart "
                       "(default 60)", float),
    "chunk_size": ("records per batch call (default: the server's batch-max-requests, "
                   "at most 1000)", int),
    "meta_refresh_s": ("how stale a reader's view of promotions may be (default 1)", float),
    "tls_name": ("the TLS name of the nodes (turns TLS on)", str),
    "tls_cafile": ("CA certificate file (turns TLS on)", str),
    "tls_capath": ("directory of CA certificates (turns TLS on)", str),
    "tls_certfile": ("client certificate file, for mutual TLS or auth_mode=pki", str),
    "tls_keyfile": ("client key file", str),
    "auth_mode": ("internal (default), external or pki", str),
}
_TLS_FILES = {"tls_cafile": "cafile", "tls_capath": "capath", "tls_certfile": "certfile",
              "tls_keyfile": "keyfile"}
_AUTH_MODES = {"internal": "AUTH_INTERNAL", "external": "AUTH_EXTERNAL", "pki": "AUTH_PKI"}


def open_store(url=None, readonly=False, **options):
    """The online store a URL names (see the module docstring); ``None`` is
    the default embedded store. ``options`` go to the backend's constructor."""
    url = url or DEFAULT_PATH
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme in ("", "lmdb", "file"):
        from tally.service.store.lmdb import LmdbStore
        if parts.scheme and parts.netloc:
            raise StoreError(f"store URL {url!r}: write lmdb:///absolute/path or a plain "
                             "(relative) path")
        path = parts.path if parts.scheme else str(url)
        return LmdbStore(path, readonly=readonly, **options)
    if parts.scheme == "aerospike":
        from tally.service.store.aerospike import AerospikeStore
        hosts, namespace, url_options = parse_aerospike_url(url)
        return AerospikeStore(hosts, namespace, **{**url_options, **options})
    raise StoreError(f"store URL {url!r}: the scheme {parts.scheme!r} is unknown; use "
                     "lmdb:///path or aerospike://host:port/namespace")


def parse_aerospike_url(url):
    """``aerospike://...`` -> (hosts, namespace, AerospikeStore keywords)."""
    parts = urllib.parse.urlsplit(str(url))
    userinfo, _, hosts = parts.netloc.rpartition("@")
    namespace = parts.path.strip("/")
    if not hosts or not namespace or "/" in namespace:
        raise StoreError(f"store URL {url!r}: write aerospike://host:port[,host:port]/"
                         "namespace[?option=value]")
    if ":" in userinfo:
        raise StoreError(f"store URL {url!r}: put no password in the URL; set "
                         f"${PASSWORD_VARIABLE} instead")
    query = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name not in AEROSPIKE_OPTIONS:
            known = ", ".join(sorted(AEROSPIKE_OPTIONS))
            raise StoreError(f"store URL {url!r}: unknown option {name!r}; the options are "
                             f"{known}")
        try:
            query[name] = AEROSPIKE_OPTIONS[name][1](value)
        except ValueError:
            raise StoreError(f"store URL {url!r}: option {name}={value!r} is not a "
                             f"{AEROSPIKE_OPTIONS[name][1].__name__}") from None
    return hosts, namespace, _store_keywords(url, query, urllib.parse.unquote(userinfo))


def _store_keywords(url, query, user):
    config = {}
    tls = {key: query.pop(name) for name, key in _TLS_FILES.items() if name in query}
    if "tls_name" in query:
        config["tls_name"] = query.pop("tls_name")
    if tls or "tls_name" in config:
        config["tls"] = dict(tls, enable=True)
    if user:
        password = os.environ.get(PASSWORD_VARIABLE)
        if password is None:
            raise StoreError(f"store URL {url!r} names user {user!r}: set "
                             f"${PASSWORD_VARIABLE} to its password")
        config["user"], config["password"] = user, password
    mode = query.pop("auth_mode", None)
    if mode is not None:
        if mode not in _AUTH_MODES:
            raise StoreError(f"store URL {url!r}: auth_mode={mode!r}; use one of "
                             f"{sorted(_AUTH_MODES)}")
        import aerospike
        config["policies"] = {"auth_mode": getattr(aerospike, _AUTH_MODES[mode])}
    if config:
        query["config"] = config
    return query
