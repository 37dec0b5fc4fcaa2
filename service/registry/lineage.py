"""Lineage: which source fields each feature of a view reads, and in what
role (value, filter, key, event_time).

:func:`view_lineage` computes it from a definition alone. When a view version
is stored, its rows go into the ``lineage`` table (:func:`index_rows`);
:func:`feature_lineage` answers upstream questions (a feature -> its view,
source, topic and fields) and :func:`find_readers` downstream ones (a topic,
source or field -> the features that read it).
"""
from tally.core.filters import filter_columns
from tally.service.registry.errors import NotFound
from tally.service.registry.results import Lineage, LineageRow


def view_lineage(view):
    """Per feature of ``view``: the source fields it reads, with their roles."""
    result = []
    for feature in view.features:
        fields = []
        if feature.column:
            fields.append((feature.column, "value"))
        if feature.filter:
            fields += [(c, "filter") for c in sorted(filter_columns(feature.filter))
                       if c != feature.column]
        fields.append((view.key_column, "key"))
        fields.append((view.source.timestamp_field, "event_time"))
        seen, unique = set(), []
        for name, role in fields:
            if name not in seen:
                seen.add(name)
                unique.append((name, role))
        result.append({"feature": feature.name, "fields": unique})
    return result


def index_rows(version_id, view):
    """The ``lineage`` table's rows for stored version ``version_id`` of ``view``:
    (version_id, view, feature, source, topic, field, role)."""
    rows = []
    for lineage in view_lineage(view):
        rows += [(version_id, view.name, lineage["feature"], view.source.name,
                  view.source.topic, f, role) for f, role in lineage["fields"]]
    return rows


def feature_lineage(info, feature=None):
    """Upstream lineage of every feature of view version ``info`` (a
    VersionInfo), or of the one named ``feature``."""
    view = info.definition
    rows = view_lineage(view)
    if feature:
        rows = [r for r in rows if r["feature"] == feature]
        if not rows:
            raise NotFound(f"view {info.ref} has no feature {feature!r}; it has "
                           f"{', '.join(f.name for f in view.features)}")
    return Lineage(LineageRow(view.name, info.version, info.state, r["feature"],
                              view.source.name, view.source.topic, tuple(r["fields"]))
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
