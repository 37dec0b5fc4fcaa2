"""Differences between two canonical specs, and how a difference reads.

A spec is first made readable (:func:`_display`: windows and durations as
text, features and schema keyed by name), then compared key by key; a
difference is a ``(path, old, new)`` triple with ``None`` for a side that is
absent.
"""
import json

from tally.core.definitions import Feature
from tally.core.durations import format_duration


def diff_specs(kind, old, new):
    """(path, old, new) differences between two canonical specs."""
    changes = []
    _diff(_display(kind, old), _display(kind, new), "", changes)
    return tuple(changes)


def change_line(change):
    """One (path, old, new) difference as a line: ``+`` added, ``-`` removed,
    ``~`` changed."""
    path, old, new = change
    if old is None:
        return f"+ {path}: {_show(new)}"
    if new is None:
        return f"- {path}: {_show(old)}"
    return f"~ {path}: {_show(old)} -> {_show(new)}"


def _show(value):
    return value if isinstance(value, str) and not value.startswith(" ") else json.dumps(value)


def _display(kind, spec):
    """A canonical spec made readable for diffs: windows and durations as text,
    features and schema keyed by name."""
    spec = json.loads(json.dumps(spec))
    if kind == "view":
        features = {}
        for f in spec["features"]:
            feature = Feature.from_dict(f)
            entry = {"aggregation": f["aggregation"], "column": f.get("column"),
                     "window": feature.window.describe()}
            for key in ("filter", "n", "k"):
                if key in f:
                    entry[key] = f[key]
            if f.get("lateness_ms"):
                entry["lateness"] = format_duration(f["lateness_ms"])
            entry["_summary"] = feature.expression()
            features[f["name"]] = entry
        spec["features"] = features
        spec["online_expiry"] = format_duration(spec.pop("online_expiry_ms"))
        spec["source"] = _display("source", spec["source"])
    if kind == "source":
        spec["schema"] = {n: t for n, t in spec["schema"]}
    if kind == "service":
        spec["features"] = {f["alias"]: f"{f['view']}:{f['feature']}" for f in spec["features"]}
    return spec


def _diff(old, new, path, out):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if key == "_summary":
                continue
            sub = f"{path}.{key}" if path else key
            if key not in new:
                out.append((sub, _summary(old[key]), None))
            elif key not in old:
                out.append((sub, None, _summary(new[key])))
            else:
                _diff(old[key], new[key], sub, out)
    elif isinstance(old, list) and isinstance(new, list) and path.endswith("tags"):
        for tag in old:
            if tag not in new:
                out.append((path, tag, None))
        for tag in new:
            if tag not in old:
                out.append((path, None, tag))
    elif old != new:
        out.append((path, old, new))


def _summary(value):
    """A feature removed or added shows as its one-line expression."""
    if isinstance(value, dict) and "_summary" in value:
        return value["_summary"]
    return value
