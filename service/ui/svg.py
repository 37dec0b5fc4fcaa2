"""Inline SVG: a line chart over the last hour, a histogram, and the lineage
picture. Styling is by class (the stylesheet) and presentation attributes,
never ``style=`` attributes, which the Content Security Policy refuses."""
import numpy as np

from tally.service.ui.html import e

CHART_W, CHART_H, PAD = 560, 160, 36


def _svg(width, height, body, label):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{e(label)}">'
            f"<title>{e(label)}</title>{body}</svg>")


def _number(v):
    if v == 0 or 0.01 <= abs(v) < 10_000:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:.2e}"


def line_chart(points, label, unit, span_seconds=3600):
    """``points``: (seconds before now, value) pairs, drawn over the last
    ``span_seconds``; the y axis starts at 0."""
    if not points:
        return f'<p class="note">{e(label)}: no samples yet</p>'
    top = max(v for _, v in points) or 1.0
    inner_w, inner_h = CHART_W - 2 * PAD, CHART_H - 2 * PAD

    def xy(ago, v):
        return (PAD + inner_w * (1 - min(ago, span_seconds) / span_seconds),
                CHART_H - PAD - inner_h * v / top)
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(a, v) for a, v in points))
    body = (f'<line class="axis" x1="{PAD}" y1="{CHART_H - PAD}" x2="{CHART_W - PAD}" '
            f'y2="{CHART_H - PAD}"/><line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" '
            f'y2="{CHART_H - PAD}"/>'
            f'<polyline class="series" fill="none" points="{line}"/>'
            f'<text class="tick" x="{PAD}" y="{CHART_H - PAD + 16}">-{span_seconds // 60} min'
            f'</text><text class="tick end" x="{CHART_W - PAD}" y="{CHART_H - PAD + 16}" '
            f'text-anchor="end">now</text>'
            f'<text class="tick" x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">'
            f"{e(_number(top))}</text>"
            f'<text class="tick" x="{PAD - 4}" y="{CHART_H - PAD}" text-anchor="end">0</text>'
            f'<text class="caption" x="{PAD}" y="{PAD - 12}">{e(label)} ({e(unit)}), latest '
            f"{e(_number(points[-1][1]))}</text>")
    return _svg(CHART_W, CHART_H, body, label)


def histogram(values, label, bins=20):
    """Bars of ``numpy.histogram(values, bins)``; each bar's <title> says its
    range and count."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return f'<p class="note">{e(label)}: no values</p>'
    counts, edges = np.histogram(values, bins=bins)
    inner_w, inner_h = CHART_W - 2 * PAD, CHART_H - 2 * PAD
    width = inner_w / len(counts)
    top = counts.max()
    bars = []
    for i, count in enumerate(counts):
        h = inner_h * count / top
        bars.append(f'<rect class="bar" x="{PAD + i * width:.1f}" y="{CHART_H - PAD - h:.1f}" '
                    f'width="{max(width - 1, 1):.1f}" height="{h:.1f}" data-count="{count}">'
                    f"<title>[{_number(edges[i])}, {_number(edges[i + 1])}"
                    f"{']' if i == len(counts) - 1 else ')'}: {count}</title></rect>")
    body = ("".join(bars) +
            f'<line class="axis" x1="{PAD}" y1="{CHART_H - PAD}" x2="{CHART_W - PAD}" '
            f'y2="{CHART_H - PAD}"/>'
            f'<text class="tick" x="{PAD}" y="{CHART_H - PAD + 16}">{e(_number(edges[0]))}'
            f'</text><text class="tick" x="{CHART_W - PAD}" y="{CHART_H - PAD + 16}" '
            f'text-anchor="end">{e(_number(edges[-1]))}</text>'
            f'<text class="tick" x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{top}</text>'
            f'<text class="caption" x="{PAD}" y="{PAD - 12}">{e(label)}: {values.size} '
            "entities</text>")
    return _svg(CHART_W, CHART_H, body, label)


NODE_W, NODE_H, COLUMN_W, ROW_H = 180, 26, 225, 36


def graph(columns, edges, focus=None, label="lineage"):
    """``columns``: per column, its nodes as (id, text, url, kind); ``edges``:
    (from id, to id, role) drawn left to right; ``focus`` is highlighted.
    Each box is a link, its <title> its id (``feature:view.name``)."""
    rows = max((len(c) for c in columns), default=0)
    width = COLUMN_W * len(columns) + 20
    height = ROW_H * rows + 40
    where = {}
    for i, nodes in enumerate(columns):
        offset = (rows - len(nodes)) * ROW_H / 2       # short columns centred
        for j, (ident, _, _, _) in enumerate(nodes):
            where[ident] = (10 + i * COLUMN_W, 30 + offset + j * ROW_H)
    lines = [_edge(where[a], where[b], role) for a, b, role in edges
             if a in where and b in where]
    boxes = [_node(where[ident], ident, text, url, kind, ident == focus)
             for nodes in columns for ident, text, url, kind in nodes]
    heads = [f'<text class="column" x="{10 + i * COLUMN_W}" y="16">{e(name)}</text>'
             for i, name in enumerate(("topics", "sources", "views", "features",
                                       "feature services")[:len(columns)])]
    return _svg(width, height, "".join(heads + lines + boxes), label)


def _edge(start, end, role):
    (x1, y1), (x2, y2) = start, end
    x1, y1, y2 = x1 + NODE_W, y1 + NODE_H / 2, y2 + NODE_H / 2
    middle = (x1 + x2) / 2
    cls = "edge join" if role == "join" else "edge"
    return (f'<path class="{cls}" fill="none" d="M{x1:.0f},{y1:.0f} C{middle:.0f},{y1:.0f} '
            f'{middle:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"><title>{e(role)}</title></path>')


def _node(position, ident, text, url, kind, focused):
    x, y = position
    cls = f"node {kind}" + (" focus" if focused else "")
    shown = text if len(text) <= 24 else text[:23] + "…"
    return (f'<a href="{e(url)}"><g class="{e(cls)}"><rect x="{x:.0f}" y="{y:.0f}" rx="5" '
            f'width="{NODE_W}" height="{NODE_H}"/><text x="{x + 8:.0f}" y="{y + 17:.0f}">'
            f"{e(shown)}</text><title>{e(ident)}</title></g></a>")
