"""What registry reads return: versions, changes, plans, lineage, search hits,
diffs and descriptions.

Each result has a text form (``str``, what the CLI prints), ``to_dict`` (what
``--json`` prints) and, where a notebook shows it, ``_repr_html_``.
"""
import html
import json
from dataclasses import dataclass, field

from tally.core.definitions import (Entity, FeatureService, FeatureView, Source,
                                    canonical_document,
                                    content_hash, from_document)
from tally.core.durations import format_duration
from tally.service.registry.diff import change_line
from tally.service.registry.errors import RegistryError


def _e(text):
    return html.escape(str(text))


@dataclass(frozen=True)
class VersionInfo:
    """One stored version of a definition."""
    kind: str
    name: str
    version: int
    hash: str
    state: str
    created_at: str
    created_by: str
    origin: str
    definition: object = field(repr=False, compare=False)
    state_hash: str = None

    @classmethod
    def from_row(cls, row):
        """The version a row of the ``versions`` table stores, its content
        checked against its hash: a stored definition edited in place (or
        corrupted) is refused, never served under its old hash."""
        where = f"{row['kind']} {row['name']}@v{row['version']}"
        try:
            definition = from_document(json.loads(row["body"]))
        except (ValueError, KeyError, TypeError) as error:
            raise RegistryError(f"the registry is corrupt: {where} cannot be read ({error}); "
                                "restore the registry from a backup") from None
        if content_hash(definition) != row["hash"]:
            raise RegistryError(f"the registry is corrupt: {where}'s stored definition does "
                                f"not match its content hash {row['hash'][:12]}; restore the "
                                "registry from a backup")
        return cls(row["kind"], row["name"], row["version"], row["hash"], row["state"],
                   row["created_at"], row["created_by"], row["origin"], definition,
                   row["state_hash"])

    @property
    def ref(self):
        return f"{self.name}@v{self.version}"

    def to_dict(self):
        return {"kind": self.kind, "name": self.name, "version": self.version,
                "ref": self.ref, "hash": self.hash, "state": self.state,
                "created_at": self.created_at, "created_by": self.created_by,
                "origin": self.origin,
                "definition": canonical_document(self.definition)["spec"]}

    def __repr__(self):
        return (f"<{self.kind} {self.ref} {self.state} {self.hash[:12]} "
                f"{self.created_at} by {self.created_by}>")

    def _repr_html_(self):
        head = (f"<div>{_e(self.kind)} <b>{_e(self.ref)}</b> &middot; {_e(self.state)} "
                f"&middot; <code>{_e(self.hash[:12])}</code> &middot; {_e(self.created_at)} "
                f"by {_e(self.created_by)}</div>")
        return head + self.definition._repr_html_()


@dataclass(frozen=True)
class Change:
    """One entry of the change log (what the service polls)."""
    seq: int
    at: str
    kind: str
    name: str
    version: int
    event: str            # created | candidate | promoted | retired | cancelled | failed
    from_version: int     # | rolled_back
    detail: str
    actor: str

    def to_dict(self):
        return dict(self.__dict__)

    def __str__(self):
        text = f"#{self.seq} {self.at} {self.kind} {self.name}@v{self.version} {self.event}"
        if self.from_version:
            text += f" (from v{self.from_version})"
        return text + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class Deployment:
    """A view's versions the service should compute: the current one (served)
    and at most one candidate (computed alongside, promoted when caught up).
    ``same_state`` says the candidate's computed state equals the current's
    (only metadata changed): it can be promoted without recomputing."""
    name: str
    current: VersionInfo
    candidate: VersionInfo

    @property
    def same_state(self):
        return bool(self.current and self.candidate
                    and self.current.state_hash == self.candidate.state_hash)


