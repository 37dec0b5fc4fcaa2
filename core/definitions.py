"""Feature definitions: entities, sources, windows, features and views.

Definitions are immutable values: two equal definitions describe the same
computation, which is what versioning (a content hash) relies on.

Every definition has a canonical form (``to_dict()``: plain JSON values) and a
content hash (:func:`content_hash`: sha256 of the canonical JSON with sorted
keys). Optional fields (``Source.archive``, ``Feature.filter``, ``Feature.n``,
``Feature.k``) appear in the canonical form only when set, so adding a new
optional field later keeps the hashes of existing definitions stable: follow
that rule for any field added in the future.

Validation errors (:class:`DefinitionError`) name the definition, the field
and a fix, e.g. ``view 'user_reading', feature 'total': column 'readtme' is
not a field of source 'read_events'; did you mean 'readtime'? ...``.

Long because each definition carries its own validation, whose
messages name the definition, the field and the fix.
"""
import difflib
import hashlib
import html
import json
from dataclasses import dataclass, field, replace

from tally.core import filters
from tally.core.aggregations import AGGREGATIONS
from tally.core.durations import duration_ms, format_duration
from tally.core.errors import DefinitionError, FilterError
from tally.core.routing import routing_code
from tally.core.types import FIELD_TYPES, KEY_TYPES, MESSAGE_TIME_FIELDS, PAYLOAD_FORMATS

CANONICAL_FORMAT = 1          # bump only with a migration of stored hashes
MAX_NAME_LENGTH = 48
# Plausible event times (see Source): in ms since 1973-03-03 (a time in seconds
# of this century is below it), and at most a day ahead of the clock.
DEFAULT_EARLIEST_EVENT_TIME = 100_000_000_000
DEFAULT_MAX_EVENT_TIME_AHEAD = 86_400_000
# One tile per hop per entity and feature: a window (with its lateness) of
# more hops than this is a mistake long before it is a memory bill.
MAX_TILES = 10_000


def _is_name(name):
    return (isinstance(name, str) and name.isascii() and name.replace("_", "a").isalnum()
            and not name[0].isdigit())


def _check_name(what, name, where=None):
    """Names are identifiers: refs such as ``view@v2`` and ``view.feature``
    depend on it, and names starting with '_' are reserved for Tally. They
    are short enough for every store to hold them in its own names (an LMDB
    database, an Aerospike set of at most 63 bytes with its prefix)."""
    where = where or f"{what} {_shown(name)}"
    if not _is_name(name) or name.startswith("_"):
        raise DefinitionError(
            f"{where}: name {_shown(name)} is not a valid name; use letters, digits and "
            "underscores, starting with a letter (e.g. 'user_reading')")
    if len(name) > MAX_NAME_LENGTH:
        raise DefinitionError(
            f"{where}: name {_shown(name)} has {len(name)} characters; the limit is "
            f"{MAX_NAME_LENGTH} (stores hold names in their own keys): shorten it")


def _shown(name):
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(name, choices):
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


# --------------------------------------------------------------------------
# Entity


@dataclass(frozen=True)
class Entity:
    """What features describe, e.g. a user; ``key_type`` is int64 or string."""
    name: str
    key_type: str = "int64"

    kind = "entity"

    def __post_init__(self):
        _check_name("entity", self.name)
        if self.key_type not in KEY_TYPES:
            raise DefinitionError(f"entity {self.name!r}: key_type {self.key_type!r} "
                                  f"is not one of {KEY_TYPES}; use 'int64' or 'string'")

    def to_dict(self):
        return {"name": self.name, "key_type": self.key_type}

    @classmethod
    def from_dict(cls, data):
        return cls(data["name"], data["key_type"])

    def __repr__(self):
        return f"Entity({self.name!r}, key_type={self.key_type!r})"

    def _repr_html_(self):
        return _html_table(f"entity <b>{_e(self.name)}</b>", [("key type", self.key_type)])


# --------------------------------------------------------------------------
# Source


