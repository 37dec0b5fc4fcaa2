"""Tally SQL: feature views in a small SQL dialect, parsed by sqlglot.

The dialect (:class:`tally.core.dialect.Tally`) subclasses sqlglot's
``Dialect``, ``Tokenizer``, ``Parser`` and ``Generator``: it adds the ``WINDOW
SLIDING | TUMBLING | LIFETIME`` clause and ``CREATE SOURCE``; everything else
is sqlglot's own SQL parser. No text is pre-processed, and no regular
expression touches SQL. This module translates: parsed statements are translated into the same definition objects as the
Python DSL (:mod:`tally.core.definitions`), so a view written in SQL equals
the view written in Python.

Grammar (statements are separated by ``;``; ``--`` starts a comment)::

    CREATE SOURCE name (field type, ...)
        [WITH (topic = 'topic', format = 'msgpack' | 'json' | 'arrow',
               event_time = 'ts' | '@event_time' | '@publish_time',
               archive = 's3://bucket/path/',
               routing = 'murmur3' | 'java_string_hash' | 'go_java_string_hash')]

        types: BIGINT | INT | INT64 | INTEGER -> int64;  DOUBLE | FLOAT | FLOAT64 |
        REAL -> float64;  VARCHAR | TEXT | STRING -> string;  BOOLEAN | BOOL -> bool.
        topic defaults to the source's name, format to msgpack, event_time to ts
        (an int64 field: epoch milliseconds; '@event_time' and '@publish_time'
        are the message's own times, see Source), routing to murmur3 (how the
        producers route keys to partitions).

    CREATE VIEW name
        [WITH (owner = '...', description = '...', tags = 'a, b', online_expiry = '30d')]
        AS select

    CREATE FEATURE SERVICE name
        [WITH (owner = '...', description = '...', tags = 'a, b')]
        AS SELECT view.feature [AS column], ...

    select :=
        SELECT [key_column [AS entity],] aggregate [AS feature], ...
        FROM source [[AS] alias]
        [[LEFT] JOIN dimension [[AS] alias] ON alias.field = dimension_alias.key
                                         | USING (field)] ...
        [WHERE filter]
        GROUP BY key_column
        [WINDOW window_spec | name AS window_spec, ...]

    window_spec := SLIDING n unit HOP n unit [LATENESS n unit]
                 | TUMBLING n unit [LATENESS n unit]
                 | LIFETIME
        unit: MILLISECOND(S) | SECOND(S) | MINUTE(S) | HOUR(S) | DAY(S) | WEEK(S)

    aggregate := agg_call [FILTER (WHERE filter)] [OVER window_name]
    agg_call  := COUNT(*) | COUNT(col) | SUM(col) | AVG(col) | MEAN(col) | MIN(col)
               | MAX(col) | FIRST(col) | LAST(col) | LAST_N(col, n) | LAST(col, n)
               | APPROX_COUNT_DISTINCT(col) | DISTINCT_COUNT(col)
               | APPROX_TOP_K(col, k) | TOP_K(col, k)

Meaning:

* The GROUP BY column is the entity's key column. The entity is named by the
  key's alias in the SELECT list (``SELECT user_id AS user``), else by the
  column; its key type is the column's type (int64 or string). An entity
  passed in the catalog (``entities=``) under that name must agree.
* An aggregate without OVER uses the unnamed window spec of the WINDOW
  clause, or the lifetime window when there is none; ``OVER name`` picks a
  named spec. So one view can mix windows, as in the Python DSL.
* ``WHERE`` applies to every feature; ``FILTER (WHERE ...)`` to one; both
  are ANDed. ``COUNT(col)`` counts the events where ``col IS NOT NULL``.
  Filters follow :mod:`tally.core.filters`.
* A feature without alias is named ``<aggregation>_<column>`` (``sum_readtime``,
  ``distinct_count_article``), or ``count`` for ``COUNT(*)``.
* Aggregated columns are numeric (BIGINT, DOUBLE, BOOLEAN): the core's arenas
  hold float64 values (see :mod:`tally.core.aggregations`).
  ``n`` of LAST_N is 1..4096, ``k`` of APPROX_TOP_K 1..1024.
* ``FROM`` names a source declared earlier in the same text with CREATE
  SOURCE, or one passed in the catalog (``sources=``; the CLI passes the
  sources already in the registry).

* ``JOIN`` enriches each event with the dimension's row as of the event's
  time (``tally.core.enrich``): ``dimension`` is a source whose topic is a
  changelog of a keyed table. Columns of the dimension, qualified with its
  alias or unqualified where no event field has the name, are aggregated
  and filtered like the event's own. A JOIN without a row for the event's
  key keeps the event, with null attributes, so JOIN and LEFT JOIN are one.
  The view takes the dimension columns it uses; when one is named like an
  event field, the join's columns get the prefix ``<alias>_``.

Anything else (RIGHT, FULL and CROSS JOIN, subqueries, WITH, UNION, HAVING, ORDER BY, LIMIT,
DISTINCT, window functions ``OVER (...)``, non-aggregate select items other
than the key, expressions inside aggregates, other statements) is refused
with a message naming the construct and a fix.

Long because it translates every construct of the dialect and refuses,
with a message naming the fix, each one outside it.
"""
from sqlglot import exp, generator
from sqlglot.errors import ParseError, TokenError

from tally.core import filters
from tally.core.aggregations import AGGREGATIONS, SQL_NAMES
from tally.core.definitions import (Derived, Entity, Feature, FeatureService, FeatureView, Join,
                                    ServiceFeature, Source, Window)
from tally.core.dialect import Tally, WindowSpec, format_parse_error, needs_quotes, window_spec_sql
from tally.core.durations import format_duration
from tally.core.errors import DefinitionError
from tally.core.types import MESSAGE_TIME_FIELDS

