"""Lineage: which source fields each feature of a view reads, and in what
role (value, filter, key, event_time; through a join: join_key in the
events, and dimension_key and version_time in the dimension).

:func:`view_lineage` computes it from a definition alone. When a view version
is stored, its rows go into the ``lineage`` table (:func:`index_rows`);
:func:`feature_lineage` answers upstream questions (a feature -> its view,
source, topic and fields) and :func:`find_readers` downstream ones (a topic,
source or field -> the features that read it).
"""
from tally.core.expressions import referenced
from tally.core.filters import filter_columns
from tally.service.registry.errors import NotFound
from tally.service.registry.results import Lineage, LineageRow


def view_lineage(view):
    """Per feature of ``view`` and per source it reads: the fields, with their
    roles. A feature over a join's attribute reads two sources: the events
    (its ``on`` field in the role join_key) and the dimension (the attribute,
    its key as dimension_key, its event time as version_time)."""
    result = []
    for feature in view.features:
        reads = [feature.column] if feature.column else []
        filtered = sorted(filter_columns(feature.filter)) if feature.filter else []
        by_source = {view.source.name: (view.source, [])}
        for join in view.joins:
            names = {join.prefix + c: c for c in join.columns}
            used = [(names[n], role) for n, role in _roles(reads, filtered) if n in names]
            if used:
                by_source[view.source.name][1].append((join.on, "join_key"))
                by_source[join.dimension.name] = (join.dimension, used + [
                    (join.key, "dimension_key"), (join.dimension.timestamp_field, "version_time")])
        joined = {join.prefix + c for join in view.joins for c in join.columns}
        own = [(n, role) for n, role in _roles(reads, filtered) if n not in joined]
        event_fields = by_source[view.source.name][1]
        event_fields[:0] = own
        event_fields += [(view.key_column, "key"), (view.source.timestamp_field, "event_time")]
        for source, fields in by_source.values():
            result.append({"feature": feature.name, "source": source, "fields": _unique(fields)})
    return result + _derived_lineage(view, result)


def _derived_lineage(view, rows):
    """A derived feature reads what the features of its expression read."""
    by_feature, derived_rows = {}, []
    for row in rows:
        by_feature.setdefault(row["feature"], []).append(row)
    for derived in view.derived:            # in order: one may use an earlier one
        mine = merge_lineage(derived.name, [r for name in referenced(derived.expression)
                                            for r in by_feature.get(name, ())])
        by_feature[derived.name] = mine
        derived_rows += mine
    return derived_rows


def merge_lineage(name, rows):
    """One feature ``name`` reading, per source, every field ``rows`` read."""
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"].name, (row["source"], []))[1].extend(row["fields"])
    return [{"feature": name, "source": source, "fields": _unique(fields)}
            for source, fields in by_source.values()]


def _roles(reads, filtered):
    return [(n, "value") for n in reads] + [(n, "filter") for n in filtered if n not in reads]


def _unique(fields):
    seen, unique = set(), []
    for name, role in fields:
        if name not in seen:
            seen.add(name)
            unique.append((name, role))
    return unique


def index_rows(version_id, view):
    """The ``lineage`` table's rows for stored version ``version_id`` of ``view``:
    (version_id, view, feature, source, topic, field, role)."""
    return [(version_id, view.name, lineage["feature"], lineage["source"].name,
             lineage["source"].topic, f, role)
            for lineage in view_lineage(view) for f, role in lineage["fields"]]


def feature_lineage(info, feature=None):
    """Upstream lineage of every feature of view version ``info`` (a
    VersionInfo), or of the one named ``feature``."""
    view = info.definition
    rows = view_lineage(view)
    if feature:
        rows = [r for r in rows if r["feature"] == feature]
        if not rows:
            raise NotFound(f"view {info.ref} has no feature {feature!r}; it has "
                           f"{', '.join(view.feature_names)}")
    return Lineage(LineageRow(view.name, info.version, info.state, r["feature"],
                              r["source"].name, r["source"].topic, tuple(r["fields"]))
                   for r in rows)


def find_readers(conn, topic=None, source=None, field=None, all_versions=False):
    """Downstream lineage from the ``lineage`` table: the features reading a
    topic or source (and field), each with all the fields it reads; current and
    candidate versions only unless ``all_versions``. Give a topic or a source."""
    where, params = [], []
    for column, value in (("topic", topic), ("source", source), ("field", field)):
        if value is not None:
            where.append(f"m.{column} = ?")
            params.append(value)
    # the features with a matching row, then all the fields they read
    query = ("SELECT v.name AS view, v.version, v.state, l.feature, l.source, l.topic, "
             "l.field, l.role FROM lineage l JOIN versions v ON v.id = l.version_id")
    if not all_versions:
        query += (" JOIN heads h ON h.kind = v.kind AND h.name = v.name AND "
                  "(v.version = h.current OR v.version = h.candidate)")
    query += (" WHERE EXISTS (SELECT 1 FROM lineage m WHERE m.version_id = l.version_id "
              "AND m.feature = l.feature AND " + " AND ".join(where) + ")"
              " ORDER BY v.name, v.version, l.rowid")
    grouped = {}
    for row in conn.execute(query, params):
        key = (row["view"], row["version"], row["state"], row["feature"], row["source"],
               row["topic"])
        grouped.setdefault(key, []).append((row["field"], row["role"]))
    return Lineage(LineageRow(*key, tuple(fields)) for key, fields in grouped.items())