@dataclass(frozen=True)
class Source:
    """An event stream: a Pulsar topic with a typed schema and an event-time field.

    ``format`` is the payload format: msgpack (default; one map per message),
    json (one object per message) or arrow (Arrow IPC stream of record
    batches per message). ``archive`` optionally names a Parquet dataset of
    events older than the topic (a local path or a pyarrow filesystem URI,
    e.g. ``s3://bucket/read_events/``), with the same schema.

    Event times outside the plausible range are refused (dead-lettered, left
    out of bootstraps and training sets): before ``earliest_event_time``
    (epoch ms; default 1973-03-03, below which a time is most likely in
    seconds) or more than ``max_event_time_ahead`` (a duration; default one
    day) ahead of the clock that reads them.

    The event time can also be the message's own: ``timestamp_field=
    "@event_time"`` (the event timestamp the producer set on the message) or
    ``"@publish_time"`` (when the broker stored it); such a field is added to
    the schema (an int64 column of that name in archives and training
    events), and every event of a message gets the message's time.

    ``routing`` is how the topic's producers route keys to partitions
    (``tally.core.routing``): ``"murmur3"`` (Tally's producers, and any
    client set to ``Murmur3_32Hash``), ``"java_string_hash"`` (the Java
    client's default) or ``"go_java_string_hash"`` (the Go client's
    default). Every event is checked against it; one on another partition is
    dead-lettered, never folded."""
    name: str
    topic: str
    schema: tuple            # ((field name, field type), ...)
    timestamp_field: str = "ts"
    format: str = "msgpack"
    archive: str = None
    earliest_event_time: int = None
    max_event_time_ahead: int = None
    routing: str = "murmur3"

    kind = "source"

    def __post_init__(self):
        where = f"source {self.name!r}"
        _check_name("source", self.name)
        schema = self.schema.items() if isinstance(self.schema, dict) else self.schema
        try:
            schema = tuple((str(n), str(t)) for n, t in schema)
        except (TypeError, ValueError):
            raise DefinitionError(f"{where}: schema must map field names to types, e.g. "
                                  "{'user': 'int64', 'ts': 'int64'}") from None
        if self.timestamp_field in MESSAGE_TIME_FIELDS and \
                self.timestamp_field not in dict(schema):
            schema += ((self.timestamp_field, "int64"),)
        object.__setattr__(self, "schema", schema)
        if not isinstance(self.topic, str) or not self.topic.strip():
            raise DefinitionError(f"{where}: topic is empty; name the Pulsar topic, e.g. "
                                  "'read_events' or 'persistent://public/default/read_events'")
        if not schema:
            raise DefinitionError(f"{where}: schema has no fields; list the event fields "
                                  "and their types")
        seen = set()
        for name, dtype in schema:
            if name in seen:
                raise DefinitionError(f"{where}: schema field {name!r} is listed twice; "
                                      "list each field once")
            seen.add(name)
            if not name:
                raise DefinitionError(f"{where}: schema has a field with an empty name; "
                                      "name every field")
            if dtype not in FIELD_TYPES:
                raise DefinitionError(f"{where}: schema field {name!r} has type {dtype!r}; "
                                      f"use one of {FIELD_TYPES}")
            if name.startswith("@") and (name not in MESSAGE_TIME_FIELDS or dtype != "int64"):
                raise DefinitionError(f"{where}: schema field {name!r}: names beginning with "
                                      "'@' are the message's own times, int64: "
                                      f"{', '.join(MESSAGE_TIME_FIELDS)}")
        if self.field_type(self.timestamp_field) != "int64":
            raise DefinitionError(f"{where}: timestamp_field {self.timestamp_field!r} must be "
                                  "an int64 field of the schema (event time in epoch "
                                  f"milliseconds); {_suggest(self.timestamp_field, seen)}"
                                  f"fields: {', '.join(n for n, _ in schema)}")
        if self.format not in PAYLOAD_FORMATS:
            raise DefinitionError(f"{where}: format {self.format!r} is not supported; use one "
                                  f"of {', '.join(PAYLOAD_FORMATS)}")
        if self.archive is not None and (not isinstance(self.archive, str)
                                         or not self.archive.strip()):
            raise DefinitionError(f"{where}: archive must be a Parquet path or URI such as "
                                  "'s3://bucket/read_events/', or None")
        try:
            routing_code(self.routing)
        except ValueError as error:
            raise DefinitionError(f"{where}: {error}") from None
        self._check_event_time_range(where)

    def _check_event_time_range(self, where):
        if self.earliest_event_time is not None and (
                not isinstance(self.earliest_event_time, int)
                or isinstance(self.earliest_event_time, bool)):
            raise DefinitionError(f"{where}: earliest_event_time must be epoch milliseconds "
                                  "(an int), e.g. 946684800000 for 2000-01-01, or None")
        if self.max_event_time_ahead is not None:
            ahead = self.max_event_time_ahead
            if not isinstance(ahead, int) or isinstance(ahead, bool):
                try:
                    object.__setattr__(self, "max_event_time_ahead", duration_ms(ahead))
                except DefinitionError as error:
                    raise DefinitionError(f"{where}: max_event_time_ahead: {error}") from None
            if self.max_event_time_ahead < 0:
                raise DefinitionError(f"{where}: max_event_time_ahead is negative; give a "
                                      "duration such as '1d'")

    @property
    def event_time_floor(self):
        """The earliest plausible event time (epoch ms)."""
        return DEFAULT_EARLIEST_EVENT_TIME if self.earliest_event_time is None \
            else self.earliest_event_time

    @property
    def event_time_ahead_ms(self):
        """How far ahead of the clock an event time may be (ms)."""
        return DEFAULT_MAX_EVENT_TIME_AHEAD if self.max_event_time_ahead is None \
            else self.max_event_time_ahead

    @property
    def fields(self):
        return [n for n, _ in self.schema]

    @property
    def payload_schema(self):
        """The fields a payload carries: the schema without the message's times."""
        return tuple((n, t) for n, t in self.schema if n not in MESSAGE_TIME_FIELDS)

    @property
    def message_time_fields(self):
        """The schema's fields taken from the message's metadata, not its payload."""
        return [n for n, _ in self.schema if n in MESSAGE_TIME_FIELDS]

    def field_type(self, name):
        return dict(self.schema).get(name)

    def to_dict(self):
        data = {"name": self.name, "topic": self.topic, "format": self.format,
                "schema": [[n, t] for n, t in self.schema],
                "timestamp_field": self.timestamp_field}
        for key in ("archive", "earliest_event_time", "max_event_time_ahead"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.routing != "murmur3":          # the default keeps existing hashes
            data["routing"] = self.routing
        return data

    @classmethod
    def from_dict(cls, data):
        return cls(data["name"], data["topic"], tuple(map(tuple, data["schema"])),
                   data["timestamp_field"], data["format"], data.get("archive"),
                   data.get("earliest_event_time"), data.get("max_event_time_ahead"),
                   data.get("routing", "murmur3"))

    def __repr__(self):
        schema = ", ".join(f"{n!r}: {t!r}" for n, t in self.schema)
        extra = "" if self.format == "msgpack" else f", format={self.format!r}"
        for key in ("archive", "earliest_event_time", "max_event_time_ahead"):
            if getattr(self, key) is not None:
                extra += f", {key}={getattr(self, key)!r}"
        if self.routing != "murmur3":
            extra += f", routing={self.routing!r}"
        return (f"Source({self.name!r}, topic={self.topic!r}, schema={{{schema}}}, "
                f"timestamp_field={self.timestamp_field!r}{extra})")

    def _repr_html_(self):
        rows = [("topic", self.topic), ("format", self.format),
                ("event time", self.timestamp_field),
                ("schema", ", ".join(f"{n}: {t}" for n, t in self.schema))]
        if self.archive:
            rows.append(("archive", self.archive))
        if self.routing != "murmur3":
            rows.append(("routing", self.routing))
        return _html_table(f"source <b>{_e(self.name)}</b>", rows)


# --------------------------------------------------------------------------
# Window and Feature


def _positive(ms, what, example):
    if ms <= 0:
        raise DefinitionError(f"{what} is {format_duration(ms)}; give a positive duration, e.g. "
                              f"{example}, or use Window.lifetime()")
    return ms


@dataclass(frozen=True)
class Window:
    """lifetime, tumbling(size) or sliding(size, hop); sizes in milliseconds."""
    size_ms: int = 0
    hop_ms: int = 0

    @classmethod
    def lifetime(cls):
        return cls()

    @classmethod
    def tumbling(cls, size):
        size = _positive(duration_ms(size), "a tumbling window's size",
                         "Window.tumbling('1h')")
        return cls(size, size)

    @classmethod
    def sliding(cls, size, hop):
        return cls(_positive(duration_ms(size), "a sliding window's size",
                             "Window.sliding('7d', '1h')"),
                   _positive(duration_ms(hop), "a sliding window's hop",
                             "Window.sliding('7d', '1h')"))

    @property
    def kind(self):
        if self.size_ms == 0:
            return "lifetime"
        return "tumbling" if self.size_ms == self.hop_ms else "sliding"

    def to_dict(self):
        return {"size_ms": self.size_ms, "hop_ms": self.hop_ms}

    @classmethod
    def from_dict(cls, data):
        return cls(data["size_ms"], data["hop_ms"])

    def describe(self):
        """'lifetime', 'tumbling 1h' or 'sliding 7d hop 1h'."""
        if self.kind == "lifetime":
            return "lifetime"
        if self.kind == "tumbling":
            return f"tumbling {format_duration(self.size_ms)}"
        return f"sliding {format_duration(self.size_ms)} hop {format_duration(self.hop_ms)}"

    def __repr__(self):
        if self.kind == "lifetime" and self.hop_ms == 0:
            return "Window.lifetime()"
        if self.kind == "tumbling":
            return f"Window.tumbling({format_duration(self.size_ms)!r})"
        return (f"Window.sliding({format_duration(self.size_ms)!r}, "
                f"{format_duration(self.hop_ms)!r})")


@dataclass(frozen=True)
class Feature:
    """An aggregation of a source column per entity over a window.

    ``column`` is None for count (``COUNT(*)``). ``filter`` is an optional SQL
    boolean expression over the source's columns (``"readtime > 0 AND
    article IN (1, 2)"``); only events for which it is true are aggregated. It
    is stored in a canonical form, so equal filters hash equally. ``n`` is the
    length of ``last_n``; ``k`` the number of values of ``top_k``.
    ``lateness_ms`` (or a duration such as ``"5m"``) is the allowed lateness of
    events in a window."""
    name: str
    aggregation: str
    column: str = None
    window: Window = field(default_factory=Window.lifetime)
    lateness_ms: int = 0
    filter: str = None
    n: int = None
    k: int = None

    def __post_init__(self):
        if not isinstance(self.lateness_ms, int) or isinstance(self.lateness_ms, bool):
            object.__setattr__(self, "lateness_ms", duration_ms(self.lateness_ms))
        spec = AGGREGATIONS.get(self.aggregation)
        if spec is not None and spec.default_param is not None and \
                getattr(self, spec.param) is None:       # stored: the hash says what ran
            object.__setattr__(self, spec.param, spec.default_param)
        if self.filter is not None:
            try:
                object.__setattr__(self, "filter", filters.normalize_filter(self.filter))
            except FilterError as error:
                raise DefinitionError(f"feature {self.name!r}: filter {self.filter!r}: "
                                      f"{error}") from None

    @property
    def param(self):
        """The integer parameter of the aggregation (n of last_n, k of top_k) or None."""
        return self.n if self.n is not None else self.k

    def to_dict(self):
        data = {"name": self.name, "aggregation": self.aggregation, "column": self.column,
                "window": self.window.to_dict(), "lateness_ms": self.lateness_ms}
        for key in ("filter", "n", "k"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    @classmethod
    def from_dict(cls, data):
        return cls(data["name"], data["aggregation"], data.get("column"),
                   Window.from_dict(data["window"]), data.get("lateness_ms", 0),
                   data.get("filter"), data.get("n"), data.get("k"))

    def expression(self):
        """A short description: ``sum(readtime) sliding 7d hop 1h where readtime > 0``."""
        args = self.column or "*"
        if self.param is not None:
            args += f", {self.param}"
        text = f"{self.aggregation}({args}) {self.window.describe()}"
        if self.lateness_ms:
            text += f" lateness {format_duration(self.lateness_ms)}"
        if self.filter:
            text += f" where {self.filter}"
        return text

    def __repr__(self):
        parts = [repr(self.name), repr(self.aggregation)]
        if self.column is not None:
            parts.append(repr(self.column))
        if self.window != Window.lifetime():
            parts.append(f"window={self.window!r}")
        if self.lateness_ms:
            parts.append(f"lateness_ms={format_duration(self.lateness_ms)!r}")
        for key in ("filter", "n", "k"):
            if getattr(self, key) is not None:
                parts.append(f"{key}={getattr(self, key)!r}")
        return f"Feature({', '.join(parts)})"

    def validate(self, source, where):
        """Check the feature against ``source``; ``where`` names the view."""
        where = f"{where}, feature {self.name!r}"
        _check_name("feature", self.name, where)
        spec = AGGREGATIONS.get(self.aggregation)
        if spec is None:
            raise DefinitionError(
                f"{where}: aggregation {self.aggregation!r} is unknown; "
                f"{_suggest(self.aggregation, AGGREGATIONS)}use one of "
                f"{', '.join(AGGREGATIONS)}")
        fields = ", ".join(source.fields)
        if not spec.takes_column:
            if self.column is not None:
                raise DefinitionError(
                    f"{where}: column {self.column!r} is set, but {self.aggregation} counts "
                    f"events and takes no column; drop the column, or count the events where "
                    f"it is set with filter=\"{self.column} IS NOT NULL\"")
        else:
            if self.column is None:
                raise DefinitionError(f"{where}: column is missing; {self.aggregation} "
                                      f"aggregates a column: name one of {fields}")
            column_type = source.field_type(self.column)
            if column_type is None:
                raise DefinitionError(
                    f"{where}: column {self.column!r} is not a field of source "
                    f"{source.name!r}; {_suggest(self.column, source.fields)}"
                    f"use one of {fields}")
            if column_type not in spec.column_types:
                usable = [a for a, s in AGGREGATIONS.items()
                          if s.takes_column and column_type in s.column_types]
                raise DefinitionError(
                    f"{where}: aggregation {self.aggregation} needs a numeric column, but "
                    f"column {self.column!r} is {column_type}; aggregate a numeric column, "
                    f"or use {', '.join(['count'] + usable)} for a {column_type} column")
        for key in ("n", "k"):
            value = getattr(self, key)
            if spec.param == key:
                if value is None:
                    raise DefinitionError(f"{where}: {key} is missing; {self.aggregation} "
                                          f"needs {key}, e.g. {key}=10")
                if not isinstance(value, int) or isinstance(value, bool) \
                        or not 1 <= value <= spec.max_param:
                    raise DefinitionError(f"{where}: {key}={value!r} is out of range; "
                                          f"use an integer from 1 to {spec.max_param}")
            elif value is not None:
                hint = (f"{spec.param} is the parameter of {self.aggregation}" if spec.param
                        else f"{self.aggregation} takes no parameter")
                raise DefinitionError(f"{where}: {key}={value!r} does not apply to "
                                      f"{self.aggregation}; {hint}: drop {key}")
        _validate_window(self.window, where)
        if self.lateness_ms < 0:
            raise DefinitionError(f"{where}: lateness_ms {self.lateness_ms} is negative; "
                                  "use 0 or a positive duration such as '5m'")
        if self.lateness_ms and not self.window.size_ms:
            raise DefinitionError(f"{where}: lateness_ms is set, but a lifetime window "
                                  "accepts events of any age; drop lateness_ms, or give the "
                                  "feature a window")
        if self.window.size_ms:
            hop = self.window.hop_ms
            tiles = self.window.size_ms // hop + -(-self.lateness_ms // hop)
            if tiles > MAX_TILES:
                raise DefinitionError(
                    f"{where}: the window ({self.window.describe()}) with lateness "
                    f"{format_duration(self.lateness_ms)} keeps {tiles:,} tiles per entity; "
                    f"the limit is {MAX_TILES:,}: use a larger hop or less lateness")
        if self.filter is not None:
            try:
                filters.check_filter(self.filter, source.schema)
            except FilterError as error:
                raise DefinitionError(f"{where}: filter {self.filter!r}: {error}") from None


# Hops people use, for suggesting one that divides a window.
_ROUND_HOPS = [duration_ms(d) for d in (
    "1s", "5s", "10s", "15s", "30s", "1m", "5m", "10m", "15m", "20m", "30m", "1h", "2h",
    "3h", "4h", "6h", "8h", "12h", "1d", "7d")]


def _validate_window(window, where):
    size, hop = window.size_ms, window.hop_ms
    if not isinstance(size, int) or not isinstance(hop, int) or size < 0 or hop < 0:
        raise DefinitionError(f"{where}: window size and hop must be positive durations; "
                              "use Window.sliding('7d', '1h') or Window.tumbling('1h')")
    if size == 0:
        if hop:
            raise DefinitionError(f"{where}: window has a hop ({format_duration(hop)}) but "
                                  "no size; use Window.lifetime() or give the window a size")
        return
    if hop <= 0 or size % hop:
        hop_text = format_duration(hop) if hop > 0 else "0"
        smaller = [h for h in _ROUND_HOPS if size % h == 0 and h < hop]
        larger = [h for h in _ROUND_HOPS if size % h == 0 and h > hop]
        examples = ([format_duration(smaller[-1])] if smaller else []) + \
                   ([format_duration(larger[0])] if larger and larger[0] < size else [])
        example = f", e.g. {' or '.join(examples)}" if examples else ""
        raise DefinitionError(
            f"{where}: window hop {hop_text} does not divide the window size "
            f"{format_duration(size)}; use a hop that divides it{example}")


@dataclass(frozen=True)
class Derived:
    """A feature computed from the view's other features, e.g.
    ``Derived("reading_diversity", "ENTROPY(categories)")`` or
    ``Derived("mean_readtime", "total_readtime / reads")``: an expression of
    :mod:`tally.core.expressions`, computed with the record it belongs to
    (so served and trained on alike)."""
    name: str
    expression: str

    aggregation = "derived"
    kind = "expression"

    def to_dict(self):
        return {"name": self.name, "expression": self.expression}

    @classmethod
    def from_dict(cls, data):
        return cls(data["name"], data["expression"])

    def describe(self):
        return self.expression

    def __repr__(self):
        return f"Derived({self.name!r}, {self.expression!r})"


@dataclass(frozen=True)
class RequestFunction:
    """A request-time feature computed by a Python function, vectorised:
    ``function`` ("package.module:name") is called once per request (or per
    training-set chunk) with one numpy array per input (object arrays for
    strings and lists; NaN or None for nulls) and returns one array of
    ``type`` (int64, float64 or string). ``inputs`` name what it reads, as a
    :class:`Derived` expression would. ``code`` is the sha256 of the
    function's source, taken when defined: a changed function is a new
    version of its service, and a lookup server running other code refuses
    it rather than answering differently."""
    name: str
    function: str
    inputs: tuple
    type: str = "float64"
    code: str = None

    kind = "function"

    def __post_init__(self):
        inputs = (self.inputs,) if isinstance(self.inputs, str) else self.inputs
        object.__setattr__(self, "inputs", tuple(inputs or ()))
        if self.code is None:
            from tally.core.request_features import function_code
            object.__setattr__(self, "code", function_code(self.function, self.name))

    def to_dict(self):
        return {"name": self.name, "function": self.function, "inputs": list(self.inputs),
                "type": self.type, "code": self.code}

    @classmethod
    def from_dict(cls, data):
        return cls(data["name"], data["function"], tuple(data["inputs"]), data["type"],
                   data["code"])

    def describe(self):
        return f"{self.function}({', '.join(self.inputs)}) -> {self.type}"


# --------------------------------------------------------------------------
# Join: events enriched with a dimension's row as of their time


@dataclass(frozen=True)
class Join:
    """Each event of a view's source enriched with a dimension's attributes
    as of the event's time (see :mod:`tally.core.enrich` for the semantics).

    ``dimension`` is a Source whose topic is a changelog of a keyed table,
    e.g. ``articles`` (article id -> category, content_length): every row is
    a new version of its key's attributes, valid from the row's event time.
    ``on`` is the event field holding the dimension key; ``key`` the
    dimension's key field (default: the same name). ``columns`` are the
    attributes taken; they join the event's fields under ``prefix + name``.
    By default they are those the view's features and filters use, so a view
    keeps no attribute it does not read (and SQL, which names the ones it
    uses, gives the same view)."""
    dimension: Source
    on: str
    key: str = None
    columns: tuple = None
    prefix: str = ""

    def __post_init__(self):
        if self.key is None:
            object.__setattr__(self, "key", self.on)
        if self.columns is not None:
            columns = (self.columns,) if isinstance(self.columns, str) else self.columns
            object.__setattr__(self, "columns", tuple(columns))
        object.__setattr__(self, "prefix", self.prefix or "")

    def taking(self, used):
        """This join with ``columns`` resolved from the names a view uses."""
        if self.columns is not None or not isinstance(self.dimension, Source):
            return self
        taken = tuple(n for n in self.dimension.fields if n != self.key
                      and self.prefix + n in used)
        return replace(self, columns=taken)

    @property
    def fields(self):
        """((enriched field name, type), ...): what the join adds to an event."""
        return tuple((self.prefix + c, self.dimension.field_type(c)) for c in self.columns)

    def validate(self, source, where):
        """Check the join against the view's event ``source``."""
        if not isinstance(self.dimension, Source):
            raise DefinitionError(f"{where}: a join's dimension must be a Source (the "
                                  "changelog topic of a keyed table, e.g. articles)")
        where = f"{where}, join {self.dimension.name!r}"
        dimension = self.dimension
        on_type, key_type = source.field_type(self.on), dimension.field_type(self.key)
        if on_type is None:
            raise DefinitionError(
                f"{where}: on {self.on!r} is not a field of source {source.name!r}; "
                f"{_suggest(self.on, source.fields)}name the event field holding the "
                f"{dimension.name} key (fields: {', '.join(source.fields)})")
        if key_type is None:
            raise DefinitionError(
                f"{where}: key {self.key!r} is not a field of {dimension.name!r}; "
                f"{_suggest(self.key, dimension.fields)}set key= to the dimension's key "
                f"field (fields: {', '.join(dimension.fields)})")
        if key_type not in KEY_TYPES or on_type != key_type:
            raise DefinitionError(
                f"{where}: event field {self.on!r} is {on_type} but the dimension's key "
                f"{self.key!r} is {key_type}; join on fields of one key type (int64 or "
                "string)")
        if self.prefix and not _is_name(self.prefix + "x"):
            raise DefinitionError(f"{where}: prefix {self.prefix!r} is not a name prefix; use "
                                  "letters, digits and underscores, e.g. 'article_'")
        for column in self.columns:
            if dimension.field_type(column) is None:
                raise DefinitionError(
                    f"{where}: column {column!r} is not a field of {dimension.name!r}; "
                    f"{_suggest(column, dimension.fields)}use one of "
                    f"{', '.join(dimension.fields)}")
            if column == self.key:
                raise DefinitionError(f"{where}: column {column!r} is the dimension's key, "
                                      f"which the event already holds as {self.on!r}; drop it")
            name = self.prefix + column
            if source.field_type(name) is not None:
                raise DefinitionError(
                    f"{where}: column {column!r} would be {name!r}, which source "
                    f"{source.name!r} already has; give the join a prefix, e.g. "
                    f"prefix='{dimension.name}_'")

    def to_dict(self):
        return {"dimension": self.dimension.to_dict(), "on": self.on, "key": self.key,
                "columns": list(self.columns), "prefix": self.prefix}

    @classmethod
    def from_dict(cls, data):
        return cls(Source.from_dict(data["dimension"]), data["on"], data["key"],
                   tuple(data["columns"]), data["prefix"])

    def describe(self):
        """``articles on article (category, content_length)``."""
        on = self.on if self.key == self.on else f"{self.on} = {self.key}"
        prefix = f" as {self.prefix}*" if self.prefix else ""
        return f"{self.dimension.name} on {on} ({', '.join(self.columns)}){prefix}"

    def __repr__(self):
        parts = [self.dimension.name, f"on={self.on!r}"]
        if self.key != self.on:
            parts.append(f"key={self.key!r}")
        parts.append(f"columns={self.columns!r}")
        if self.prefix:
            parts.append(f"prefix={self.prefix!r}")
        return f"Join({', '.join(parts)})"


# --------------------------------------------------------------------------
# FeatureView


@dataclass(frozen=True)
class FeatureView:
    """The features of one entity from one source, stored as one online record.

    ``online_expiry`` (milliseconds, or a duration such as ``"30d"``; 0 means
    never) is how long an entity's online record lives after its last update.
    ``tags`` are free-form labels for discovery (stored sorted). ``joins``
    enrich each event with dimensions' attributes as of its time
    (:class:`Join`); features and filters read them like the source's fields."""
    name: str
    entity: Entity
    source: Source
    features: tuple
    key_column: str = None       # defaults to the entity's name
    owner: str = ""
    description: str = ""
    tags: tuple = ()
    online_expiry: int = 0
    joins: tuple = ()
    derived: tuple = ()

    kind = "view"

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))
        derived = (self.derived,) if isinstance(self.derived, Derived) else self.derived
        object.__setattr__(self, "derived", tuple(derived or ()))
        joins = (self.joins,) if isinstance(self.joins, Join) else self.joins
        used = self._used_names()
        object.__setattr__(self, "joins", tuple(
            j.taking(used) if isinstance(j, Join) else j for j in joins or ()))
        if self.key_column is None:
            object.__setattr__(self, "key_column", self.entity.name)
        tags = (self.tags,) if isinstance(self.tags, str) else self.tags
        object.__setattr__(self, "tags", tuple(sorted(set(tags or ()))))
        if not isinstance(self.online_expiry, int) or isinstance(self.online_expiry, bool):
            try:
                object.__setattr__(self, "online_expiry", duration_ms(self.online_expiry))
            except DefinitionError as error:
                raise DefinitionError(f"view {self.name!r}: online_expiry: {error}") from None
        object.__setattr__(self, "owner", self.owner or "")
        object.__setattr__(self, "description", self.description or "")
        self.validate()

    def _used_names(self):
        """The names the features aggregate or filter on (not the event's own
        fields: a join's attribute never shadows one, see Join.validate)."""
        used = set()
        for feature in self.features:
            if not isinstance(feature, Feature):
                continue                       # refused by validate()
            if feature.column:
                used.add(feature.column)
            if feature.filter:
                used |= filters.filter_columns(feature.filter)
        fields = set(self.source.fields) if isinstance(self.source, Source) else set()
        return used - fields

    @property
    def input_source(self):
        """The source as features see it: its fields plus the joins' attributes."""
        if not self.joins:
            return self.source
        extra = tuple(f for join in self.joins for f in join.fields)
        return replace(self.source, schema=self.source.schema + extra)

    @property
    def feature_names(self):
        """The names of its features, derived ones last."""
        return [f.name for f in self.features] + [d.name for d in self.derived]

    def feature(self, name):
        """A Feature, or a Derived feature, by name."""
        for feature in self.features + self.derived:
            if feature.name == name:
                return feature
        raise KeyError(f"view {self.name!r} has no feature {name!r}; "
                       f"it has {self.feature_names}")

    def validate(self):
        where = f"view {self.name!r}"
        _check_name("view", self.name)
        if not isinstance(self.entity, Entity):
            raise DefinitionError(f"{where}: entity must be an Entity, e.g. "
                                  "Entity('user', 'int64')")
        if not isinstance(self.source, Source):
            raise DefinitionError(f"{where}: source must be a Source")
        key_type = self.source.field_type(self.key_column)
        expected = self.entity.key_type
        if key_type is None:
            raise DefinitionError(
                f"{where}: key_column {self.key_column!r} (the key of entity "
                f"{self.entity.name!r}) is not a field of source {self.source.name!r}; "
                f"{_suggest(self.key_column, self.source.fields)}add it to the source's "
                f"schema, or set key_column to the field holding the {self.entity.name} key "
                f"(fields: {', '.join(self.source.fields)})")
        if key_type != expected:
            raise DefinitionError(
                f"{where}: key_column {self.key_column!r} is {key_type} in source "
                f"{self.source.name!r}, but entity {self.entity.name!r} has {expected} keys; "
                f"set key_column to a {expected} field, or declare the entity with "
                f"key_type={key_type!r}")
        if not self.features:
            raise DefinitionError(f"{where}: features is empty; add at least one Feature")
        self._validate_joins(where)
        inputs = self.input_source
        seen = set()
        for feature in self.features:
            if not isinstance(feature, Feature):
                raise DefinitionError(f"{where}: features must be Feature objects, "
                                      f"found {feature!r}")
            if feature.name in seen:
                raise DefinitionError(f"{where}: feature name {feature.name!r} is used twice; "
                                      "give each feature a distinct name")
            seen.add(feature.name)
            feature.validate(inputs, where)
        self._validate_derived(where, seen)
        for join in self.joins:
            if not join.columns:
                attributes = [join.prefix + n for n in join.dimension.fields if n != join.key]
                raise DefinitionError(
                    f"{where}, join {join.dimension.name!r}: the view uses none of its "
                    f"attributes ({', '.join(attributes)}); aggregate or filter one, or "
                    "drop the join")
        if self.online_expiry < 0:
            raise DefinitionError(f"{where}: online_expiry is negative; use 0 (never "
                                  "expire) or a duration such as '30d'")
        for tag in self.tags:
            if not isinstance(tag, str) or not tag.strip() or "," in tag:
                raise DefinitionError(f"{where}: tag {tag!r} is not valid; tags are "
                                      "non-empty strings without commas")
        for key in ("owner", "description"):
            if not isinstance(getattr(self, key), str):
                raise DefinitionError(f"{where}: {key} must be a string")

    def _validate_derived(self, where, names):
        from tally.core.aggregations import value_type
        from tally.core.expressions import Expression, ExpressionError
        inputs = self.input_source
        types = {f.name: value_type(f.aggregation, inputs.field_type(f.column))
                 for f in self.features}
        for derived in self.derived:
            if not isinstance(derived, Derived):
                raise DefinitionError(f"{where}: derived must be Derived objects, found "
                                      f"{derived!r}")
            _check_name("feature", derived.name, f"{where}, derived {derived.name!r}")
            if derived.name in names:
                raise DefinitionError(f"{where}: feature name {derived.name!r} is used twice; "
                                      "give each feature a distinct name")
            names.add(derived.name)
            try:
                Expression(derived.expression, types)
            except ExpressionError as error:
                raise DefinitionError(f"{where}, derived {derived.name!r}: {error}") from None

    def _validate_joins(self, where):
        added = {}
        for join in self.joins:
            if not isinstance(join, Join):
                raise DefinitionError(f"{where}: joins must be Join objects, found {join!r}")
            join.validate(self.source, where)
            for name, _ in join.fields:
                if name in added:
                    raise DefinitionError(
                        f"{where}: joins {added[name]!r} and {join.dimension.name!r} both "
                        f"add {name!r}; give one of them a prefix, e.g. "
                        f"prefix='{join.dimension.name}_'")
                added[name] = join.dimension.name

    # canonical form --------------------------------------------------------

    def to_dict(self):
        data = {"name": self.name, "entity": self.entity.to_dict(),
                "source": self.source.to_dict(), "key_column": self.key_column,
                "features": [f.to_dict() for f in self.features], "owner": self.owner,
                "description": self.description, "tags": list(self.tags),
                "online_expiry_ms": self.online_expiry}
        if self.joins:                 # only when set: older views keep their hashes
            data["joins"] = [j.to_dict() for j in self.joins]
        if self.derived:
            data["derived"] = [d.to_dict() for d in self.derived]
        return data

    @classmethod
    def from_dict(cls, data):
        return cls(data["name"], Entity.from_dict(data["entity"]),
                   Source.from_dict(data["source"]),
                   tuple(Feature.from_dict(f) for f in data["features"]),
                   data["key_column"], data.get("owner", ""), data.get("description", ""),
                   tuple(data.get("tags", ())), data.get("online_expiry_ms", 0),
                   tuple(Join.from_dict(j) for j in data.get("joins", ())),
                   tuple(Derived.from_dict(d) for d in data.get("derived", ())))

    def state_dict(self):
        """The part of the definition that determines the computed state: two
        versions with equal state hashes can share state (metadata such as owner,
        description, tags or online expiry changed, nothing the stream
        computation depends on). Derived features are part of it: records
        carry them."""
        data = self.to_dict()
        for key in ("owner", "description", "tags", "online_expiry_ms"):
            data.pop(key)
        return data

    # display --------------------------------------------------------------

    def __repr__(self):
        lines = [f"FeatureView({self.name!r}, entity={self.entity.name}:{self.entity.key_type}"
                 + ("" if self.key_column == self.entity.name
                    else f" (key {self.key_column})")
                 + f", source={self.source.name} (topic {self.source.topic!r})"]
        meta = [f"{k}={getattr(self, k)!r}" for k in ("owner", "description")
                if getattr(self, k)]
        if self.tags:
            meta.append(f"tags={list(self.tags)}")
        if self.online_expiry:
            meta.append(f"online_expiry={format_duration(self.online_expiry)!r}")
        if meta:
            lines[0] += ", " + ", ".join(meta)
        lines[0] += ","
        lines += [f"    join {join.describe()}" for join in self.joins]
        for feature in self.features:
            lines.append(f"    {feature.name} = {feature.expression()}")
        lines += [f"    {d.name} = {d.expression}" for d in self.derived]
        return "\n".join(lines) + ")"

    def _repr_html_(self):
        head = [("entity", f"{self.entity.name} ({self.entity.key_type}, key column "
                           f"{self.key_column})"),
                ("source", f"{self.source.name} (topic {self.source.topic}, "
                           f"{self.source.format})")]
        for key in ("owner", "description"):
            if getattr(self, key):
                head.append((key, getattr(self, key)))
        if self.tags:
            head.append(("tags", ", ".join(self.tags)))
        if self.online_expiry:
            head.append(("online expiry", format_duration(self.online_expiry)))
        head += [("join", join.describe()) for join in self.joins]
        rows = "".join(
            f"<tr><td><b>{_e(f.name)}</b></td><td>{_e(f.aggregation)}</td>"
            f"<td>{_e(f.column or '*')}{'' if f.param is None else ', ' + str(f.param)}</td>"
            f"<td>{_e(f.window.describe())}</td><td><code>{_e(f.filter or '')}</code></td></tr>"
            for f in self.features)
        return (_html_table(f"feature view <b>{_e(self.name)}</b>", head)
                + "<table><tr><th>feature</th><th>aggregation</th><th>column</th>"
                  f"<th>window</th><th>filter</th></tr>{rows}</table>")