# --------------------------------------------------------------------------
# Translation to definitions

_TYPES = {
    "int64": (exp.DataType.Type.BIGINT, exp.DataType.Type.INT, exp.DataType.Type.SMALLINT,
              exp.DataType.Type.TINYINT),
    "float64": (exp.DataType.Type.DOUBLE, exp.DataType.Type.FLOAT),
    "string": (exp.DataType.Type.VARCHAR, exp.DataType.Type.TEXT, exp.DataType.Type.CHAR,
               exp.DataType.Type.NVARCHAR, exp.DataType.Type.NCHAR),
    "bool": (exp.DataType.Type.BOOLEAN,),
}
_SQL_TYPE = {"int64": "BIGINT", "float64": "DOUBLE", "string": "VARCHAR", "bool": "BOOLEAN"}
SOURCE_PROPERTIES = ("topic", "format", "event_time", "archive", "earliest_event_time",
                     "max_event_time_ahead", "routing")
VIEW_PROPERTIES = ("owner", "description", "tags", "online_expiry")
SERVICE_PROPERTIES = ("owner", "description", "tags", "request")

# sqlglot classes of the aggregates of the dialect -> Tally aggregation
_AGGREGATES = {exp.Sum: "sum", exp.Avg: "mean", exp.Min: "min", exp.Max: "max",
               exp.First: "first", exp.Last: "last", exp.ApproxDistinct: "distinct_count",
               exp.ApproxTopK: "top_k"}
# Tally's own aggregate names, which SQL writes as calls with their arguments
AGGREGATE_NAMES = ", ".join(["COUNT(*)", "COUNT(col)"] + [
    a.sql_call() if "_" in a.sql_names[0] else a.sql_names[0]
    for a in AGGREGATIONS.values() if a.name != "count"])

# Select clauses outside the dialect: arg name -> (construct, fix)
_REFUSED_CLAUSES = {
    "with": ("WITH (a common table expression)", "select FROM a source directly"),
    "with_": ("WITH (a common table expression)", "select FROM a source directly"),
    "distinct": ("DISTINCT", "drop DISTINCT: a view has one row per entity already"),
    "laterals": ("LATERAL", "a view reads one source; define one view per source"),
    "having": ("HAVING", "filter events with WHERE or FILTER (WHERE ...); filter feature "
                         "values when you read them"),
    "order": ("ORDER BY", "drop it: a view has no order"),
    "limit": ("LIMIT", "drop it: a view holds every entity"),
    "offset": ("OFFSET", "drop it: a view holds every entity"),
    "qualify": ("QUALIFY", "drop it"),
    "prewhere": ("PREWHERE", "use WHERE"),
    "sample": ("TABLESAMPLE", "drop it"),
    "locks": ("FOR UPDATE", "drop it"),
    "into": ("SELECT INTO", "drop INTO"),
    "cluster": ("CLUSTER BY", "drop it"),
    "distribute": ("DISTRIBUTE BY", "drop it"),
    "sort": ("SORT BY", "drop it"),
    "connect": ("CONNECT BY", "drop it"),
    "match": ("MATCH_RECOGNIZE", "drop it"),
    "kind": ("SELECT AS STRUCT/VALUE", "drop it"),
    "settings": ("SETTINGS", "drop it"),
    "format": ("FORMAT", "drop it"),
    "options": ("OPTION", "drop it"),
}
_ALLOWED_SELECT_ARGS = {"expressions", "from", "from_", "where", "group", "windows", "joins"}


class _Catalog:
    """Sources and entities a SQL text can refer to, by name."""

    def __init__(self, sources, entities):
        self.sources = _by_name(sources, Source, "sources")
        self.entities = _by_name(entities, Entity, "entities")


def _by_name(items, cls, what):
    if isinstance(items, dict):
        items = items.values()
    result = {}
    for item in items or ():
        if not isinstance(item, cls):
            raise TypeError(f"{what} must be {cls.__name__} objects, got {item!r}")
        result[item.name] = item
    return result


# what sqlglot returns for a lone comment between semicolons (newer versions)
_EMPTY_STATEMENT = getattr(exp, "Semicolon", type(None))


def parse_statements(text):
    """sqlglot ASTs of the statements of ``text`` (comments and empty statements dropped)."""
    try:
        statements = Tally().parse(text)
    except (ParseError, TokenError) as error:
        raise DefinitionError(f"SQL syntax error at {format_parse_error(error)}") from None
    return [s for s in statements if s is not None and not isinstance(s, _EMPTY_STATEMENT)]


def load_sql(text, sources=(), entities=(), name=None, origin=None, **metadata):
    """The definitions (Sources, FeatureViews and FeatureServices, in order) of a SQL text.

    ``sources``/``entities`` are the catalog that ``FROM`` and the GROUP BY key
    resolve against, besides the text's own CREATE SOURCE statements. A bare
    SELECT needs ``name``; ``metadata`` (owner, description, tags,
    online_expiry) applies to such a view. ``origin`` (e.g. a file name)
    prefixes error messages."""
    catalog = _Catalog(sources, entities)
    definitions, view_names = [], set()
    bare = 0
    for statement in parse_statements(text):
        try:
            if isinstance(statement, exp.Create) and statement.args.get("kind") == "SOURCE":
                source = _source_from_create(statement)
                catalog.sources[source.name] = source
                definitions.append(source)
                continue
            if isinstance(statement, exp.Create) and \
                    statement.args.get("kind") == "FEATURE SERVICE":
                definitions.append(_service_from_create(statement))
                continue
            if isinstance(statement, exp.Create) and statement.args.get("kind") == "VIEW":
                view = _view_from_create(statement, catalog)
            elif isinstance(statement, exp.Select):
                bare += 1
                if name is None:
                    raise DefinitionError(
                        f"SQL statement at line {_line(statement)}: the view has no name; "
                        "write CREATE VIEW <name> AS SELECT ..., or pass name=")
                if bare > 1:
                    raise DefinitionError(
                        f"SQL statement at line {_line(statement)}: name={name!r} names one "
                        "view, but the text has several SELECTs; write CREATE VIEW <name> "
                        "AS SELECT ... for each")
                view = _view_from_select(statement, name, dict(metadata), catalog)
            else:
                raise DefinitionError(_outside(statement))
        except DefinitionError as error:
            if origin:
                raise DefinitionError(f"{origin}: {error}") from None
            raise
        if view.name in view_names:
            raise DefinitionError(f"{origin + ': ' if origin else ''}view {view.name!r}: "
                                  "the name is defined twice; give each view a distinct name")
        view_names.add(view.name)
        definitions.append(view)
    return definitions


