"""A feature service as served: what a reader needs to answer one request row
with a model's whole feature vector, stored in the online store beside the
views' schemas (so a lookup server needs no registry).

The stored form is text a C reader parses with ``sscanf`` (every name is an
identifier, see ``tally.core.definitions``)::

    tally-service 1 <service> <version>
    <column> <view> <feature> <entity>        one line per feature, in order

``<entity>`` names the request row's field holding the view's key.
"""
from dataclasses import dataclass
from functools import cached_property

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

    @classmethod
    def of(cls, service, views, version=1):
        """The served form of FeatureService ``service``, whose views are
        ``views`` ({name: FeatureView})."""
        service.validate(views)
        return cls(service.name, version, tuple(
            ServedColumn(f.alias, f.view, f.feature, views[f.view].entity.name)
            for f in service.features))

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

    @cached_property
    def _cells(self):
        """(column, index of its view in ``views``, feature) in answer order:
        what ``assemble`` reads for each row (computed once, as ``views``:
        a served form is read by every request)."""
        index = {view: i for i, view in enumerate(self.views)}
        return tuple((c.column, index[c.view], c.feature) for c in self.columns)

    def to_bytes(self):
        lines = [f"{FORMAT_LINE} {self.name} {self.version}"]
        lines += [f"{c.column} {c.view} {c.feature} {c.entity}" for c in self.columns]
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def from_bytes(cls, name, raw):
        try:
            lines = bytes(raw).decode().splitlines()
            head = lines[0].split()
            if " ".join(head[:2]) != FORMAT_LINE or len(head) != 4 or head[2] != name:
                raise ValueError(f"header {lines[0]!r}")
            columns = []
            for line in lines[1:]:
                parts = line.split()
                if len(parts) != 4:
                    raise ValueError(f"line {line!r}")
                columns.append(ServedColumn(*parts))
            return cls(name, int(head[3]), tuple(columns))
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

    def read(self, store, rows):
        """The vectors of request ``rows`` read from an online store (see
        ``tally.service.store.OnlineStore``), one view at a time."""
        keys = self.keys_of(rows)
        return self.assemble({view: store.get_many(view, keys[entity])
                              for view, (entity, _) in self.views.items()}, len(rows))

    def assemble(self, records, n_rows):
        """The vectors of ``n_rows`` rows from ``records`` ({view: decoded
        record or None per row}): one dict per row, columns in order, None
        where the entity has no record."""
        per_view = [records[view] for view in self.views]
        cells = self._cells
        vectors = []
        for r in range(n_rows):
            row = [view_records[r] for view_records in per_view]
            vectors.append({column: None if row[v] is None else row[v].get(feature)
                            for column, v, feature in cells})
        return vectors