# --------------------------------------------------------------------------
# FeatureService


@dataclass(frozen=True)
class ServiceFeature:
    """One feature of a service: ``view:feature``, answered as column ``alias``."""
    view: str
    feature: str
    alias: str

    def ref(self):
        text = f"{self.view}:{self.feature}"
        return text if self.alias == self.feature else f"{text} as {self.alias}"


@dataclass(frozen=True)
class FeatureService:
    """The features one model reads, across views and entities, answered in
    one call: a lookup with every entity's key returns the whole vector, and
    ``training_set(spine, service=...)`` the same columns offline.

    ``features`` are ``"view:feature"`` or ``"view:feature as alias"``
    strings, or FeatureView objects (all their features). Each answer column
    is named after its feature (or alias); two features answering under one
    name are refused. Views are named, not pinned: the service reads the
    version each view serves.

    ``computed`` are request-time features: each a :class:`Derived`
    expression (``tally.core.expressions``) or a :class:`RequestFunction`
    over the row's features (``view.feature`` or the column's name) and its
    request fields (``request.<entity>``, the keys of the row, and the
    ``request`` fields declared here: ``{"hour": "int64"}``). The lookup
    server computes them on each request, a training set on the spine's
    columns, with the same code."""
    name: str
    features: tuple
    owner: str = ""
    description: str = ""
    tags: tuple = ()
    computed: tuple = ()
    request: tuple = ()

    kind = "service"

    def __post_init__(self):
        _check_name("feature service", self.name)
        where = f"feature service {self.name!r}"
        items = (self.features,) if isinstance(self.features, (str, FeatureView)) \
            else tuple(self.features or ())
        object.__setattr__(self, "features",
                           tuple(f for item in items for f in _service_features(item, where)))
        tags = (self.tags,) if isinstance(self.tags, str) else self.tags
        object.__setattr__(self, "tags", tuple(sorted(set(tags or ()))))
        object.__setattr__(self, "owner", self.owner or "")
        object.__setattr__(self, "description", self.description or "")
        computed = (self.computed,) if isinstance(self.computed, (Derived, RequestFunction)) \
            else self.computed
        object.__setattr__(self, "computed", tuple(computed or ()))
        request = self.request.items() if isinstance(self.request, dict) else self.request
        object.__setattr__(self, "request", tuple((str(n), str(t)) for n, t in request or ()))
        self.validate()

    @property
    def columns(self):
        """The answer's column names, in order: features, then computed ones."""
        return tuple(f.alias for f in self.features) + tuple(c.name for c in self.computed)

    @property
    def views(self):
        """The names of the views it reads, in order of first use."""
        return tuple(dict.fromkeys(f.view for f in self.features))

    def validate(self, views=None):
        """Check the service; with ``views`` ({name: FeatureView}, the views
        it will be served with), also that every feature exists there."""
        where = f"feature service {self.name!r}"
        if not self.features:
            raise DefinitionError(f"{where}: features is empty; name at least one, e.g. "
                                  "'user_reading:total_readtime'")
        answered, listed = {}, set()
        for f in self.features:
            if (f.view, f.feature) in listed:
                raise DefinitionError(f"{where}: {f.view}:{f.feature} is listed twice; "
                                      "list each feature once")
            listed.add((f.view, f.feature))
            if f.alias in answered and answered[f.alias] != f:
                raise DefinitionError(
                    f"{where}: column {f.alias!r} would answer both "
                    f"{answered[f.alias].view}:{answered[f.alias].feature} and "
                    f"{f.view}:{f.feature}; rename one, e.g. "
                    f"'{f.view}:{f.feature} as {f.view}_{f.feature}'")
            answered[f.alias] = f
        for key in ("owner", "description"):
            if not isinstance(getattr(self, key), str):
                raise DefinitionError(f"{where}: {key} must be a string")
        self._validate_computed(where, set(answered))
        if views is not None:
            self._check_against(views, where)
            from tally.core.request_features import compiled_computed
            compiled_computed(self, views)          # types, names and the functions

    def _validate_computed(self, where, columns):
        for name, dtype in self.request:
            _check_name("request field", name, f"{where}, request field {name!r}")
            if dtype not in ("int64", "float64", "string"):
                raise DefinitionError(f"{where}, request field {name!r}: type {dtype!r}; use "
                                      "int64, float64 or string")
        for entry in self.computed:
            if not isinstance(entry, (Derived, RequestFunction)):
                raise DefinitionError(f"{where}: computed must be Derived or RequestFunction "
                                      f"objects, found {entry!r}")
            _check_name("column", entry.name, f"{where}, computed {entry.name!r}")
            if entry.name in columns:
                raise DefinitionError(f"{where}: column {entry.name!r} is answered twice; "
                                      "give the computed feature another name")
            columns.add(entry.name)

    def _check_against(self, views, where):
        keys = {}
        for f in self.features:
            view = views.get(f.view)
            if view is None:
                raise DefinitionError(
                    f"{where}: feature {f.ref()!r}: no view {f.view!r}; "
                    f"{_suggest(f.view, views)}apply the view first or with the service")
            if f.feature not in view.feature_names:
                names = view.feature_names
                raise DefinitionError(
                    f"{where}: feature {f.ref()!r}: view {f.view!r} has no feature "
                    f"{f.feature!r}; {_suggest(f.feature, names)}it has {', '.join(names)}")
            entity = view.entity
            if keys.setdefault(entity.name, entity.key_type) != entity.key_type:
                raise DefinitionError(
                    f"{where}: views read entity {entity.name!r} with {keys[entity.name]} "
                    f"and {entity.key_type} keys; one request row cannot hold both")

    def to_dict(self):
        data = {"name": self.name,
                "features": [{"view": f.view, "feature": f.feature, "alias": f.alias}
                             for f in self.features],
                "owner": self.owner, "description": self.description,
                "tags": list(self.tags)}
        if self.computed:              # only when set: older services keep their hashes
            data["computed"] = [c.to_dict() | {"kind": c.kind} for c in self.computed]
        if self.request:
            data["request"] = [[n, t] for n, t in self.request]
        return data

    @classmethod
    def from_dict(cls, data):
        computed = tuple((RequestFunction if c["kind"] == "function" else Derived).from_dict(c)
                         for c in data.get("computed", ()))
        return cls(data["name"], tuple(ServiceFeature(f["view"], f["feature"], f["alias"])
                                       for f in data["features"]),
                   data.get("owner", ""), data.get("description", ""),
                   tuple(data.get("tags", ())), computed,
                   tuple(map(tuple, data.get("request", ()))))

    def __repr__(self):
        lines = [f"FeatureService({self.name!r},"]
        lines += [f"    {f.ref()}" for f in self.features]
        lines += [f"    {c.name} = {c.describe()}" for c in self.computed]
        if self.request:
            lines.append(f"    request {dict(self.request)}")
        return "\n".join(lines) + ")"

    def _repr_html_(self):
        rows = "".join(f"<tr><td><b>{_e(f.alias)}</b></td><td>{_e(f.view)}</td>"
                       f"<td>{_e(f.feature)}</td></tr>" for f in self.features)
        return (f"<div>feature service <b>{_e(self.name)}</b></div><table><tr>"
                f"<th>column</th><th>view</th><th>feature</th></tr>{rows}</table>")