def view_from_sql(text, sources=(), entities=(), name=None, **metadata):
    """The one FeatureView of a SQL text (which may also CREATE SOURCEs)."""
    views = [d for d in load_sql(text, sources, entities, name, **metadata)
             if isinstance(d, FeatureView)]
    if len(views) != 1:
        raise DefinitionError(f"the SQL text defines {len(views)} views; view_from_sql takes "
                              "exactly one (use load_sql for several)")
    return views[0]


sql = view_from_sql


def _line(node):
    for identifier in node.find_all(exp.Identifier):
        if identifier.meta.get("line"):
            return identifier.meta["line"]
    return "?"


def _outside(statement):
    if isinstance(statement, (exp.Union, exp.Intersect, exp.Except)):
        construct = type(statement).__name__.upper()
        return (f"SQL statement at line {_line(statement)}: {construct} is outside the Tally "
                "SQL dialect; define one view per SELECT")
    if isinstance(statement, exp.Create):
        return (f"SQL statement at line {_line(statement)}: CREATE "
                f"{statement.args.get('kind')} is outside the Tally SQL dialect; use "
                "CREATE SOURCE, CREATE VIEW or CREATE FEATURE SERVICE")
    kind = statement.key.upper()
    return (f"SQL statement at line {_line(statement)}: {kind} is outside the Tally SQL "
            "dialect; write CREATE SOURCE ..., CREATE VIEW ... AS SELECT ... or SELECT ...")


def _properties(create, allowed, where):
    result = {}
    props = create.args.get("properties")
    for prop in props.expressions if props else ():
        if not isinstance(prop, exp.Property) or type(prop) is not exp.Property:
            raise DefinitionError(f"{where}: {prop.sql(dialect=Tally)!r} is outside the Tally "
                                  f"SQL dialect; write WITH (key = 'value', ...) with keys "
                                  f"{', '.join(allowed)}")
        key = prop.name.lower()
        if key not in allowed:
            raise DefinitionError(f"{where}: property {key!r} is unknown; use "
                                  f"{', '.join(allowed)}")
        value = prop.args.get("value")
        if isinstance(value, (exp.Tuple, exp.Array)):
            result[key] = tuple(_property_value(v, key, where) for v in value.expressions)
        else:
            result[key] = _property_value(value, key, where)
    return result


def _property_value(value, key, where):
    if isinstance(value, exp.Literal) and value.is_string:
        return value.this
    shown = value.sql(dialect=Tally) if value is not None else ""
    raise DefinitionError(f"{where}: property {key} = {shown} is not a quoted string; write "
                          f"{key} = '...'")


def _check_create(create, what):
    for flag, text in (("replace", "OR REPLACE"), ("exists", "IF NOT EXISTS"),
                       ("unique", "UNIQUE")):
        if create.args.get(flag):
            raise DefinitionError(f"{what}: CREATE {text} is outside the Tally SQL dialect; "
                                  "drop it: applying a changed definition creates a new "
                                  "version, an unchanged one creates nothing")


def _source_from_create(create):
    schema = create.this
    table = schema.this if isinstance(schema, exp.Schema) else schema
    name = table.name if isinstance(table, exp.Table) else str(table)
    where = f"source {name!r}"
    _check_create(create, where)
    if not isinstance(schema, exp.Schema) or not schema.expressions:
        raise DefinitionError(f"{where}: the fields are missing; write CREATE SOURCE {name} "
                              "(user BIGINT, readtime DOUBLE, ts BIGINT) WITH (topic = '...')")
    fields = []
    for column in schema.expressions:
        if not isinstance(column, exp.ColumnDef):
            raise DefinitionError(f"{where}: {column.sql(dialect=Tally)!r} is outside the "
                                  "Tally SQL dialect; list fields as name TYPE")
        if column.args.get("constraints"):
            raise DefinitionError(f"{where}, field {column.name!r}: column constraints are "
                                  "outside the Tally SQL dialect; drop them")
        fields.append((column.name, _field_type(column, where)))
    props = _properties(create, SOURCE_PROPERTIES, where)
    earliest = props.get("earliest_event_time")
    if earliest is not None:
        try:
            earliest = int(earliest)
        except ValueError:
            raise DefinitionError(f"{where}: earliest_event_time = {earliest!r} is not epoch "
                                  "milliseconds; write e.g. earliest_event_time = "
                                  "'946684800000'") from None
    return Source(name, props.get("topic", name), tuple(fields),
                  timestamp_field=props.get("event_time", "ts"),
                  format=props.get("format", "msgpack"), archive=props.get("archive"),
                  earliest_event_time=earliest,
                  max_event_time_ahead=props.get("max_event_time_ahead"),
                  routing=props.get("routing", "murmur3"))


