"""The lineage picture's graph: topic -> source -> view -> feature -> feature
service, over the registry's current definitions.

Which sources a view reads, and in which role (its events, or a join's
dimension), comes from :meth:`Registry.lineage` (one row per feature and
source); a feature service's edges from its definition. :func:`around` cuts
out what one node reads (upstream) and what reads it (downstream).
"""
from dataclasses import dataclass, field

from tally.service.ui.html import href

COLUMNS = ("topic", "source", "view", "feature", "service")


@dataclass
class Graph:
    nodes: dict = field(default_factory=dict)     # id -> (kind, name, url)
    edges: dict = field(default_factory=dict)     # (from id, to id, role) -> None, in order
    reads: dict = field(default_factory=dict)     # feature id -> {source ids it reads}

    def add(self, kind, name, url):
        ident = f"{kind}:{name}"
        self.nodes.setdefault(ident, (kind, name, url))
        return ident

    def connect(self, a, b, role):
        self.edges[(a, b, role)] = None


def current_infos(registry, kind):
    """Each name's current version (a candidate where none is current yet)."""
    chosen = {}
    for info in registry.list(kind):
        if info.name not in chosen or info.state == "current":
            chosen[info.name] = info
    return list(chosen.values())


def lineage_graph(registry):
    """The whole registry's lineage graph."""
    graph = Graph()
    for info in current_infos(registry, "view"):
        _add_view(graph, registry, info)
    for info in current_infos(registry, "source"):
        source = info.definition
        graph.connect(graph.add("topic", source.topic, "/lineage?node=topic:" + source.topic),
                      graph.add("source", source.name, href("source", source.name)), "topic")
    for info in current_infos(registry, "service"):
        service = graph.add("service", info.name, href("service", info.name))
        for f in info.definition.features:
            feature = graph.add("feature", f"{f.view}.{f.feature}",
                                href("view", f.view) + f"#feature-{f.feature}")
            graph.connect(feature, service, "served as " + f.alias)
    return graph


def _add_view(graph, registry, info):
    view = info.definition
    node = graph.add("view", view.name, href("view", view.name))
    for row in registry.lineage(f"view:{view.name}@v{info.version}"):
        topic = graph.add("topic", row.topic, "/lineage?node=topic:" + row.topic)
        source = graph.add("source", row.source, href("source", row.source))
        role = "events" if row.source == view.source.name else "join"
        graph.connect(topic, source, "topic")
        graph.connect(source, node, role)
        graph.reads.setdefault(f"feature:{view.name}.{row.feature}", set()).add(source)
    for name in view.feature_names:
        graph.connect(node, graph.add("feature", f"{view.name}.{name}",
                                      href("view", view.name) + f"#feature-{name}"), "feature")


def around(graph, node):
    """The subgraph of what ``node`` reads and what reads it (not siblings:
    a view's other readers' sources are left out)."""
    keep = {node} | _walk(graph, node, upstream=True) | _walk(graph, node, upstream=False)
    return Graph({n: graph.nodes[n] for n in keep},
                 {edge: None for edge in graph.edges if edge[0] in keep and edge[1] in keep},
                 graph.reads)


def _walk(graph, start, upstream):
    """Every node reachable from ``start`` against the edges (upstream) or along them."""
    following = {}
    for a, b, _ in graph.edges:
        following.setdefault(b if upstream else a, []).append(a if upstream else b)
    first = following.get(start, [])
    if upstream and start in graph.reads:
        # a feature reads only some of its view's sources (count(*) no join)
        seen, todo = set(first) | graph.reads[start], list(graph.reads[start])
    else:
        seen, todo = set(first), list(first)
    while todo:
        for node in following.get(todo.pop(), ()):
            if node not in seen:
                seen.add(node)
                todo.append(node)
    return seen


def layout(graph):
    """Columns of (id, text, url, kind) for :func:`tally.service.ui.svg.graph`,
    each column ordered by where its nodes' inputs sit (fewer crossings)."""
    position, columns, inputs = {}, [], {}
    for a, b, _ in graph.edges:
        inputs.setdefault(b, []).append(a)
    for kind in COLUMNS:
        nodes = [n for n, (k, _, _) in graph.nodes.items() if k == kind]
        if kind == "topic":
            nodes.sort(key=lambda n: graph.nodes[n][1])
        else:
            nodes.sort(key=lambda n: _barycentre(inputs.get(n, ()), position))
        for i, n in enumerate(nodes):
            position[n] = i
        columns.append([(n, _label(graph.nodes[n]), graph.nodes[n][2], kind) for n in nodes])
    return columns


def _label(node):
    """A feature shows its own name: its view is the box it hangs from."""
    kind, name, _ = node
    return name.partition(".")[2] if kind == "feature" else name


def _barycentre(inputs, position):
    placed = [position[a] for a in inputs if a in position]
    return sum(placed) / len(placed) if placed else float("inf")
