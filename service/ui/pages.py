"""The pages. Each takes the :class:`~tally.service.ui.server.Context` and
the query ({name: text}) and returns ``(title, body markup)``; registry
reads go through :class:`Registry` (search, describe, diff, lineage,
readers, changes), online values through :class:`~tally.service.ui.online.Online`.
"""
from tally.core.aggregations import arrow_of
from tally.core.definitions import Feature
from tally.core.materialize import feature_types
from tally.core.request_features import compiled_computed
from tally.core.sql import service_to_sql, view_to_sql
from tally.service.lookup.protocol import RequestError
from tally.service.registry.diff import change_line
from tally.service.store import StoreError
from tally.service.ui import html as h
from tally.service.ui import lineage, svg
from tally.service.ui.online import NUMBER_TYPES

SEARCH_KINDS = (("", "any kind"), ("view", "views"), ("service", "feature services"),
                ("source", "sources"), ("entity", "entities"))


# ---- search --------------------------------------------------------------------

def search(ctx, query):
    text, kind = query.get("q", ""), query.get("kind", "")
    tag, owner = query.get("tag", ""), query.get("owner", "")
    everything = ctx.registry.search()
    hits = ctx.registry.search(text=text or None, tag=tag or None, owner=owner or None,
                               kind=kind or None)
    tags = sorted({t for hit in everything for t in hit.tags})
    owners = sorted({hit.owner for hit in everything if hit.owner})
    filters = h.form("/", [h.field("q", "text", text, "name, feature, tag, description"),
                           h.select("kind", "kind", SEARCH_KINDS, kind),
                           h.select("tag", "tag", [("", "any tag")] + [(t, t) for t in tags],
                                    tag),
                           h.select("owner", "owner", [("", "anyone")] +
                                    [(o, o) for o in owners], owner)], "search")
    rows = [[h.e(hit.kind), h.ref_link(hit.kind, hit.name, hit.version), h.state(hit.state),
             h.e(hit.owner), h.tags(hit.tags), h.e(hit.description),
             ", ".join(_feature_link(hit, f) for f in hit.features)] for hit in hits]
    found = h.table(["kind", "name", "state", "owner", "tags", "description",
                     "matching features"], rows, "results") if rows else \
        h.notice("nothing matches: try fewer words, or another kind")
    return "Search" if text else "Everything in the registry", \
        filters + f'<p class="count">{len(hits)} found</p>' + found


def _feature_link(hit, feature):
    if hit.kind == "view":
        return h.link(h.href("view", hit.name) + f"#feature-{feature}", feature)
    return h.link(h.href("service", hit.name), feature)


# ---- a view --------------------------------------------------------------------

async def view(ctx, name, query):
    description = ctx.registry.describe(f"view:{name}")
    info, definition = description.info, description.info.definition
    body = [_view_facts(description), _features(definition),
            h.section("SQL", h.pre(view_to_sql(definition), "sql")),
            _versions(ctx, description, query),
            _deployments(ctx, "view", name),
            _health(ctx, name, info.version),
            await _online_record(ctx, name, query),
            await _distribution(ctx, definition, query),
            _picture(ctx, f"view:{name}")]
    return f"View {info.ref}", "".join(body)


def _view_facts(description):
    info, v = description.info, description.info.definition
    joins = "<br>".join(
        f"{h.ref_link('source', j.dimension.name)} on {h.code(j.on)} = "
        f"{h.code(j.key)}, taking {h.e(', '.join(j.columns or ()))}" for j in v.joins)
    candidate = description.candidate
    return h.facts([
        ("state", h.state(info.state) + (f" &middot; v{candidate.version} is deploying "
                                         "(candidate)" if candidate else "")),
        ("owner", h.e(v.owner)), ("description", h.e(v.description)), ("tags", h.tags(v.tags)),
        ("entity", f"{h.ref_link('entity', v.entity.name)} ({h.e(v.entity.key_type)}), key "
                   f"column {h.code(v.key_column)}"),
        ("source", f"{h.ref_link('source', v.source.name)}: topic {h.code(v.source.topic)}, "
                   f"event time {h.code(v.source.timestamp_field)}"),
        ("joins", joins),
        ("hash", h.code(info.hash[:12])),
        ("created", h.e(f"{info.created_at} by {info.created_by}"))])