def _field_type(column, where):
    kind = column.args.get("kind")
    dtype = kind.this if isinstance(kind, exp.DataType) else None
    for tally_type, sql_types in _TYPES.items():
        if dtype in sql_types:
            return tally_type
    shown = kind.sql(dialect=Tally) if kind is not None else "no type"
    raise DefinitionError(f"{where}, field {column.name!r}: type {shown} is not supported; "
                          "use BIGINT (also for event times: epoch milliseconds), DOUBLE, "
                          "VARCHAR or BOOLEAN")


def _view_from_create(create, catalog):
    table = create.this
    if isinstance(table, exp.Schema):
        raise DefinitionError(f"view {table.this.name!r}: a column list after the view name "
                              "is outside the Tally SQL dialect; name features with AS")
    name = table.name
    where = f"view {name!r}"
    _check_create(create, where)
    if isinstance(create.expression, exp.Subquery):
        body = create.expression.this
    else:
        body = create.expression
    if not isinstance(body, exp.Select):
        construct = "UNION" if isinstance(body, exp.Union) else \
            (body.key.upper() if body is not None else "nothing")
        raise DefinitionError(f"{where}: AS {construct} is outside the Tally SQL dialect; "
                              "define the view AS SELECT ... GROUP BY <key>")
    props = _properties(create, VIEW_PROPERTIES, where)
    return _view_from_select(body, name, props, catalog)


def _service_from_create(create):
    """``CREATE FEATURE SERVICE name [WITH (...)] AS SELECT view.feature [AS
    column], ...``: the columns name features; there is no FROM."""
    name = create.this.name
    where = f"feature service {name!r}"
    _check_create(create, where)
    body = create.expression
    if not isinstance(body, exp.Select) or any(
            value not in (None, [], False) for key, value in body.args.items()
            if key != "expressions"):
        raise DefinitionError(f"{where}: write AS SELECT view.feature [AS column], ... "
                              "(a list of features, without FROM or other clauses)")
    features, computed = [], []
    for item in body.expressions:
        column = item.this if isinstance(item, exp.Alias) else item
        if isinstance(column, exp.Column) and column.table and column.table != "request" \
                and not column.args.get("db"):
            features.append(ServiceFeature(column.table, column.name, item.alias_or_name))
        elif isinstance(item, exp.Alias):              # computed from the row's values
            computed.append(Derived(item.alias, column.sql(dialect=Tally)))
        else:
            raise DefinitionError(f"{where}: {item.sql(dialect=Tally)!r} is not a feature; "
                                  "write view.feature [AS column], or name a computed "
                                  "column: expression AS column")
    props = _properties(create, SERVICE_PROPERTIES, where)
    tags = tuple(t.strip() for t in props.pop("tags", "").split(",") if t.strip())
    request = _request_fields(props.pop("request", ""), where)
    return FeatureService(name, tuple(features), tags=tags, computed=tuple(computed),
                          request=request, **props)


def _request_fields(text, where):
    """``'hour BIGINT, device VARCHAR'`` -> ((name, type), ...)."""
    fields = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        words = part.split()
        kind = next((t for t, names in _TYPES.items() if len(words) == 2 and any(
            words[1].upper() == n.name for n in names)), None)
        if kind is None or kind == "bool":
            raise DefinitionError(f"{where}: request field {part!r}: write name TYPE, e.g. "
                                  "request = 'hour BIGINT, device VARCHAR'")
        fields.append((words[0], kind))
    return tuple(fields)


def service_to_sql(service):
    """The CREATE FEATURE SERVICE statement of ``service`` (reads back equal)."""
    props = [f"{key} = {_string(getattr(service, key))}"
             for key in ("owner", "description") if getattr(service, key)]
    if service.tags:
        props.append(f"tags = {_string(', '.join(service.tags))}")
    if service.request:
        props.append("request = " + _string(", ".join(f"{n} {_SQL_TYPE[t]}"
                                                      for n, t in service.request)))
    with_ = f" WITH ({', '.join(props)})" if props else ""
    items = [f"{_ident(f.view)}.{_ident(f.feature)}"
             + ("" if f.alias == f.feature else f" AS {_ident(f.alias)}")
             for f in service.features]
    items += [f"{c.expression} AS {_ident(c.name)}" for c in service.computed
              if c.kind == "expression"]       # a Python function has no SQL form
    return (f"CREATE FEATURE SERVICE {_ident(service.name)}{with_} AS\n"
            "SELECT " + ",\n       ".join(items))


def _view_from_select(select, name, props, catalog):
    where = f"view {name!r}"
    for key, value in select.args.items():
        if value in (None, [], False) or key in _ALLOWED_SELECT_ARGS:
            continue
        construct, fix = _REFUSED_CLAUSES.get(key, (key.upper(), "drop it"))
        raise DefinitionError(f"{where}: {construct} is outside the Tally SQL dialect; {fix}")
    for node in select.find_all(exp.Subquery, exp.Select):
        if node is not select:
            raise DefinitionError(f"{where}: a subquery is outside the Tally SQL dialect; "
                                  "select FROM a source directly and filter with WHERE")

    source, aliases = _from_source(select, catalog, where)
    joins = _joins(select, catalog, source, aliases, where)
    key_column = _group_key(select, source, aliases, where)
    windows = _windows(select, where)

    where_filter = select.args.get("where")
    where_filter = _unqualify(where_filter.this, aliases, where) if where_filter else None

    entity_name, features, computed = None, [], []
    aggregated = [item for item in select.expressions
                  if _is_aggregate(item.this if isinstance(item, exp.Alias) else item)]
    for item in select.expressions:
        alias = item.alias if isinstance(item, exp.Alias) else None
        node = item.this if isinstance(item, exp.Alias) else item
        if isinstance(node, exp.Column) and node.name == key_column:
            _unqualify(node, aliases, where)
            if entity_name is not None:
                raise DefinitionError(f"{where}: the key column {key_column!r} is selected "
                                      "twice; select it once")
            entity_name = alias or key_column
            continue
        if item not in aggregated and _is_computed(node, aggregated):
            computed.append((node, alias))
        else:
            feature = _feature(node, alias, windows, where_filter, aliases, key_column, where)
            features.append(feature)
    derived = [_derived(node, alias, features, windows, where_filter, aliases, key_column,
                        where) for node, alias in computed]
    if not features:
        raise DefinitionError(f"{where}: the SELECT has no aggregate; select at least one, "
                              f"e.g. COUNT(*) AS events ({AGGREGATE_NAMES})")
    entity = _entity(entity_name or key_column, key_column, source, catalog, where)
    metadata = {k: props[k] for k in ("owner", "description") if k in props}
    if "tags" in props:
        tags = props["tags"]
        metadata["tags"] = tuple(t.strip() for t in tags.split(",") if t.strip()) \
            if isinstance(tags, str) else tuple(tags)
    if "online_expiry" in props:
        metadata["online_expiry"] = props["online_expiry"]
    return FeatureView(name, entity, source, tuple(features), key_column=key_column,
                       joins=tuple(joins), derived=tuple(derived), **metadata)


