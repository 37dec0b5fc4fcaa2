"""Search: the facets indexed for each stored version, and the query over them.

A version's facets are (key, value) pairs: for a view its entity, source,
topic, owner, tags, feature names and description; for a source its name and
topic; for an entity its name; for a feature service its owner, tags,
description, the views it reads and its column names. :func:`find_definitions` matches exact facets
and free text against the current and candidate versions.
"""
from tally.core.definitions import FeatureService, FeatureView
from tally.service.registry.results import Results, SearchHit, VersionInfo


# how listings order kinds: views, services, sources, entities
KIND_ORDER = ("CASE v.kind WHEN 'view' THEN 0 WHEN 'service' THEN 1 WHEN 'source' THEN 2 "
              "ELSE 3 END")


def facets_of(kind, definition):
    """The (key, value) pairs search matches a version of ``definition`` by
    (empty values left out)."""
    facets = []
    if kind == "view":
        facets += [("entity", definition.entity.name), ("source", definition.source.name),
                   ("topic", definition.source.topic), ("owner", definition.owner)]
        for join in definition.joins:          # a view is found by the dimensions it joins
            facets += [("source", join.dimension.name), ("topic", join.dimension.topic)]
        facets += [("tag", tag) for tag in definition.tags]
        facets += [("feature", f.name) for f in definition.features]
        facets += [("description", definition.description)]
    elif kind == "source":
        facets += [("source", definition.name), ("topic", definition.topic)]
    elif kind == "service":
        facets += [("owner", definition.owner), ("description", definition.description)]
        facets += [("tag", tag) for tag in definition.tags]
        facets += [("view", view) for view in definition.views]
        facets += [("feature", f.alias) for f in definition.features]
    else:
        facets += [("entity", definition.name)]
    return [(k, v) for k, v in facets if v]


def find_definitions(conn, text=None, tag=None, owner=None, entity=None, source=None,
                     topic=None, kind=None, view=None):
    """SearchHits for the current and candidate versions matching every given
    criterion (see :meth:`Registry.search <tally.service.registry.db.Registry.search>`)."""
    where, params = [], []
    for key, value in (("tag", tag), ("owner", owner), ("entity", entity),
                       ("source", source), ("topic", topic), ("view", view)):
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
    query += " ORDER BY " + KIND_ORDER + ", " \
             "v.name, v.version"
    hits = Results()
    for row in conn.execute(query, params):
        info = VersionInfo.from_row(row)
        d = info.definition
        features = ()
        if text and isinstance(d, (FeatureView, FeatureService)):
            names = [getattr(f, "alias", None) or f.name for f in d.features]
            features = tuple(n for n in names if text.lower() in n.lower())
        hits.append(SearchHit(info.kind, info.name, info.version, info.state,
                              getattr(d, "owner", ""), getattr(d, "tags", ()),
                              getattr(d, "description", ""), features))
    return hits