def _service_features(item, where):
    """The ServiceFeatures one entry of ``FeatureService.features`` names."""
    if isinstance(item, ServiceFeature):
        return [item]
    if isinstance(item, FeatureView):
        return [ServiceFeature(item.name, f.name, f.name) for f in item.features]
    if not isinstance(item, str):
        raise DefinitionError(f"{where}: {item!r} is not a feature; write 'view:feature' "
                              "(or 'view:feature as name'), or pass a FeatureView")
    text, alias = item.strip(), None
    words = text.split()
    if len(words) == 3 and words[1].lower() == "as":
        text, alias = words[0], words[2]
    elif len(words) != 1:
        raise DefinitionError(f"{where}: {item!r}: write 'view:feature' or "
                              "'view:feature as name'")
    view, _, feature = text.partition(":")
    for what, name in (("view", view), ("feature", feature or "x"), ("column", alias or "x")):
        if not _is_name(name):
            raise DefinitionError(f"{where}: {item!r}: {what} {name!r} is not a name; "
                                  "write 'view:feature' or 'view:feature as name'")
    if not feature:
        raise DefinitionError(f"{where}: {item!r} names a view; write 'view:feature', or "
                              "pass the FeatureView object for all of its features")
    return [ServiceFeature(view, feature, alias or feature)]


