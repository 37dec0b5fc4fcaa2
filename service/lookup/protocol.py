"""The lookup protocol: what a request may say and how a refusal reads,
shared by the msgpack/TCP and the HTTP front ends.

**Frames** (msgpack over TCP): every message is 4 bytes of payload length
(unsigned big-endian), then one msgpack map. Requests of a connection are
answered in the order they arrive, each reply echoing the request's ``id``,
so a client may pipeline any number of them (``tally.service.lookup.client``).
Ops::

    {"id": 1, "op": "get", "view": "user_reading", "keys": [42, 7],
     "features": ["total_readtime"]}           # features: optional subset
      -> {"id": 1, "ok": true, "records": [{"total_readtime": 12.5,
          "_event_time": ..., "_write_time": ..., "_valid_until": ...,
          "_view_version": 1}, null]}          # null: the entity has no record
    {"id": 5, "op": "service", "service": "recommend",
     "rows": [{"user": 42, "article": 7}]}     # one map of entity keys per row
      -> {"id": 5, "ok": true, "vectors": [{"total_readtime": 12.5,
          "recent_articles": [7, 3], "article_reads": null}]}
                                               # null: that entity has no record
    {"id": 6, "op": "service", "service": "recommend", "layout": "columns",
     "rows": [{"user": 42, "article": 7}, {"user": 42, "article": 9}]}
      -> {"id": 6, "ok": true, "columns": {"total_readtime": [12.5, 12.5],
          "recent_articles": [[7, 3], [7, 3]], "article_reads": [null, 4]}}
                                               # the same values, one array per column
    {"id": 2, "op": "ping"}               -> {"id": 2, "ok": true}
    {"id": 3, "op": "views"}              -> {"id": 3, "ok": true, "views":
          {"user_reading": {"key_type": "int64", "version": 1,
                            "features": {"total_readtime": "float64", ...}}}}
    {"id": 4, "op": "auth", "token": "s3cret"} -> {"id": 4, "ok": true}

**Values** are those of the view's schema (the ``views`` op names each
feature's type, one of ``tally.core.types.VALUE_TYPES``): int64 and float64
as msgpack integers and floats; string as a string; list<T> as an array of
T; top_k<T> as an array of ``[value, count]`` arrays, the most frequent
first; null for a null feature. HTTP writes the same in JSON. The record
dicts of the stores are already in this shape (a top_k pair is a tuple,
which msgpack and JSON write as an array), so replies carry them as they are.

``id`` is optional (it is echoed as null). Keys must match the view's key
type exactly: msgpack integers (within int64) for an int64 view, strings for
a string view. A refused request gets an error frame and the connection goes
on::

    {"id": 1 | null, "ok": false, "error": {"code": "...", "message": "..."}}

``id`` is null when the request's id could not be read.

**Error codes**: ``bad_frame`` (not msgpack, trailing bytes, non-string map
keys), ``not_a_map``, ``bad_request`` (a missing field or one of the wrong
type), ``unknown_op``, ``unauthorized``, ``unknown_view``, ``unknown_feature``,
``unknown_service``,
``bad_key``, ``batch_too_big`` (more keys than ``max_batch``),
``frame_too_big``, ``store_error`` (the store could not answer, e.g. a record
written under a newer schema), ``internal`` (a bug; logged),
``too_many_connections`` (sent with id null to a connection beyond the
server's ``max_connections``, which is then closed). HTTP adds its own (see
``tally.service.lookup.http``).

Frames longer than ``max_frame_bytes`` are read and discarded, then answered
with ``frame_too_big`` (id null) on the same connection. A length above
``max(64 MiB, 4 * max_frame_bytes)`` is taken for garbage -- most often an
HTTP client on the msgpack port ("GET " reads as 1.2 GB) -- and is answered
with ``frame_too_big`` and the connection closed, since nothing after it can
be trusted to be in step.
"""
import msgpack

from tally.core.record import INT64_MAX, INT64_MIN
from tally.service.lookup.client import FRAME_HEADER_BYTES