def _is_aggregate(node):
    """Whether a select item is one aggregate (with its FILTER and OVER)."""
    if isinstance(node, exp.Window):
        node = node.this
    if isinstance(node, exp.Filter):
        node = node.this
    return isinstance(node, exp.Count) or type(node) in _AGGREGATES or (
        isinstance(node, exp.Anonymous) and node.name.upper() in SQL_NAMES)


def _is_computed(node, aggregated):
    """A select item computed from aggregates inside it, or from other
    items' features by name (``total / reads``): a derived feature."""
    if any(_is_aggregate(n) for n in node.find_all(exp.Expression)):
        return True
    names = {item.alias for item in aggregated if isinstance(item, exp.Alias)}
    columns = list(node.find_all(exp.Column))
    return bool(columns) and all(not c.table and c.name in names for c in columns)


def _derived(node, alias, features, windows, where_filter, aliases, key_column, where):
    """A select item computed from aggregates (``SUM(x) / COUNT(*)``,
    ``ENTROPY(HISTOGRAM(category))``) or from other items' features: a
    Derived feature; each aggregate inside is the view's feature of the same
    computation, or a new one named as an unnamed item would be."""
    display = node.sql(dialect=Tally)
    if alias is None:
        raise DefinitionError(f"{where}: '{display}' is computed from features; name it, "
                              f"e.g. {display} AS name")
    expression = node.copy()
    for inner in [n for n in expression.find_all(exp.Expression)
                  if _is_aggregate(n) and not any(_is_aggregate(p) for p in _parents(n))]:
        feature = _feature(inner, None, windows, where_filter, aliases, key_column, where)
        same = next((f for f in features if _same_computation(f, feature)), None)
        if same is None:
            features.append(feature)
            same = feature
        inner.replace(exp.column(same.name))
    return Derived(alias, expression.sql(dialect=Tally))


def _parents(node):
    node = node.parent
    while node is not None:
        yield node
        node = node.parent


def _same_computation(a, b):
    return a.to_dict() | {"name": ""} == b.to_dict() | {"name": ""}


def _from_source(select, catalog, where):
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is None:
        raise DefinitionError(f"{where}: FROM is missing; select FROM a source, e.g. "
                              "FROM read_events")
    table = from_.this
    if isinstance(table, exp.Subquery):
        raise DefinitionError(f"{where}: a subquery in FROM is outside the Tally SQL dialect; "
                              "select FROM a source directly")
    if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
        raise DefinitionError(f"{where}: FROM {table.sql(dialect=Tally)} is outside the Tally "
                              "SQL dialect; select FROM a source by name")
    if table.args.get("db") or table.args.get("catalog"):
        raise DefinitionError(f"{where}: FROM {table.sql(dialect=Tally)}: qualified names "
                              f"are outside the Tally SQL dialect; write FROM {table.name}")
    source = catalog.sources.get(table.name)
    if source is None:
        import difflib
        close = difflib.get_close_matches(table.name, list(catalog.sources), n=1)
        known = ", ".join(sorted(catalog.sources)) or "none"
        raise DefinitionError(
            f"{where}: FROM {table.name!r} is not a known source; "
            f"{'did you mean ' + repr(close[0]) + '? ' if close else ''}declare it first "
            f"with CREATE SOURCE {table.name} (...) WITH (topic = '...'), or apply it from "
            f"a Python file (known sources: {known})")
    aliases = {table.name: None}             # alias -> a join's prefix (None: the events)
    if table.alias:
        aliases[table.alias] = None
    return source, aliases


def _joins(select, catalog, source, aliases, where):
    """The JOINs of a select as Joins (each with the prefix its columns get),
    adding their aliases to ``aliases``. A JOIN enriches each event with the
    dimension's row as of the event's time; an event whose key has none keeps
    its place with null attributes (so JOIN and LEFT JOIN mean the same)."""
    nodes = select.args.get("joins") or []
    dimensions = []
    for node in nodes:
        side, kind = (node.args.get("side") or "").upper(), (node.args.get("kind") or "").upper()
        if side not in ("", "LEFT") or kind not in ("", "INNER", "OUTER"):
            raise DefinitionError(
                f"{where}: {' '.join(w for w in (side, kind) if w)} JOIN is outside the Tally "
                "SQL dialect; write JOIN dimension d ON e.key = d.key (each event is "
                "enriched with the dimension's row as of its time)")
        table = node.this
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            raise DefinitionError(f"{where}: JOIN {table.sql(dialect=Tally)} is outside the "
                                  "Tally SQL dialect; join a source by name")
        dimension = catalog.sources.get(table.name)
        if dimension is None:
            known = ", ".join(sorted(catalog.sources)) or "none"
            raise DefinitionError(f"{where}: JOIN {table.name!r} is not a known source; "
                                  f"declare it with CREATE SOURCE (known sources: {known})")
        alias = table.alias or table.name
        if alias in aliases:
            raise DefinitionError(f"{where}: JOIN {table.name}: the name {alias!r} is taken; "
                                  f"give it an alias, e.g. JOIN {table.name} d")
        on, key = _join_condition(node, alias, aliases, where)
        dimensions.append((dimension, alias, on, key))
        aliases[alias] = ""
    if not dimensions:
        return []
    _qualify_attributes(select, source, dimensions, where)
    joins = []
    for dimension, alias, on, key in dimensions:
        used = {c.name for c in select.find_all(exp.Column) if c.table == alias} - {key}
        prefix = f"{alias}_" if any(source.field_type(n) for n in used) else ""
        aliases[alias] = prefix
        joins.append(Join(dimension, on=on, key=key, prefix=prefix))
    return joins


