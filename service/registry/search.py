"""Search: the facets indexed for each stored version, and the query over them.

A version's facets are (key, value) pairs: for a view its entity, source,
topic, owner, tags, feature names and description; for a source its name and
topic; for an entity its name. :func:`find_definitions` matches exact facets
and free text against the current and candidate versions.
"""
from tally.core.definitions import FeatureView
from tally.service.registry.results import Results, SearchHit, VersionInfo


def facets_of(kind, definition):
    """The (key, value) pairs search matches a version of ``definition`` by
    (empty values left out)."""
    facets = []
    if kind == "view":
        facets += [("entity", definition.entity.name), ("source", definition.source.name),
                   ("topic", definition.source.topic), ("owner", definition.owner)]
        facets += [("tag", tag) for tag in definition.tags]
        facets += [("feature", f.name) for f in definition.features]
        facets += [("description", definition.description)]
    elif kind == "source":
        facets += [("source", definition.name), ("topic", definition.topic)]
    else:
        facets += [("entity", definition.name)]
    return [(k, v) for k, v in facets if v]


def find_definitions(conn, text=None, tag=None, owner=None, entity=None, source=None,
                     topic=None, kind=None):
    """SearchHits for the current and candidate versions matching every given
    criterion (see :meth:`Registry.search <tally.service.registry.db.Registry.search>`)."""
    where, params = [], []
    for key, value in (("tag", tag), ("owner", owner), ("entity", entity),
                       ("source", source), ("topic", topic)):
        if value is not None:
            where.append("EXISTS (SELECT 1 FROM facets f WHERE f.version_id = v.id AND "
                         "f.key = ? AND f.value = ?)")
            params += [key, value]
    if kind:
        where.append("v.kind = ?")
        params.append(kind)
    if text:
        pattern = "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%") \
            .replace("_", "\\_") + "%"
        where.append("(LOWER(v.name) LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM facets f "
                     "WHERE f.version_id = v.id AND f.key IN ('feature', 'description', 'tag') "
                     "AND LOWER(f.value) LIKE ? ESCAPE '\\'))")
        params += [pattern] * 2
    query = ("SELECT v.* FROM versions v JOIN heads h ON h.kind = v.kind AND h.name = v.name "
             "AND (v.version = h.current OR v.version = h.candidate)")
    if where:
        query += " WHERE " + " AND ".join(where)
    query += " ORDER BY CASE v.kind WHEN 'view' THEN 0 WHEN 'source' THEN 1 ELSE 2 END, " \
             "v.name, v.version"
    hits = Results()
    for row in conn.execute(query, params):
        info = VersionInfo.from_row(row)
        d = info.definition
        features = ()
        if text and isinstance(d, FeatureView):
            features = tuple(f.name for f in d.features if text.lower() in f.name.lower())
        hits.append(SearchHit(info.kind, info.name, info.version, info.state,
                              getattr(d, "owner", ""), getattr(d, "tags", ()),
                              getattr(d, "description", ""), features))
    return hits