def _features(view):
    """Each feature with its definition and its two types: online (what
    the lookup server answers, ``value_type``) and in training sets (Arrow)."""
    types = feature_types(view)
    rows = []
    for feature in view.features + view.derived:
        is_aggregate = isinstance(feature, Feature)
        rows.append([f'<span id="feature-{h.e(feature.name)}">{h.e(feature.name)}</span>',
                     h.code(feature.expression() if is_aggregate else feature.describe()),
                     h.e(feature.window.describe() if is_aggregate else "derived"),
                     h.code(feature.filter) if is_aggregate and feature.filter else "",
                     h.code(types[feature.name]), h.code(str(arrow_of(types[feature.name])))])
    return h.section("Features", h.table(
        ["feature", "definition", "window", "filter", "online type", "training-set type"],
        rows, "features"))


def _versions(ctx, description, query):
    """The history, the version a rollback goes to, and a diff of any two."""
    info, history = description.info, description.history
    target = ctx.registry.rollback_target(f"{info.kind}:{info.name}")
    rows = [[f"v{v.version}" + (' <span class="mark">rollback target</span>'
                                if v.version == target else ""),
             h.state(v.state), h.code(v.hash[:12]), h.e(v.created_at), h.e(v.created_by),
             h.e(v.origin)] for v in history]
    note = (f"tally rollback {info.name} would make v{target} current" if target else
            "no earlier version has been current: there is nothing to roll back to")
    body = h.table(["version", "state", "hash", "created", "by", "from"], rows, "versions")
    body += h.notice(note)
    if len(history) > 1:
        body += _diff(ctx, info, history, query)
    return h.section("Versions", body, "versions")


def _diff(ctx, info, history, query):
    numbers = [v.version for v in history]
    old = query.get("a") or str(numbers[-2])
    new = query.get("b") or str(numbers[-1])
    options = [(n, f"v{n}") for n in numbers]
    picker = h.form(h.href(info.kind, info.name) + "#versions",
                    [h.select("a", "from", options, old), h.select("b", "to", options, new)],
                    "diff")
    diff = ctx.registry.diff(f"{info.kind}:{info.name}@v{int(old)}",
                             f"{info.kind}:{info.name}@v{int(new)}")
    lines = [f'<li class="change {"add" if o is None else "del" if n is None else "mod"}">'
             f"{h.e(change_line((p, o, n)))}</li>" for p, o, n in diff.changes]
    shown = f'<ul class="diff">{"".join(lines)}</ul>' if lines else \
        h.notice(f"v{old} and v{new} have the same content")
    return picker + f"<h3>{h.e(diff.old.ref)} &rarr; {h.e(diff.new.ref)}</h3>" + shown


def _deployments(ctx, kind, name):
    """Candidates, promotions, rollbacks and failures: the change log's rows."""
    rows = [[h.e(c.seq), h.e(c.at), f"v{c.version}", h.state(c.event),
             f"v{c.from_version}" if c.from_version else "", h.e(c.detail), h.e(c.actor)]
            for c in ctx.registry.changes() if c.kind == kind and c.name == name]
    return h.section("Candidates and promotions", h.table(
        ["#", "at", "version", "event", "from", "detail", "by"], rows[::-1], "changes"))