def _join_condition(node, alias, aliases, where):
    """(event field, dimension key) of ``ON e.field = d.key`` or ``USING (field)``."""
    example = f"ON e.article = {alias}.article"
    using = node.args.get("using")
    if using:
        if len(using) != 1:
            raise DefinitionError(f"{where}: JOIN ... USING names one key column; e.g. "
                                  "USING (article)")
        name = using[0].name
        return name, name
    condition = node.args.get("on")
    if not isinstance(condition, exp.EQ) or not all(
            isinstance(side, exp.Column) for side in (condition.this, condition.expression)):
        shown = condition.sql(dialect=Tally) if condition is not None else "nothing"
        raise DefinitionError(f"{where}: JOIN ... ON {shown}: join on one key equality, "
                              f"{example}")
    sides = {}
    for column in (condition.this, condition.expression):
        side = "dimension" if column.table == alias else \
            "event" if not column.table or aliases.get(column.table, "") is None else None
        if side is None or side in sides:
            raise DefinitionError(f"{where}: JOIN ... ON {condition.sql(dialect=Tally)}: "
                                  f"compare an event field with {alias}'s key, {example}")
        sides[side] = column.name
    return sides["event"], sides["dimension"]


def _qualify_attributes(select, source, dimensions, where):
    """Give unqualified columns that are no event field their join's alias."""
    for column in select.find_all(exp.Column):
        if column.table or source.field_type(column.name):
            continue
        owners = [alias for dimension, alias, _, key in dimensions
                  if dimension.field_type(column.name) and column.name != key]
        if len(owners) > 1:
            raise DefinitionError(f"{where}: column {column.name!r} is in {owners[0]!r} and "
                                  f"{owners[1]!r}; qualify it, e.g. {owners[0]}.{column.name}")
        if owners:
            column.set("table", exp.to_identifier(owners[0]))


def _group_key(select, source, aliases, where):
    group = select.args.get("group")
    example = "GROUP BY user" if "user" in source.fields else f"GROUP BY {source.fields[0]}"
    if group is None:
        raise DefinitionError(f"{where}: GROUP BY is missing; group by the entity key column, "
                              f"e.g. {example}")
    for key in ("rollup", "cube", "grouping_sets", "totals"):
        if group.args.get(key):
            raise DefinitionError(f"{where}: GROUP BY {key.upper().replace('_', ' ')} is "
                                  "outside the Tally SQL dialect; group by the entity key "
                                  "column only")
    if len(group.expressions) != 1 or not isinstance(group.expressions[0], exp.Column):
        raise DefinitionError(f"{where}: GROUP BY must name exactly one column, the entity "
                              f"key (found {group.sql(dialect=Tally)!r}); e.g. {example}")
    column = _unqualify(group.expressions[0], aliases, where)
    name = column.name
    if source.field_type(name) is None:
        # GROUP BY an alias of the key: SELECT user_id AS user ... GROUP BY user
        for item in select.expressions:
            if isinstance(item, exp.Alias) and item.alias == name and \
                    isinstance(item.this, exp.Column):
                return item.this.name
    return name


def _windows(select, where):
    """{name or None: (Window, lateness_ms)}."""
    windows = {}
    for spec in select.args.get("windows") or ():
        if not isinstance(spec, WindowSpec):
            raise DefinitionError(f"{where}: {spec.sql(dialect=Tally)!r} is outside the Tally "
                                  "SQL dialect; write WINDOW SLIDING 7 DAYS HOP 1 HOUR")
        name = spec.args.get("this")
        name = name.name if name is not None else None
        if name in windows:
            what = f"window {name!r}" if name else "the unnamed window"
            raise DefinitionError(f"{where}: {what} is defined twice in WINDOW; name each "
                                  "extra window: WINDOW SLIDING ..., w2 AS TUMBLING ...")
        kind = spec.args["kind"]
        if kind != "LIFETIME" and not (spec.args["size"] and spec.args["hop"]):
            raise DefinitionError(f"{where}: WINDOW {spec.sql(dialect=Tally)} has a zero size "
                                  "or hop; give positive durations (SLIDING 7 DAYS HOP 1 HOUR), "
                                  "or write LIFETIME")
        windows[name] = (Window(spec.args["size"], spec.args["hop"]), spec.args["lateness"])
    return windows


def _unqualify(node, aliases, where):
    """Drop table prefixes naming the source (refuse others); returns the node."""
    for column in list(node.find_all(exp.Column)):
        table = column.table
        if table and table not in aliases:
            raise DefinitionError(f"{where}: column {column.sql(dialect=Tally)!r} refers to "
                                  f"{table!r}, which is neither the FROM source nor a JOIN; "
                                  f"write {column.name}")
        if table:
            if aliases[table]:                     # a join's attribute, under its prefix
                column.set("this", exp.to_identifier(aliases[table] + column.name))
            column.set("table", None)
            column.set("db", None)
            column.set("catalog", None)
    return node