# --------------------------------------------------------------------------
# Canonical form and content hash

DEFINITION_CLASSES = {"entity": Entity, "source": Source, "view": FeatureView,
                      "service": FeatureService}


def kind_of(definition):
    """'entity', 'source', 'view' or 'service'."""
    for kind, cls in DEFINITION_CLASSES.items():
        if isinstance(definition, cls):
            return kind
    raise DefinitionError(f"{definition!r} is not a definition; expected an Entity, a Source, "
                          "a FeatureView or a FeatureService")


def canonical_json(data) -> str:
    """JSON with sorted keys and no whitespace: equal content, equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def canonical_document(definition) -> dict:
    return {"format": CANONICAL_FORMAT, "kind": kind_of(definition),
            "spec": definition.to_dict()}


def content_hash(definition) -> str:
    """sha256 (hex) of the definition's canonical JSON."""
    return hashlib.sha256(canonical_json(canonical_document(definition)).encode()).hexdigest()


def state_hash(view) -> str:
    """sha256 of the parts of a view that determine its computed state."""
    document = {"format": CANONICAL_FORMAT, "kind": "view-state", "spec": view.state_dict()}
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def from_document(document):
    """The definition stored as :func:`canonical_document`."""
    return DEFINITION_CLASSES[document["kind"]].from_dict(document["spec"])


def _e(text):
    return html.escape(str(text))


def _html_table(title, rows):
    body = "".join(f"<tr><th style='text-align:left'>{_e(k)}</th><td>{_e(v)}</td></tr>"
                   for k, v in rows)
    return f"<div>{title}</div><table>{body}</table>"