def _health(ctx, name, version):
    """Freshness, lag and event rate of the served version, from the sampled metrics."""
    history = ctx.history
    if history is None:
        return h.section("Freshness", h.notice("no metrics endpoint: start tally ui with "
                                               "--metrics HOST:PORT of tally serve"))
    series = history.series(name, version)
    if history.error and not series["freshness"]:
        return h.section("Freshness", h.notice(f"cannot read the metrics: {history.error}",
                                               "error"))
    latest = [(label, points[-1][1]) for label, points in
              (("freshness", series["freshness"]), ("event-time lag", series["lag"]),
               ("events/s", series["rate"])) if points]
    numbers = h.facts([(label, h.e(f"{value:.3f}")) for label, value in latest]) if latest \
        else h.notice(f"the service reports nothing for {name}@v{version} yet")
    others = [v for v in history.versions(name) if v != version]
    if others:
        numbers += h.notice("also computing " + ", ".join(f"v{v}" for v in others))
    charts = (svg.line_chart(series["rate"], "event rate", "events/s") +
              svg.line_chart(series["freshness"], "freshness", "s") +
              svg.line_chart(series["lag"], "event-time lag", "s"))
    return h.section(f"Freshness of v{version}", numbers + f'<div class="charts">{charts}</div>',
                     "freshness")


async def _online_record(ctx, name, query):
    key = query.get("key", "")
    picker = h.form(h.href("view", name) + "#online", [h.field("key", "entity key", key)],
                    "look up")
    if not key:
        return h.section("Online values", picker, "online")
    try:
        key, record = await ctx.online.record(name, key)
    except (RequestError, StoreError) as error:
        return h.section("Online values", picker + h.notice(_message(error), "error"), "online")
    if record is None:
        shown = h.notice(f"no record for {key!r}: the entity has no events yet (or expired)")
    else:
        shown = h.table(["field", "value"], [[h.e(k), h.value(v)] for k, v in record.items()],
                        "record")
    return h.section("Online values", picker + shown, "online")


async def _distribution(ctx, view, query):
    types = feature_types(view)
    numeric = [n for n in view.feature_names if types[n] in NUMBER_TYPES]
    if not numeric:
        return ""
    feature = query.get("feature") if query.get("feature") in numeric else numeric[0]
    size = _int(query.get("n"), 500, 1, 10_000)
    picker = h.form(h.href("view", view.name) + "#distribution",
                    [h.select("feature", "feature", [(n, n) for n in numeric], feature),
                     h.field("n", "entities", str(size)),
                     h.field("keys", "or keys", query.get("keys", ""), "1, 2, 3")], "plot")
    keys = [k.strip() for k in query.get("keys", "").split(",") if k.strip()]
    try:
        values = await ctx.online.sample(view.name, feature, size, keys)
    except (RequestError, StoreError) as error:
        return h.section("Distribution", picker + h.notice(_message(error), "error"),
                         "distribution")
    chart = svg.histogram([v for _, v in values], f"{feature} over a sample of entities")
    return h.section("Distribution", picker + chart, "distribution")


def _int(text, default, low, high):
    try:
        return min(max(int(text), low), high)
    except (TypeError, ValueError):
        return default


def _message(error):
    return getattr(error, "message", None) or str(error)


def _picture(ctx, node):
    graph = lineage.around(lineage.lineage_graph(ctx.registry), node)
    picture = svg.graph(lineage.layout(graph), graph.edges, focus=node)
    return h.section("Lineage", f'<div class="lineage">{picture}</div>'
                     + h.link(f"/lineage?node={node}", "open the lineage page"), "lineage")


# ---- a feature service -----------------------------------------------------------

async def service(ctx, name, query):
    description = ctx.registry.describe(f"service:{name}")
    info, definition = description.info, description.info.definition
    views = {v: ctx.registry.get(f"view:{v}") for v in definition.views}
    body = [h.facts([("state", h.state(info.state)), ("owner", h.e(definition.owner)),
                     ("description", h.e(definition.description)),
                     ("tags", h.tags(definition.tags)), ("hash", h.code(info.hash[:12]))]),
            _service_columns(definition, views),
            h.section("SQL", h.pre(service_to_sql(definition), "sql")),
            _versions(ctx, description, query),
            await _vector(ctx, name, query),
            _picture(ctx, f"service:{name}")]
    return f"Feature service {info.ref}", "".join(body)