def _feature(node, alias, windows, where_filter, aliases, key_column, where):
    display = node.sql(dialect=Tally)
    window, lateness = windows.get(None, (Window.lifetime(), 0))
    if isinstance(node, exp.Window):
        if any(node.args.get(k) for k in ("partition_by", "order", "spec")) or \
                not node.args.get("alias"):
            raise DefinitionError(
                f"{where}: '{display}': window functions (OVER (...)) are outside the Tally "
                "SQL dialect; name a window in the WINDOW clause and write OVER <name>, "
                "e.g. SUM(x) OVER w ... WINDOW w AS SLIDING 7 DAYS HOP 1 HOUR")
        window_name = node.args["alias"].name
        if window_name not in windows:
            known = ", ".join(n for n in windows if n) or "none"
            raise DefinitionError(f"{where}: '{display}': window {window_name!r} is not "
                                  f"defined; add WINDOW {window_name} AS SLIDING ... "
                                  f"(named windows: {known})")
        window, lateness = windows[window_name]
        node = node.this
    agg_filter = None
    if isinstance(node, exp.Filter):
        agg_filter = _unqualify(node.expression.this, aliases, where)
        node = node.this
    if isinstance(node, exp.Window):
        raise DefinitionError(f"{where}: '{display}': write FILTER (WHERE ...) before "
                              "OVER <window>")
    aggregation, column, param = _aggregate(node, display, aliases, key_column, where)
    conditions = [c for c in (where_filter, agg_filter) if c is not None]
    name = alias or (f"{aggregation}_{column}" if column else aggregation)
    if aggregation == "count" and column is not None:
        conditions.append(exp.Not(this=exp.Is(this=exp.column(column), expression=exp.Null())))
        column = None
    filter_text = None
    if conditions:
        combined = conditions[0]
        for condition in conditions[1:]:
            combined = exp.And(this=exp.Paren(this=combined.copy()),
                               expression=exp.Paren(this=condition.copy()))
        try:
            filter_text = filters.canonical_sql(filters.parse_filter(
                filters.canonical_sql(combined)))
        except filters.FilterError as error:
            raise DefinitionError(f"{where}, feature {name!r}: filter: {error}") from None
    spec = AGGREGATIONS[aggregation]
    params = {spec.param: param} if spec.param else {}
    return Feature(name, aggregation, column, window, lateness, filter_text, **params)


def _aggregate(node, display, aliases, key_column, where):
    """(aggregation, column or None, parameter or None) of an aggregate call."""
    if isinstance(node, exp.Column):
        raise DefinitionError(
            f"{where}: select item {node.name!r} is neither the GROUP BY key "
            f"({key_column!r}) nor an aggregate; remove it, or aggregate it, e.g. "
            f"LAST({node.name}) AS last_{node.name}")
    if isinstance(node, exp.Star):
        raise DefinitionError(f"{where}: SELECT * is outside the Tally SQL dialect; select "
                              f"the key and aggregates ({AGGREGATE_NAMES})")
    args = []
    if isinstance(node, exp.Count):
        inner = node.this
        if isinstance(inner, exp.Distinct):
            column = inner.expressions[0].sql(dialect=Tally) if inner.expressions else "x"
            raise DefinitionError(f"{where}: '{display}': COUNT(DISTINCT ...) is outside the "
                                  "Tally SQL dialect (exact distinct counts are not kept); "
                                  f"use APPROX_COUNT_DISTINCT({column})")
        if inner is None or isinstance(inner, exp.Star):
            return "count", None, None
        aggregation, args = "count", [inner]
    elif type(node) in _AGGREGATES:
        aggregation = _AGGREGATES[type(node)]
        args = [node.this] + [node.args[k] for k in ("expression",) if node.args.get(k)]
        args += list(node.expressions or ())
        if aggregation == "last" and len(args) == 2:
            aggregation = "last_n"
    elif isinstance(node, exp.Anonymous) and node.name.upper() in SQL_NAMES:
        aggregation = SQL_NAMES[node.name.upper()]
        args = list(node.expressions)
    elif isinstance(node, (exp.AggFunc, exp.Func)):
        raise DefinitionError(f"{where}: '{display}': {filters.describe_construct(node)} is "
                              f"not an aggregate of the Tally SQL dialect; use "
                              f"{AGGREGATE_NAMES}")
    else:
        raise DefinitionError(f"{where}: '{display}' is neither the GROUP BY key nor an "
                              f"aggregate; select aggregates such as SUM(col) AS name "
                              f"({AGGREGATE_NAMES})")
    spec = AGGREGATIONS[aggregation]
    wanted = 2 if spec.param else 1
    call = f"{aggregation.upper()}(col{', ' + spec.param if spec.param else ''})"
    if len(args) != wanted and not (spec.default_param and len(args) == 1):
        raise DefinitionError(f"{where}: '{display}' takes {wanted} argument"
                              f"{'s' if wanted > 1 else ''}; write {call}")
    column = args[0]
    if not isinstance(column, exp.Column):
        raise DefinitionError(
            f"{where}: '{display}': an expression inside an aggregate is outside the Tally SQL "
            f"dialect; aggregate a source column ({call}), and compute derived values in "
            "the producer")
    _unqualify(column, aliases, where)
    param = None
    if spec.param and len(args) > 1:
        literal = args[1]
        if not (isinstance(literal, exp.Literal) and not literal.is_string
                and literal.this.isdigit()):
            raise DefinitionError(f"{where}: '{display}': {spec.param} must be a whole "
                                  f"number, e.g. {aggregation.upper()}({column.name}, 10)")
        param = int(literal.this)
    return aggregation, column.name, param