@dataclass(frozen=True)
class PlanItem:
    """What apply does (or did) to one definition."""
    kind: str
    name: str
    action: str        # create | unchanged | reactivate | cancel-candidate
    version: int       # the version the content has (or gets)
    hash: str
    state: str         # the state it is (or would be) in
    previous: int      # the current version before
    changes: tuple = ()   # (path, old, new) against the previous current version

    @property
    def changed(self):
        return self.action != "unchanged"

    def to_dict(self):
        data = dict(self.__dict__)
        data["changes"] = [list(c) for c in self.changes]
        return data

    def __str__(self):
        symbol = {"create": "+" if self.previous is None else "~", "unchanged": "=",
                  "reactivate": "<", "cancel-candidate": "x"}[self.action]
        ref = f"{self.name}@v{self.version}"
        if self.action == "create":
            what = "new" if self.previous is None else f"new version, replaces v{self.previous}"
            text = f"{symbol} {self.kind} {ref} ({what}; {self.state})"
        elif self.action == "unchanged":
            text = f"{symbol} {self.kind} {ref} (unchanged)"
        elif self.action == "reactivate":
            text = (f"{symbol} {self.kind} {ref} (same content as v{self.version}; becomes "
                    f"{self.state}" + (f", replaces v{self.previous})" if self.previous
                                       else ")"))
        else:
            text = f"{symbol} {self.kind} {ref} (unchanged; the pending candidate is cancelled)"
        lines = [text] + [f"    {change_line(c)}" for c in self.changes]
        return "\n".join(lines)


class Plan(list):
    """The items of an apply, in order; ``str()`` is the human summary."""

    def __str__(self):
        if not self:
            return "nothing to apply"
        lines = [str(item) for item in self]
        counts = {}
        for item in self:
            counts[item.action] = counts.get(item.action, 0) + 1
        lines.append(", ".join(f"{n} {a}" for a, n in counts.items()))
        return "\n".join(lines)

    def _repr_html_(self):
        return "<pre>" + _e(str(self)) + "</pre>"


@dataclass(frozen=True)
class LineageRow:
    """A feature, its view (version), its source, topic and the fields it reads.
    ``fields`` are (field, role) pairs; roles: value, filter, key, event_time,
    and for a join's attributes join_key, dimension_key, version_time."""
    view: str
    version: int
    state: str
    feature: str
    source: str
    topic: str
    fields: tuple

    def to_dict(self):
        return {"view": self.view, "version": self.version, "state": self.state,
                "feature": self.feature, "source": self.source, "topic": self.topic,
                "fields": [{"field": f, "role": r} for f, r in self.fields]}

    def __str__(self):
        fields = ", ".join(f"{f} ({r})" for f, r in self.fields)
        return (f"{self.view}.{self.feature} -> view {self.view}@v{self.version} "
                f"({self.state}) -> source {self.source} -> topic {self.topic} -> "
                f"fields {fields}")


class Lineage(list):
    """LineageRows, one per feature (upstream) or per reading feature (downstream)."""

    def __str__(self):
        return "\n".join(str(row) for row in self) or "no lineage"

    def _repr_html_(self):
        rows = "".join(
            f"<tr><td>{_e(r.view)}.{_e(r.feature)}</td><td>{_e(r.view)}@v{r.version}</td>"
            f"<td>{_e(r.source)}</td><td>{_e(r.topic)}</td>"
            f"<td>{_e(', '.join(f'{f} ({x})' for f, x in r.fields))}</td></tr>" for r in self)
        return ("<table><tr><th>feature</th><th>view</th><th>source</th><th>topic</th>"
                f"<th>fields</th></tr>{rows}</table>")


@dataclass(frozen=True)
class SearchHit:
    """A definition that matched a search."""
    kind: str
    name: str
    version: int
    state: str
    owner: str
    tags: tuple
    description: str
    features: tuple = ()      # features whose names matched the text

    def to_dict(self):
        return dict(self.__dict__, tags=list(self.tags), features=list(self.features))

    def __str__(self):
        text = f"{self.kind:6} {self.name}@v{self.version} ({self.state})"
        if self.owner:
            text += f" owner={self.owner}"
        if self.tags:
            text += f" tags={','.join(self.tags)}"
        if self.features:
            text += f" features: {', '.join(self.features)}"
        if self.description:
            text += f" - {self.description}"
        return text


class Results(list):
    """VersionInfos or SearchHits, one per line in text."""

    def __str__(self):
        return "\n".join(str(x) for x in self) or "nothing found"

    def _repr_html_(self):
        return "<pre>" + _e(str(self)) + "</pre>"