def _service_columns(service, views):
    rows = []
    for f in service.features:
        kind = feature_types(views[f.view])[f.feature]
        rows.append([h.e(f.alias), h.link(h.href("view", f.view) + f"#feature-{f.feature}",
                                          f"{f.view}:{f.feature}"),
                     h.code(kind), h.code(str(arrow_of(kind)))])
    for entry, evaluator in compiled_computed(service, views):
        rows.append([h.e(entry.name), h.code(entry.describe()) + " (computed per request)",
                     h.code(evaluator.type), h.code(str(arrow_of(evaluator.type)))])
    return h.section("Columns", h.table(["column", "reads", "online type",
                                         "training-set type"], rows, "features"))


async def _vector(ctx, name, query):
    try:
        fields = await ctx.online.request_fields(name)
    except (RequestError, StoreError) as error:
        return h.section("Online vector", h.notice(_message(error), "error"), "online")
    picker = h.form(h.href("service", name) + "#online",
                    [h.field(f, f"{f} ({kind})", query.get(f, "")) for f, kind in fields],
                    "look up")
    if not any(query.get(f) for f, _ in fields):
        return h.section("Online vector", picker, "online")
    try:
        row, vector = await ctx.online.vector(name, query)
    except (RequestError, StoreError) as error:
        return h.section("Online vector", picker + h.notice(_message(error), "error"),
                         "online")
    shown = h.table(["column", "value"], [[h.e(k), h.value(v)] for k, v in vector.items()],
                    "record")
    return h.section("Online vector", picker + shown, "online")


# ---- sources, entities, lineage ------------------------------------------------------

def source(ctx, name, query):
    description = ctx.registry.describe(f"source:{name}")
    info, s = description.info, description.info.definition
    readers = ctx.registry.readers(source=name)
    rows = [[h.link(h.href("view", r.view) + f"#feature-{r.feature}", f"{r.view}.{r.feature}"),
             h.e(", ".join(f"{f} ({role})" for f, role in r.fields))] for r in readers]
    body = [h.facts([("topic", h.code(s.topic)), ("format", h.e(s.format)),
                     ("event time", h.code(s.timestamp_field)),
                     ("archive", h.e(s.archive or "")), ("hash", h.code(info.hash[:12]))]),
            h.section("Schema", h.table(["field", "type"],
                                        [[h.code(n), h.code(t)] for n, t in s.schema])),
            h.section("Read by", h.table(["feature", "fields (role)"], rows)
                      if rows else h.notice("no feature reads this source")),
            _picture(ctx, f"source:{name}")]
    return f"Source {info.ref}", "".join(body)


def entity(ctx, name, query):
    info = ctx.registry.resolve(f"entity:{name}")
    views = ctx.registry.search(entity=name, kind="view")
    rows = [[h.ref_link("view", v.name, v.version), h.e(v.description)] for v in views]
    body = [h.facts([("key type", h.code(info.definition.key_type))]),
            h.section("Views keyed by it", h.table(["view", "description"], rows))]
    return f"Entity {info.ref}", "".join(body)


def lineage_page(ctx, query):
    node = query.get("node", "")
    graph = lineage.lineage_graph(ctx.registry)
    if node:
        if node not in graph.nodes:
            raise RequestError("not_found", f"no {node!r} in the lineage; see /lineage")
        graph = lineage.around(graph, node)
    picture = svg.graph(lineage.layout(graph), graph.edges, focus=node or None)
    legend = h.notice("Each box links to its page; dashed edges are joins (a dimension "
                      "source enriching a view's events).")
    return f"Lineage of {node}" if node else "Lineage", \
        legend + f'<div class="lineage">{picture}</div>'
