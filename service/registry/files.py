"""Definition files: loading a ``.py`` or ``.sql`` file, and collecting the
definitions to apply (each view's entity and source included, duplicates
refused)."""
import os
import runpy

from tally.core.definitions import (DefinitionError, Entity, FeatureService, FeatureView, Source,
                                    kind_of)
from tally.core.materialize import check_servable
from tally.service.registry.errors import RegistryError


def load_file(path, sources=(), entities=()):
    """The definitions of a ``.py`` or ``.sql`` file.

    A Python file is run; its module-level Entity, Source, FeatureView and
    FeatureService
    objects (also inside module-level lists, tuples and dicts) are its
    definitions. A SQL file is parsed with :func:`tally.core.sql.load_sql`;
    ``sources``/``entities`` are the catalog its FROM clauses resolve against
    (the CLI passes the registry's current ones)."""
    if not os.path.exists(path):
        raise RegistryError(f"{path}: no such file")
    if path.endswith(".sql"):
        from tally.core.sql import load_sql
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return load_sql(text, sources=sources, entities=entities, origin=path)
    if path.endswith(".py"):
        try:
            namespace = runpy.run_path(path, run_name="__tally_definitions__")
        except DefinitionError as error:
            raise DefinitionError(f"{path}: {error}") from None
        except Exception as error:
            raise RegistryError(f"{path}: could not be loaded: "
                                f"{type(error).__name__}: {error}") from error
        found, seen = [], set()

        def add(value):
            if isinstance(value, (Entity, Source, FeatureView, FeatureService)) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        for name, value in namespace.items():
            if name.startswith("_"):
                continue
            if isinstance(value, (list, tuple)):
                for item in value:
                    add(item)
            elif isinstance(value, dict):
                for item in value.values():
                    add(item)
            else:
                add(value)
        return found
    raise RegistryError(f"{path}: definitions are .py (Python DSL) or .sql (Tally SQL) files")


def collect(definitions, origin=None):
    """Expand views into (entity, source, view), drop exact duplicates and
    refuse two different definitions under one name. Returns [(kind, definition)]
    ordered entities, sources, views, services."""
    found = {}        # (kind, name) -> (definition, where)
    for definition in definitions:
        kind = kind_of(definition)
        if kind == "view":
            definition.validate()
            check_servable(definition)          # refused at plan/apply, not at serve
            parts = [("entity", definition.entity, f"view {definition.name!r}"),
                     ("source", definition.source, f"view {definition.name!r}")]
            parts += [("source", join.dimension, f"view {definition.name!r}'s join")
                      for join in definition.joins]
            parts.append(("view", definition, "the definitions"))
        else:
            parts = [(kind, definition, "the definitions")]
        for part_kind, part, where in parts:
            key = (part_kind, part.name)
            if key in found and found[key][0] != part:
                prefix = f"{origin}: " if origin else ""
                raise DefinitionError(
                    f"{prefix}{part_kind} {part.name!r} is defined twice with different "
                    f"content (in {found[key][1]} and {where}); give each {part_kind} a "
                    f"distinct name, or use one {type(part).__name__} object for both")
            found.setdefault(key, (part, where))
    order = {kind: i for i, kind in enumerate(("entity", "source", "view", "service"))}
    return sorted(((k[0], v[0]) for k, v in found.items()), key=lambda kv: order[kv[0]])