@dataclass(frozen=True)
class Diff:
    """Differences between two versions: ``changes`` are (path, old, new)."""
    kind: str
    old: VersionInfo
    new: VersionInfo
    changes: tuple

    def to_dict(self):
        return {"kind": self.kind, "old": self.old.ref, "new": self.new.ref,
                "changes": [{"path": p, "old": o, "new": n} for p, o, n in self.changes]}

    def __str__(self):
        head = f"{self.kind} {self.old.ref} -> {self.new.ref}"
        if not self.changes:
            return head + ": no differences"
        return "\n".join([head] + [f"  {change_line(c)}" for c in self.changes])

    def _repr_html_(self):
        return "<pre>" + _e(str(self)) + "</pre>"


@dataclass(frozen=True)
class Description:
    """``describe``: a version, its definition, the name's history and lineage."""
    info: VersionInfo
    history: tuple
    candidate: VersionInfo = None

    def to_dict(self):
        data = self.info.to_dict()
        data["history"] = [dict(version=v.version, state=v.state, hash=v.hash,
                                created_at=v.created_at, created_by=v.created_by,
                                origin=v.origin) for v in self.history]
        if self.info.kind == "view":
            from tally.core.sql import view_to_sql
            data["sql"] = view_to_sql(self.info.definition)
        elif self.info.kind == "service":
            from tally.core.sql import service_to_sql
            data["sql"] = service_to_sql(self.info.definition)
        return data

    def __str__(self):
        info, d = self.info, self.info.definition
        lines = [f"{info.kind} {info.ref} ({info.state})",
                 f"  hash        {info.hash}",
                 f"  created     {info.created_at} by {info.created_by}"
                 + (f" from {info.origin}" if info.origin else "")]
        if self.candidate is not None:
            lines.append(f"  deploying   v{self.candidate.version} (candidate)")
        if isinstance(d, FeatureView):
            lines += [f"  owner       {d.owner or '-'}",
                      f"  description {d.description or '-'}",
                      f"  tags        {', '.join(d.tags) or '-'}",
                      f"  entity      {d.entity.name} ({d.entity.key_type}), key column "
                      f"{d.key_column}",
                      f"  source      {d.source.name}: topic {d.source.topic}, "
                      f"{d.source.format}, event time {d.source.timestamp_field}",
                      "  expiry      " + (format_duration(d.online_expiry)
                                           if d.online_expiry else "never"),
                      "  features"]
            width = max(len(f.name) for f in d.features)
            lines += [f"    {f.name:{width}}  {f.expression()}" for f in d.features]
        elif isinstance(d, Source):
            lines += [f"  topic       {d.topic}", f"  format      {d.format}",
                      f"  event time  {d.timestamp_field}",
                      f"  schema      {', '.join(f'{n} {t}' for n, t in d.schema)}"]
            if d.archive:
                lines.append(f"  archive     {d.archive}")
        elif isinstance(d, Entity):
            lines.append(f"  key type    {d.key_type}")
        elif isinstance(d, FeatureService):
            lines += [f"  owner       {d.owner or '-'}",
                      f"  description {d.description or '-'}",
                      f"  tags        {', '.join(d.tags) or '-'}",
                      "  features"]
            width = max(len(f.alias) for f in d.features)
            lines += [f"    {f.alias:{width}}  {f.view}:{f.feature}" for f in d.features]
        lines.append("  versions")
        for v in self.history:
            lines.append(f"    v{v.version:<3} {v.state:9} {v.hash[:12]}  {v.created_at} "
                         f"{v.created_by}" + (f"  {v.origin}" if v.origin else ""))
        return "\n".join(lines)

    def _repr_html_(self):
        history = "".join(f"<tr><td>v{v.version}</td><td>{_e(v.state)}</td>"
                          f"<td><code>{_e(v.hash[:12])}</code></td><td>{_e(v.created_at)}</td>"
                          f"<td>{_e(v.created_by)}</td></tr>" for v in self.history)
        return (self.info._repr_html_() + "<div>versions</div><table><tr><th>version</th>"
                "<th>state</th><th>hash</th><th>created</th><th>by</th></tr>"
                f"{history}</table>")