def _entity(name, key_column, source, catalog, where):
    key_type = source.field_type(key_column)
    known = catalog.entities.get(name)
    if known is not None:
        return known
    if key_type is None:
        # the view's validation reports the missing key with the source's fields
        return Entity(name, "int64")
    if key_type not in ("int64", "string"):
        raise DefinitionError(f"{where}: GROUP BY {key_column!r} is a {key_type} column; the "
                              "entity key must be an int64 or string column of the source")
    return Entity(name, key_type)


# --------------------------------------------------------------------------
# Definitions -> SQL text


def _ident(name):
    """An identifier, quoted when it would not read back as itself."""
    return '"' + name.replace('"', '""') + '"' if needs_quotes(name) else name


def _string(value):
    return "'" + str(value).replace("'", "''") + "'"


def source_to_sql(source):
    schema = source.schema
    if schema[-1][0] == source.timestamp_field in MESSAGE_TIME_FIELDS:
        schema = schema[:-1]         # Source adds it again, in the same place
    fields = ", ".join(f"{_ident(n)} {_SQL_TYPE[t]}" for n, t in schema)
    props = [f"topic = {_string(source.topic)}"]
    if source.format != "msgpack":
        props.append(f"format = {_string(source.format)}")
    if source.timestamp_field != "ts":
        props.append(f"event_time = {_string(source.timestamp_field)}")
    if source.archive:
        props.append(f"archive = {_string(source.archive)}")
    if source.earliest_event_time is not None:
        props.append(f"earliest_event_time = '{source.earliest_event_time}'")
    if source.max_event_time_ahead is not None:
        props.append("max_event_time_ahead = "
                     f"{_string(format_duration(source.max_event_time_ahead))}")
    if source.routing != "murmur3":
        props.append(f"routing = {_string(source.routing)}")
    return f"CREATE SOURCE {_ident(source.name)} ({fields}) WITH ({', '.join(props)})"


def view_to_sql(view):
    """The CREATE VIEW statement of ``view`` (reading it back gives an equal view,
    given the view's source in the catalog)."""
    props = []
    for key in ("owner", "description"):
        if getattr(view, key):
            props.append(f"{key} = {_string(getattr(view, key))}")
    if view.tags:
        props.append(f"tags = {_string(', '.join(view.tags))}")
    if view.online_expiry:
        props.append(f"online_expiry = {_string(format_duration(view.online_expiry))}")
    with_ = f" WITH ({', '.join(props)})" if props else ""

    # the most common window is the default; the others are named w1, w2, ...
    specs = [(f.window, f.lateness_ms) for f in view.features]
    default = max(specs, key=specs.count)
    named = {}
    for spec in specs:
        if spec != default and spec not in named:
            named[spec] = f"w{len(named) + 1}"
    attribute = _join_attributes(view)
    common = {f.filter for f in view.features}
    where = view.features[0].filter if len(common) == 1 else None
    where = where and _qualified(where, attribute)

    key = _ident(view.key_column)
    items = [key if view.key_column == view.entity.name
             else f"{key} AS {_ident(view.entity.name)}"]
    for feature in view.features:
        args = attribute.get(feature.column) or _ident(feature.column) if feature.column \
            else "*"
        if feature.param is not None:
            args += f", {feature.param}"
        text = f"{AGGREGATIONS[feature.aggregation].sql_names[0]}({args})"
        if feature.filter and where is None:
            text += f" FILTER (WHERE {_qualified(feature.filter, attribute)})"
        spec = (feature.window, feature.lateness_ms)
        if spec in named:
            text += f" OVER {named[spec]}"
        items.append(f"{text} AS {_ident(feature.name)}")
    items += [f"{d.expression} AS {_ident(d.name)}" for d in view.derived]
    lines = [f"CREATE VIEW {_ident(view.name)}{with_} AS",
             "SELECT " + ",\n       ".join(items),
             f"FROM {_ident(view.source.name)}"]
    for join in view.joins:
        alias = _join_alias(join)
        table = join.dimension.name if alias == join.dimension.name else \
            f"{_ident(join.dimension.name)} {_ident(alias)}"
        lines.append(f"JOIN {table} ON {_ident(view.source.name)}.{_ident(join.on)} = "
                     f"{_ident(alias)}.{_ident(join.key)}")
    if where:
        lines.append(f"WHERE {where}")
    lines.append(f"GROUP BY {key}")
    windows = []
    if default[0].size_ms or named:
        windows.append(_spec_text(*default))
    windows += [f"{name} AS {_spec_text(*spec)}" for spec, name in named.items()]
    if windows:
        lines.append("WINDOW " + ", ".join(windows))
    return "\n".join(lines)


def _join_alias(join):
    """The alias a join is written with: its prefix without the '_' (the rule
    the parser gives a prefix by), else the dimension's name."""
    return join.prefix[:-1] if join.prefix.endswith("_") and len(join.prefix) > 1 \
        else join.dimension.name


def _join_attributes(view):
    """{prefixed attribute name: 'alias.column'} of the joins with a prefix
    (attributes without one are written unqualified: they are unique)."""
    return {join.prefix + c: f"{_ident(_join_alias(join))}.{_ident(c)}"
            for join in view.joins if join.prefix for c in join.columns}


def _qualified(filter_text, attribute):
    """A filter with prefixed attributes written ``alias.column``."""
    if not attribute or not filters.filter_columns(filter_text) & attribute.keys():
        return filter_text
    node = filters.parse_filter(filter_text)
    for column in list(node.find_all(exp.Column)):
        if column.name in attribute:
            alias, name = attribute[column.name].split(".")
            column.set("this", exp.to_identifier(name.strip('"')))
            column.set("table", exp.to_identifier(alias.strip('"')))
    return node.sql(dialect=Tally)


def _spec_text(window, lateness):
    kind = window.kind.upper()
    return window_spec_sql(generator.Generator(), WindowSpec(
        kind=kind, size=window.size_ms, hop=window.hop_ms, lateness=lateness))
