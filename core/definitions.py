"""Feature definitions: entities, sources, windows, features and views.

Definitions are immutable values: two equal definitions describe the same
computation, which is what versioning (a content hash) relies on.
"""
import re
from dataclasses import dataclass, field

KEY_TYPES = ("int64", "string")
FIELD_TYPES = ("int64", "float64", "string", "bool")
PAYLOAD_FORMATS = ("msgpack",)
NUMERIC_AGGREGATIONS = ("sum", "mean", "min", "max", "first", "last")

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
            "w": 7 * 86_400_000}


class DefinitionError(ValueError):
    """A definition is invalid; the message names the definition, the field and a fix."""


def duration_ms(value) -> int:
    """``"7d"``, ``"1h"``, ``"250ms"`` or an int of milliseconds -> milliseconds."""
    if isinstance(value, int):
        return value
    match = _DURATION.match(str(value))
    if not match:
        raise DefinitionError(f"duration {value!r}: write a number and a unit "
                              "(ms, s, m, h, d or w), e.g. '7d' or '1h'")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


@dataclass(frozen=True)
class Entity:
    """What features describe, e.g. a user; ``key_type`` is int64 or string."""
    name: str
    key_type: str = "int64"

    def __post_init__(self):
        if self.key_type not in KEY_TYPES:
            raise DefinitionError(f"entity {self.name!r}: key_type {self.key_type!r} "
                                  f"is not one of {KEY_TYPES}")


@dataclass(frozen=True)
class Source:
    """An event stream: a Pulsar topic with a typed schema and an event-time field."""
    name: str
    topic: str
    schema: tuple            # ((field name, field type), ...)
    timestamp_field: str = "ts"
    format: str = "msgpack"

    def __post_init__(self):
        object.__setattr__(self, "schema", tuple((str(n), str(t)) for n, t in
                                                 (dict(self.schema).items()
                                                  if isinstance(self.schema, dict)
                                                  else self.schema)))
        for name, dtype in self.schema:
            if dtype not in FIELD_TYPES:
                raise DefinitionError(f"source {self.name!r}: field {name!r} has type "
                                      f"{dtype!r}; use one of {FIELD_TYPES}")
        if self.field_type(self.timestamp_field) != "int64":
            raise DefinitionError(f"source {self.name!r}: timestamp_field "
                                  f"{self.timestamp_field!r} must be an int64 field of the "
                                  "schema (event time in epoch milliseconds)")
        if self.format not in PAYLOAD_FORMATS:
            raise DefinitionError(f"source {self.name!r}: format {self.format!r} is not "
                                  f"one of {PAYLOAD_FORMATS}")

    def field_type(self, name):
        return dict(self.schema).get(name)


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
        size = duration_ms(size)
        return cls(size, size)

    @classmethod
    def sliding(cls, size, hop):
        return cls(duration_ms(size), duration_ms(hop))

    @property
    def kind(self):
        if self.size_ms == 0:
            return "lifetime"
        return "tumbling" if self.size_ms == self.hop_ms else "sliding"


@dataclass(frozen=True)
class Feature:
    """An aggregation of a source column per entity over a window.

    ``column`` is None for count (``COUNT(*)``)."""
    name: str
    aggregation: str
    column: str = None
    window: Window = field(default_factory=Window.lifetime)
    lateness_ms: int = 0


@dataclass(frozen=True)
class FeatureView:
    """The features of one entity from one source, stored as one online record."""
    name: str
    entity: Entity
    source: Source
    features: tuple
    key_column: str = None       # defaults to the entity's name
    owner: str = ""
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))
        if self.key_column is None:
            object.__setattr__(self, "key_column", self.entity.name)
        self.validate()

    def feature(self, name):
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"view {self.name!r} has no feature {name!r}; "
                       f"it has {[f.name for f in self.features]}")

    def validate(self):
        where = f"view {self.name!r}"
        key_type = self.source.field_type(self.key_column)
        expected = self.entity.key_type
        if key_type != expected:
            raise DefinitionError(
                f"{where}: key_column {self.key_column!r} must be a {expected} field of "
                f"source {self.source.name!r} (found {key_type or 'no such field'}); "
                "set key_column to the field holding the entity key")
        seen = set()
        for feature in self.features:
            if feature.name in seen:
                raise DefinitionError(f"{where}: feature name {feature.name!r} is used twice; "
                                      "give each feature a distinct name")
            seen.add(feature.name)
            self._validate_feature(where, feature)

    def _validate_feature(self, where, feature):
        where = f"{where}, feature {feature.name!r}"
        from tally.core.arena import KINDS     # the aggregations the core implements
        if feature.aggregation not in KINDS:
            raise DefinitionError(f"{where}: aggregation {feature.aggregation!r} is unknown; "
                                  f"use one of {sorted(KINDS)}")
        if feature.aggregation in NUMERIC_AGGREGATIONS:
            column_type = self.source.field_type(feature.column)
            if column_type is None:
                raise DefinitionError(f"{where}: column {feature.column!r} is not a field of "
                                      f"source {self.source.name!r}; use one of "
                                      f"{[n for n, _ in self.source.schema]}")
            if column_type not in ("int64", "float64", "bool"):
                raise DefinitionError(f"{where}: {feature.aggregation} needs a numeric column, "
                                      f"but {feature.column!r} is {column_type}")
        window = feature.window
        if window.size_ms and (window.hop_ms <= 0 or window.size_ms % window.hop_ms):
            raise DefinitionError(f"{where}: the hop ({window.hop_ms} ms) must divide the "
                                  f"window ({window.size_ms} ms); pick a hop such as 1h or 1d")
