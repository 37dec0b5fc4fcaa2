"""A feature service as served: what a reader needs to answer one request row
with a model's whole feature vector, stored in the online store beside the
views' schemas (so a lookup server needs no registry).

The stored form is text a C reader parses with ``sscanf`` (every name is an
identifier, see ``tally.core.definitions``)::

    tally-service 1 <service> <version>
    <column> <view> <feature> <entity>        one line per feature, in order

``<entity>`` names the request row's field holding the view's key. A
service with request-time features (``tally.core.request_features``) has
more lines, which the C reader skips (it serves the stored features; the
lookup server and Python readers compute the rest)::

    : <column> <value type>                   each feature's type
    ? <field> <type>                          each request field
    = <column> expression <expression text>
    = <column> function <type> <code sha256> <package.module:function> <input,...>
"""
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tally.core.definitions import Derived, RequestFunction
from tally.core.errors import RecordError

FORMAT_LINE = "tally-service 1"


@dataclass(frozen=True)
class ServedColumn:
    column: str
    view: str
    feature: str
    entity: str


@dataclass(frozen=True)
class ServedService:
    name: str
    version: int
    columns: tuple                  # ServedColumn, in answer order
    computed: tuple = ()            # Derived / RequestFunction: request-time features
    request: tuple = ()             # (field, type): the request fields they read
    types: tuple = ()               # (column, value type) of the features they read

    @classmethod
    def of(cls, service, views, version=1):
        """The served form of FeatureService ``service``, whose views are
        ``views`` ({name: FeatureView})."""
        from tally.core.materialize import feature_types
        service.validate(views)
        columns = tuple(ServedColumn(f.alias, f.view, f.feature, views[f.view].entity.name)
                        for f in service.features)
        if not service.computed:
            return cls(service.name, version, columns)
        keys = {views[f.view].entity.name: views[f.view].entity.key_type
                for f in service.features}
        return cls(service.name, version, columns, service.computed,
                   tuple(keys.items()) + tuple(service.request),
                   tuple((f.alias, feature_types(views[f.view])[f.feature])
                         for f in service.features))

    @cached_property
    def compiled(self):
        """The computed columns' evaluators (``compute``), compiled once."""
        from tally.core.request_features import compile_entries
        types = dict(self.types)
        for c in self.columns:
            types[f"{c.view}.{c.feature}"] = types[c.column]
        types.update((f"request.{name}", kind) for name, kind in self.request)
        return compile_entries(self, types)

    @cached_property
    def views(self):
        """{view: (entity, [(column, feature), ...])}, views in order of first use."""
        result = {}
        for c in self.columns:
            result.setdefault(c.view, (c.entity, []))[1].append((c.column, c.feature))
        return result

    @cached_property
    def entities(self):
        return tuple(dict.fromkeys(c.entity for c in self.columns))

    def to_bytes(self):
        lines = [f"{FORMAT_LINE} {self.name} {self.version}"]
        lines += [f"{c.column} {c.view} {c.feature} {c.entity}" for c in self.columns]
        lines += [f": {column} {kind}" for column, kind in self.types]
        lines += [f"? {name} {kind}" for name, kind in self.request]
        for c in self.computed:
            if c.kind == "expression":
                lines.append(f"= {c.name} expression {' '.join(c.expression.split())}")
            else:
                lines.append(f"= {c.name} function {c.type} {c.code} {c.function} "
                             f"{','.join(c.inputs)}")
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def from_bytes(cls, name, raw):
        try:
            lines = bytes(raw).decode().splitlines()
            head = lines[0].split()
            if " ".join(head[:2]) != FORMAT_LINE or len(head) != 4 or head[2] != name:
                raise ValueError(f"header {lines[0]!r}")
            columns, computed, request, types = [], [], [], []
            for line in lines[1:]:
                parts = line.split()
                if parts and parts[0] == "=" and len(parts) >= 4:
                    computed.append(_computed_of(parts))
                elif parts and parts[0] in (":", "?") and len(parts) == 3:
                    (types if parts[0] == ":" else request).append((parts[1], parts[2]))
                elif len(parts) == 4:
                    columns.append(ServedColumn(*parts))
                else:
                    raise ValueError(f"line {line!r}")
            return cls(name, int(head[3]), tuple(columns), tuple(computed), tuple(request),
                       tuple(types))
        except (ValueError, IndexError, UnicodeDecodeError) as error:
            raise RecordError(f"feature service {name!r}: the stored definition is corrupt "
                              f"({error}); run tally serve to write it again") from None

    def keys_of(self, rows):
        """{entity: [key of each row]} of request rows (dicts); a row lacking
        an entity's key raises KeyError naming it."""
        try:
            return {entity: [row[entity] for row in rows] for entity in self.entities}
        except KeyError:
            pass                        # say which row lacks which key
        for i, row in enumerate(rows):
            for entity in self.entities:
                if entity not in row:
                    raise KeyError(f"row {i} has no {entity!r} key; feature service "
                                   f"{self.name!r} needs "
                                   f"{', '.join(map(repr, self.entities))}")

    def distinct_keys(self, keys):
        """``{entity: (distinct keys, each row's index among them)}`` of
        ``keys`` ({entity: [key of each row]}, valid keys): the 100
        candidate articles of one user read the user's views once."""
        distinct = {}
        for entity, column in keys.items():
            index = {}
            where = [index.setdefault(key, len(index)) for key in column]
            distinct[entity] = (list(index), where)
        return distinct

    def read(self, store, rows):
        """The vectors of request ``rows`` read from an online store (see
        ``tally.service.store.OnlineStore``), one view at a time, each
        distinct key once."""
        distinct = self.distinct_keys(self.keys_of(rows))
        return self.assemble({view: store.get_many(view, distinct[entity][0])
                              for view, (entity, _) in self.views.items()}, rows,
                             {entity: where for entity, (_, where) in distinct.items()})

    def assemble(self, records, rows, positions=None):
        """The vectors of request ``rows`` from ``records`` ({view: decoded
        record or None per row}; with ``positions``, {entity: each row's
        index into its view's records}, as ``distinct_keys`` gives): one
        dict per row, columns in order, None where the entity has no
        record; then the computed columns. Rows of one entity share its
        values (a list is not copied per row)."""
        columns = self.assemble_columns(records, rows, positions)
        return [dict(zip(columns, row)) for row in zip(*columns.values())]

    def assemble_columns(self, records, rows, positions=None):
        """The same vectors as columns, ``{column: [value of each row]}`` in
        the service's order: what a ranker scoring candidates takes, and
        about a third of the objects to send and decode."""
        values = {}
        for view, (entity, columns) in self.views.items():
            found = records[view]
            where = None if positions is None else positions[entity]
            for column, feature in columns:
                distinct = [None if r is None else r.get(feature) for r in found]
                values[column] = distinct if where is None else [distinct[i] for i in where]
        columns = {c.column: values[c.column] for c in self.columns}
        if self.computed:
            columns.update(self._compute(values, rows))
        return columns

    @cached_property
    def _inputs(self):
        """The names the computed columns read."""
        return {name for _, evaluator in self.compiled for name in evaluator.names}

    def _compute(self, values, rows):
        """``[(column, value of each row)]`` of the request-time features,
        from the stored ones (``values``: {column: value of each row}),
        computed as a training set computes them (``request_features.compute``)
        from the columns they read."""
        from tally.core.request_features import compute, request_columns
        types, inputs = dict(self.types), self._inputs
        columns = {}
        for c in self.columns:
            qualified = f"{c.view}.{c.feature}"
            if c.column in inputs or qualified in inputs:
                columns[c.column] = columns[qualified] = _column_of(values[c.column],
                                                                    types[c.column])
        fields = [n for n, _ in self.request if f"request.{n}" in inputs]
        columns.update(request_columns(rows, fields, dict(
            (f"request.{n}", t) for n, t in self.request)))
        compute(self.compiled, columns, len(rows))
        computed = []
        for entry in self.computed:
            column, valid = columns[entry.name]
            computed.append((entry.name, [value if ok else None for value, ok in
                                          zip(column.tolist(), valid.tolist())]))
        return computed


def _computed_of(parts):
    """A ``= ...`` line's computed column."""
    if parts[2] == "expression":
        return Derived(parts[1], " ".join(parts[3:]))
    if parts[2] == "function" and len(parts) == 7:
        return RequestFunction(parts[1], parts[5], tuple(filter(None, parts[6].split(","))),
                               parts[3], parts[4])
    raise ValueError(f"computed column {' '.join(parts[:3])!r}")


def _column_of(values, kind):
    """Decoded record values of one column as an evaluator reads them."""
    valid = np.array([v is not None for v in values], bool)
    if kind == "int64":
        return np.array([v if v is not None else 0 for v in values], np.int64), valid
    if kind == "float64":
        array = np.array([v if v is not None else np.nan for v in values], np.float64)
        return array, valid & ~np.isnan(array)
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array, valid