DEFAULT_MAX_FRAME_BYTES = 1 << 20
# tally.core.definitions.MAX_NAME_LENGTH (tests/test_server.py checks they
# agree): importing it would load the definitions, sqlglot and all, ~12 MB.
MAX_VIEW_NAME_LENGTH = 48
DEFAULT_MAX_BATCH = 1000
GARBAGE_FRAME_BYTES = 64 << 20
OPS = ("get", "service", "ping", "views", "auth")
OPEN_OPS = ("ping",)                     # answered without a token
RECORD_META = ("_event_time", "_write_time", "_valid_until", "_view_version")


class RequestError(Exception):
    """A refused request: becomes an error frame, or an HTTP error."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


# ---- frames --------------------------------------------------------------------

def encode_frame_bytes(payload):
    return len(payload).to_bytes(FRAME_HEADER_BYTES, "big") + payload


def error_reply(request_id, code, message):
    return msgpack.packb({"id": request_id, "ok": False,
                          "error": {"code": code, "message": message}})


def decode_request(payload):
    try:
        request = msgpack.unpackb(payload, raw=False)
    except Exception as error:              # any decoding failure is the client's
        raise RequestError("bad_frame", f"the frame is not one msgpack value: {error}")
    if not isinstance(request, dict):
        raise RequestError("not_a_map", f"a request is a msgpack map, not "
                           f"{type(request).__name__}")
    return request


def request_id_of(request):
    request_id = request.get("id")
    if request_id is not None and type(request_id) is not int:
        raise RequestError("bad_request", "'id' must be an integer")
    return request_id


# ---- what a lookup may ask for ---------------------------------------------------

def check_view_name(view, known):
    """Refuse a name no view can have before any store is asked: libtally
    takes C strings, so "users\\0x" would open "users"; and no definition
    names a view with more than MAX_VIEW_NAME_LENGTH characters."""
    if view and len(view) <= MAX_VIEW_NAME_LENGTH and "\0" not in view:
        return
    raise RequestError("unknown_view", f"no view can be named {shorten(view)}: a view name "
                       f"has 1 to {MAX_VIEW_NAME_LENGTH} characters and no NUL; known views: "
                       f"{sorted(known)}")


def shorten(value, limit=60):
    """repr(value), cut to about ``limit`` characters: error messages must
    not echo a megabyte a client sent. Containers are only named (a repr of
    JSON nested a thousand deep would exceed the recursion limit)."""
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__}"
    text = repr(value[:limit + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_keys(schema, keys):
    """Keys must have the view's key type exactly: a string "42" is not the
    integer 42, and a bool is not an integer (msgpack has both)."""
    if schema.key_type == "int64":
        if not all(type(k) is int for k in keys):
            bad = next(k for k in keys if type(k) is not int)
            raise RequestError("bad_key", f"view {schema.view!r} has int64 keys; got "
                               f"{shorten(bad)}")
        if keys and (min(keys) < INT64_MIN or max(keys) > INT64_MAX):
            raise RequestError("bad_key", "a key does not fit in an int64")
    elif not all(type(k) is str for k in keys):
        bad = next(k for k in keys if type(k) is not str)
        raise RequestError("bad_key", f"view {schema.view!r} has string keys; got "
                           f"{shorten(bad)}")


def check_features(schema, features):
    """The record fields to answer with (the features asked for, then the
    header fields), or None for all of them."""
    if features is None:
        return None
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise RequestError("bad_request", "'features' must be an array of feature names")
    names = {name for name, _ in schema.features}
    unknown = [f for f in features if f not in names]
    if unknown:
        listed = [n for n, _ in schema.features[:20]]     # a view may have thousands
        more = f" and {len(schema.features) - 20} more" if len(schema.features) > 20 else ""
        raise RequestError("unknown_feature", f"view {schema.view!r} has no feature "
                           f"{shorten(unknown[0])}; its features: {listed}{more}")
    return tuple(features) + RECORD_META


def select(record, wanted):
    try:
        return {name: record[name] for name in wanted}
    except KeyError:                        # promoted between catalog and read
        raise RequestError("store_error", "the view's served version changed during the "
                           "request; retry")


def describe_all(schemas):
    """The ``views`` answer: each view's key type, served version and features."""
    return {name: {"key_type": schema.key_type, "version": schema.version,
                   "features": dict(schema.features)}
            for name, schema in sorted(schemas.items())}
