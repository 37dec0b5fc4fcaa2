"""The registry: immutable, versioned feature definitions in SQLite.

Every definition (entity, source, feature view) is stored once per distinct
content, identified by its content hash (:func:`tally.core.definitions.content_hash`)
and numbered v1, v2, ... per (kind, name) in apply order. Applying an
unchanged definition creates nothing. A name resolves to its *current*
version; ``name@v3`` pins one; rollback re-points the current version.

Concurrency: one SQLite file in WAL mode; every write is one ``BEGIN
IMMEDIATE`` transaction (writers queue on the lock, with a busy timeout), so
two processes applying at once serialise, and applying the same content
twice creates one version. Readers never block writers. (SQLite's locking
needs a local filesystem: do not put the file on NFS.)

The deployment cycle (the contract with the streaming service)
--------------------------------------------------------------

Each version of a view has a state:

* ``candidate`` - applied, being computed by the service next to the current
  version (at most one per view);
* ``current``   - what a name resolves to and the service serves;
* ``retired``   - was current, replaced by a newer version or a rollback;
* ``cancelled`` - a candidate replaced before it caught up (a newer apply, a
  rollback, or an apply of the current content);
* ``failed``    - the service could not compute it (``mark_failed``).

The registry's ``deploy_mode`` says who promotes candidates:

* ``immediate`` (the default, for a registry no service watches): apply makes
  a new version current at once.
* ``managed`` (set by the service, :meth:`Registry.set_deploy_mode`): apply
  makes a new view version a *candidate*; the service computes it alongside
  the current one and calls :meth:`Registry.promote` when it has caught up
  (or :meth:`Registry.mark_failed`). A version whose computed state equals
  the current version's (same ``state_hash``: only owner, description, tags
  or online expiry changed) has nothing to catch up and becomes current at
  once. Entities and sources need no computation and become current at once
  in either mode.

Every state change appends a row to the change log with a monotonically
increasing sequence number: the service polls :meth:`Registry.changes`
(``since`` its last seen number; :meth:`Registry.wait_for_changes` blocks) and
reconciles against :meth:`Registry.deployments` (per view: current and
candidate). :meth:`Registry.promote` is a compare-and-set: it succeeds only if
the version is still the view's candidate, so a promotion racing a newer
apply or a rollback is refused (:class:`Conflict`) instead of undoing it.
Rollback re-points ``current`` immediately (the service must still have, or
recompute, the state of the version rolled back to) and cancels a pending
candidate.
"""
import datetime
import getpass
import html
import json
import os
import runpy
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from tally.core.definitions import (DefinitionError, Entity, FeatureView, Source,
                                    canonical_document, canonical_json, content_hash,
                                    format_duration, from_document, kind_of, state_hash)

DEFAULT_PATH = os.path.join(".tally", "registry.db")
SCHEMA_VERSION = 1
KINDS = ("view", "source", "entity")          # lookup order of a bare name
CANDIDATE, CURRENT, RETIRED, CANCELLED, FAILED = (
    "candidate", "current", "retired", "cancelled", "failed")
IMMEDIATE, MANAGED = "immediate", "managed"

MIGRATIONS = {
    1: [
        """CREATE TABLE versions (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            hash TEXT NOT NULL,
            state_hash TEXT,
            body TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            origin TEXT,
            UNIQUE (kind, name, version),
            UNIQUE (kind, name, hash))""",
        """CREATE TABLE heads (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            current INTEGER,
            candidate INTEGER,
            PRIMARY KEY (kind, name))""",
        """CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            event TEXT NOT NULL,
            from_version INTEGER,
            detail TEXT,
            actor TEXT)""",
        """CREATE TABLE facets (
            version_id INTEGER NOT NULL REFERENCES versions(id),
            key TEXT NOT NULL,
            value TEXT NOT NULL)""",
        "CREATE INDEX facets_by_value ON facets (key, value)",
        "CREATE INDEX facets_by_version ON facets (version_id)",
        """CREATE TABLE lineage (
            version_id INTEGER NOT NULL REFERENCES versions(id),
            view TEXT NOT NULL,
            feature TEXT NOT NULL,
            source TEXT NOT NULL,
            topic TEXT NOT NULL,
            field TEXT NOT NULL,
            role TEXT NOT NULL)""",
        "CREATE INDEX lineage_by_topic ON lineage (topic, field)",
        "CREATE INDEX lineage_by_source ON lineage (source, field)",
        "CREATE INDEX lineage_by_version ON lineage (version_id)",
    ],
}


class RegistryError(Exception):
    """A registry operation failed; the message says why and what to do."""


class NotFound(RegistryError, KeyError):
    def __str__(self):
        return self.args[0] if self.args else "not found"


class Conflict(RegistryError):
    """A compare-and-set (promote, mark_failed) lost against a concurrent change."""


def default_path():
    return os.environ.get("TALLY_REGISTRY") or DEFAULT_PATH


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _actor():
    try:
        return os.environ.get("TALLY_USER") or getpass.getuser()
    except Exception:   # no login name in some containers
        return "unknown"


# --------------------------------------------------------------------------
# Result types


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
        lines = [text] + [f"    {_change_line(c)}" for c in self.changes]
        return "\n".join(lines)


class Plan(list):
    """The items of an apply, in order; ``str()`` is the human summary."""

    @property
    def changed(self):
        return [item for item in self if item.changed]

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
    ``fields`` are (field, role) pairs; roles: value, filter, key, event_time."""
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
        return "\n".join([head] + [f"  {_change_line(c)}" for c in self.changes])

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


def _e(text):
    return html.escape(str(text))


def _change_line(change):
    path, old, new = change
    if old is None:
        return f"+ {path}: {_show(new)}"
    if new is None:
        return f"- {path}: {_show(old)}"
    return f"~ {path}: {_show(old)} -> {_show(new)}"


def _show(value):
    return value if isinstance(value, str) and not value.startswith(" ") else json.dumps(value)


# --------------------------------------------------------------------------
# Diffs of canonical documents


def _display(kind, spec):
    """A canonical spec made readable for diffs: windows and durations as text,
    features and schema keyed by name."""
    spec = json.loads(json.dumps(spec))
    if kind == "view":
        features = {}
        for f in spec["features"]:
            from tally.core.definitions import Feature
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
    return spec


def diff_specs(kind, old, new):
    """(path, old, new) differences between two canonical specs."""
    changes = []
    _diff(_display(kind, old), _display(kind, new), "", changes)
    return tuple(changes)


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
    if isinstance(value, dict) and "_summary" in value:
        return value["_summary"]
    return value


# --------------------------------------------------------------------------
# Loading definition files


def load_file(path, sources=(), entities=()):
    """The definitions of a ``.py`` or ``.sql`` file.

    A Python file is run; its module-level Entity, Source and FeatureView
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
            if isinstance(value, (Entity, Source, FeatureView)) and id(value) not in seen:
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
    ordered entities, sources, views."""
    found = {}        # (kind, name) -> (definition, where)
    for definition in definitions:
        kind = kind_of(definition)
        if kind == "view":
            definition.validate()
            parts = [("entity", definition.entity, f"view {definition.name!r}"),
                     ("source", definition.source, f"view {definition.name!r}"),
                     ("view", definition, "the definitions")]
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
    order = {kind: i for i, kind in enumerate(("entity", "source", "view"))}
    return sorted(((k[0], v[0]) for k, v in found.items()), key=lambda kv: order[kv[0]])


# --------------------------------------------------------------------------
# The registry


class Registry:
    """Versioned definitions in one SQLite file (see the module docstring).

    ``Registry(path)``; the path defaults to ``$TALLY_REGISTRY`` or
    ``.tally/registry.db``. Usable as a context manager."""

    def __init__(self, path=None, timeout=60.0):
        self.path = path or default_path()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._set_wal(timeout)
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._migrate()

    def _set_wal(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise RegistryError(f"{self.path}: SQLite refused WAL mode ({mode}); "
                                        "put the registry on a local filesystem")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self):
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Registry({self.path!r})"

    # transactions ----------------------------------------------------------

    @contextmanager
    def _write(self):
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _read(self):
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    def _migrate(self):
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, "
                       "value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RegistryError(f"{self.path}: the registry has schema version {version}, "
                                    f"newer than this Tally's ({SCHEMA_VERSION}); upgrade Tally")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                           (str(step),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('deploy_mode', ?)", (IMMEDIATE,))

    @property
    def schema_version(self):
        return int(self._meta("schema_version"))

    def _meta(self, key):
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # settings --------------------------------------------------------------

    @property
    def deploy_mode(self):
        return self._meta("deploy_mode")

    def set_deploy_mode(self, mode):
        """'immediate' (apply makes views current) or 'managed' (the service
        promotes candidates once caught up)."""
        if mode not in (IMMEDIATE, MANAGED):
            raise RegistryError(f"deploy mode {mode!r}: use {IMMEDIATE!r} or {MANAGED!r}")
        with self._write() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'deploy_mode'", (mode,))

    # apply -----------------------------------------------------------------

    def plan(self, definitions, origin=None):
        """What :meth:`apply` would do, without changing anything."""
        items = collect(definitions, origin)
        with self._read() as db:
            mode = self.deploy_mode
            return Plan(self._plan_item(db, kind, d, mode) for kind, d in items)

    def apply(self, definitions, origin=None, actor=None):
        """Store the definitions (new versions for changed content) and deploy
        them; returns the :class:`Plan` carried out. All or nothing."""
        items = collect(definitions, origin)
        actor = actor or _actor()
        with self._write() as db:
            mode = self.deploy_mode
            plan = Plan()
            for kind, definition in items:
                item = self._plan_item(db, kind, definition, mode)
                self._execute(db, item, definition, origin, actor, mode)
                plan.append(item)
            return plan

    def apply_file(self, path, actor=None, dry_run=False):
        """Load ``path`` (.py or .sql; a .sql file may use the registry's current
        sources and entities) and apply (or plan, with ``dry_run``) it."""
        definitions = load_file(path, self.current_definitions("source"),
                                self.current_definitions("entity"))
        if dry_run:
            return self.plan(definitions, origin=path)
        return self.apply(definitions, origin=os.path.basename(path), actor=actor)

    def _plan_item(self, db, kind, definition, mode):
        digest = content_hash(definition)
        head = db.execute("SELECT current, candidate FROM heads WHERE kind = ? AND name = ?",
                          (kind, definition.name)).fetchone()
        current = head["current"] if head else None
        candidate = head["candidate"] if head else None
        row = db.execute("SELECT version FROM versions WHERE kind = ? AND name = ? AND hash = ?",
                         (kind, definition.name, digest)).fetchone()
        deploy_as = CURRENT
        if mode == MANAGED and kind == "view":
            deploy_as = CANDIDATE
            if current is not None:
                # only metadata changed: the state computed for the current version
                # is this version's state too, so there is nothing to catch up
                same = db.execute("SELECT state_hash FROM versions WHERE kind = ? AND "
                                  "name = ? AND version = ?",
                                  (kind, definition.name, current)).fetchone()
                if same["state_hash"] == state_hash(definition):
                    deploy_as = CURRENT
        changes = ()
        base = current if current is not None else candidate
        if base is not None:
            base_spec = self._spec(db, kind, definition.name, base)
            changes = diff_specs(kind, base_spec, definition.to_dict())
        if row is None:
            latest = db.execute("SELECT MAX(version) FROM versions WHERE kind = ? AND name = ?",
                                (kind, definition.name)).fetchone()[0] or 0
            return PlanItem(kind, definition.name, "create", latest + 1, digest, deploy_as,
                            current, changes)
        version = row["version"]
        if version == candidate:
            return PlanItem(kind, definition.name, "unchanged", version, digest, CANDIDATE,
                            current)
        if version == current:
            action = "cancel-candidate" if candidate is not None else "unchanged"
            return PlanItem(kind, definition.name, action, version, digest, CURRENT, current)
        return PlanItem(kind, definition.name, "reactivate", version, digest, deploy_as,
                        current, changes)

    def _spec(self, db, kind, name, version):
        body = db.execute("SELECT body FROM versions WHERE kind = ? AND name = ? AND version = ?",
                          (kind, name, version)).fetchone()["body"]
        return json.loads(body)["spec"]

    def _execute(self, db, item, definition, origin, actor, mode):
        if item.action == "unchanged":
            return
        if item.action == "cancel-candidate":
            self._cancel_candidate(db, item.kind, item.name, actor, "the current content was "
                                   "applied again")
            return
        if item.action == "create":
            document = canonical_document(definition)
            cursor = db.execute(
                "INSERT INTO versions (kind, name, version, hash, state_hash, body, state, "
                "created_at, created_by, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.kind, item.name, item.version, item.hash,
                 state_hash(definition) if item.kind == "view" else None,
                 canonical_json(document), "new", _now(), actor, origin))
            self._index(db, cursor.lastrowid, item.kind, definition)
            self._log(db, item.kind, item.name, item.version, "created", actor=actor,
                      detail=origin)
        if item.state == CANDIDATE:
            self._make_candidate(db, item.kind, item.name, item.version, actor)
        else:
            self._make_current(db, item.kind, item.name, item.version, "promoted", actor,
                               "applied" if item.action == "create" else "re-applied")

    def _head(self, db, kind, name):
        row = db.execute("SELECT current, candidate FROM heads WHERE kind = ? AND name = ?",
                         (kind, name)).fetchone()
        if row is None:
            db.execute("INSERT INTO heads (kind, name) VALUES (?, ?)", (kind, name))
            return None, None
        return row["current"], row["candidate"]

    def _set_state(self, db, kind, name, version, state):
        db.execute("UPDATE versions SET state = ? WHERE kind = ? AND name = ? AND version = ?",
                   (state, kind, name, version))

    def _cancel_candidate(self, db, kind, name, actor, reason):
        _, candidate = self._head(db, kind, name)
        if candidate is None:
            return
        self._set_state(db, kind, name, candidate, CANCELLED)
        db.execute("UPDATE heads SET candidate = NULL WHERE kind = ? AND name = ?", (kind, name))
        self._log(db, kind, name, candidate, "cancelled", actor=actor, detail=reason)

    def _make_candidate(self, db, kind, name, version, actor):
        current, candidate = self._head(db, kind, name)
        if candidate is not None and candidate != version:
            self._cancel_candidate(db, kind, name, actor, f"superseded by v{version}")
        self._set_state(db, kind, name, version, CANDIDATE)
        db.execute("UPDATE heads SET candidate = ? WHERE kind = ? AND name = ?",
                   (version, kind, name))
        self._log(db, kind, name, version, "candidate", from_version=current, actor=actor,
                  detail="computing alongside the current version"
                  if current is not None else "computing the first version")

    def _make_current(self, db, kind, name, version, event, actor, detail=None):
        current, candidate = self._head(db, kind, name)
        if candidate is not None and candidate != version:
            self._cancel_candidate(db, kind, name, actor, f"v{version} became current")
        if current is not None and current != version:
            self._set_state(db, kind, name, current, RETIRED)
            self._log(db, kind, name, current, "retired", actor=actor,
                      detail=f"replaced by v{version}")
        self._set_state(db, kind, name, version, CURRENT)
        db.execute("UPDATE heads SET current = ?, candidate = NULL WHERE kind = ? AND name = ?",
                   (version, kind, name))
        self._log(db, kind, name, version, event, from_version=current, actor=actor,
                  detail=detail)

    def _log(self, db, kind, name, version, event, from_version=None, detail=None, actor=None):
        db.execute("INSERT INTO changes (at, kind, name, version, event, from_version, detail, "
                   "actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (_now(), kind, name, version, event, from_version, detail,
                    actor or _actor()))

    def _index(self, db, version_id, kind, definition):
        facets = []
        if kind == "view":
            facets += [("entity", definition.entity.name), ("source", definition.source.name),
                       ("topic", definition.source.topic), ("owner", definition.owner)]
            facets += [("tag", tag) for tag in definition.tags]
            facets += [("feature", f.name) for f in definition.features]
            facets += [("description", definition.description)]
            rows = []
            for lineage in view_lineage(definition):
                rows += [(version_id, definition.name, lineage["feature"],
                          definition.source.name, definition.source.topic, f, role)
                         for f, role in lineage["fields"]]
            db.executemany("INSERT INTO lineage (version_id, view, feature, source, topic, "
                           "field, role) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        elif kind == "source":
            facets += [("source", definition.name), ("topic", definition.topic)]
        else:
            facets += [("entity", definition.name)]
        db.executemany("INSERT INTO facets (version_id, key, value) VALUES (?, ?, ?)",
                       [(version_id, k, v) for k, v in facets if v])

    # the deployment contract -------------------------------------------------

    def sequence(self):
        """The number of the newest change (0 for an empty registry)."""
        return self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def changes(self, since=0, limit=None):
        """Changes with sequence numbers greater than ``since``, oldest first."""
        query = "SELECT * FROM changes WHERE seq > ? ORDER BY seq"
        params = [since]
        if limit:
            query += " LIMIT ?"
            params.append(limit)
        return [Change(**dict(row)) for row in self._conn.execute(query, params)]

    def wait_for_changes(self, since, timeout=30.0, poll_interval=0.2):
        """Block until there are changes after ``since`` (or ``timeout``); returns them."""
        deadline = time.monotonic() + timeout
        while True:
            if self.sequence() > since:
                return self.changes(since)
            if time.monotonic() >= deadline:
                return []
            time.sleep(poll_interval)

    def deployments(self):
        """Per view: the current version and the candidate, if any."""
        with self._read() as db:
            heads = db.execute("SELECT name, current, candidate FROM heads WHERE kind = 'view' "
                               "ORDER BY name").fetchall()
            return [Deployment(h["name"],
                               self._info(db, "view", h["name"], h["current"])
                               if h["current"] is not None else None,
                               self._info(db, "view", h["name"], h["candidate"])
                               if h["candidate"] is not None else None)
                    for h in heads]

    def promote(self, name, version, kind="view", actor=None):
        """Make candidate ``version`` current (the service calls this when the
        candidate has caught up). Refused with :class:`Conflict` unless
        ``version`` is still the candidate."""
        with self._write() as db:
            current, candidate = self._head(db, kind, name)
            if candidate != version:
                state = self._state(db, kind, name, version)
                raise Conflict(f"{kind} {name}@v{version} is not the candidate (it is "
                               f"{state or 'unknown'}; the candidate is "
                               f"{'v' + str(candidate) if candidate else 'none'}); "
                               "re-read deployments() and act on the new candidate")
            self._make_current(db, kind, name, version, "promoted", actor or _actor(),
                               "caught up")
            return self._info(db, kind, name, version)

    mark_caught_up = promote

    def mark_failed(self, name, version, reason, kind="view", actor=None):
        """The service could not compute candidate ``version``; the current
        version keeps serving."""
        with self._write() as db:
            _, candidate = self._head(db, kind, name)
            if candidate != version:
                raise Conflict(f"{kind} {name}@v{version} is not the candidate; nothing to "
                               "mark failed")
            self._set_state(db, kind, name, version, FAILED)
            db.execute("UPDATE heads SET candidate = NULL WHERE kind = ? AND name = ?",
                       (kind, name))
            self._log(db, kind, name, version, "failed", actor=actor, detail=reason)

    def _state(self, db, kind, name, version):
        row = db.execute("SELECT state FROM versions WHERE kind = ? AND name = ? AND "
                         "version = ?", (kind, name, version)).fetchone()
        return row["state"] if row else None

    # rollback ----------------------------------------------------------------

    def rollback(self, ref, to=None, actor=None):
        """Re-point ``ref``'s current version to ``to`` (a version number, ``"v2"``,
        or a pinned ref ``name@v2``), by default to the newest older version that
        has been current (so rolling back twice goes two steps back). Cancels a
        pending candidate. Returns the new current VersionInfo."""
        kind, name, pinned, feature = self._parse_ref(ref)
        if feature:
            raise RegistryError(f"{ref}: roll back the view {name!r}, not a feature")
        if pinned is not None and to is None:
            to = pinned
        with self._write() as db:
            kind = self._kind_of(db, name, kind)
            current, _ = self._head(db, kind, name)
            if current is None:
                raise RegistryError(f"{kind} {name!r} has no current version to roll back")
            if to is None:
                # the newest older version that has been current
                row = db.execute(
                    "SELECT MAX(v.version) FROM versions v WHERE v.kind = ? AND v.name = ? AND "
                    "v.version < ? AND EXISTS (SELECT 1 FROM changes c WHERE c.kind = v.kind "
                    "AND c.name = v.name AND c.version = v.version AND c.event IN "
                    "('promoted', 'rolled_back'))", (kind, name, current)).fetchone()
                if row[0] is None:
                    raise RegistryError(f"{kind} {name!r}: no version before v{current} has "
                                        "been current; there is nothing to roll back to "
                                        f"(pin one: tally rollback {name} --to vN)")
                target = row[0]
            else:
                target = self._version_number(db, kind, name, to)
            if target == current:
                raise RegistryError(f"{kind} {name}@v{target} is already current")
            self._make_current(db, kind, name, target, "rolled_back", actor or _actor(),
                               f"rollback from v{current}")
            return self._info(db, kind, name, target)

    def _version_number(self, db, kind, name, to):
        if isinstance(to, str):
            _, _, number, _ = self._parse_ref(to if "@" in to else f"{name}@{to}")
            to = number
        row = db.execute("SELECT version FROM versions WHERE kind = ? AND name = ? AND "
                         "version = ?", (kind, name, to)).fetchone()
        if row is None:
            raise NotFound(f"{kind} {name!r} has no version v{to}; see tally describe {name}")
        return to

    # lookup ------------------------------------------------------------------

    def _parse_ref(self, ref):
        """'[kind:]name[.feature][@vN | @N | @hash-prefix]' -> (kind, name, version, feature).
        A hash prefix (at least 7 hex digits) is resolved to its version number."""
        if not isinstance(ref, str) or not ref:
            raise RegistryError(f"{ref!r}: name a definition, e.g. user_reading or "
                                "user_reading@v2")
        kind = None
        if ":" in ref:
            kind, ref = ref.split(":", 1)
            if kind not in KINDS:
                raise RegistryError(f"{kind}:{ref}: kind {kind!r} is unknown; use view:, "
                                    "source: or entity:")
        version = None
        if "@" in ref:
            ref, pin = ref.rsplit("@", 1)
            version = self._parse_pin(ref, kind, pin)
        name, _, feature = ref.partition(".")
        return kind, name, version, feature or None

    def _parse_pin(self, name, kind, pin):
        text = pin[1:] if pin[:1] in ("v", "V") else pin
        if text.isdigit() and len(text) < 7:
            return int(text)
        if len(pin) >= 7 and all(c in "0123456789abcdef" for c in pin.lower()):
            base = name.partition(".")[0]
            rows = self._conn.execute(
                "SELECT kind, version FROM versions WHERE name = ? AND hash LIKE ?"
                + (" AND kind = ?" if kind else ""),
                (base, pin.lower() + "%") + ((kind,) if kind else ())).fetchall()
            if len(rows) == 1:
                return rows[0]["version"]
            raise NotFound(f"{name}@{pin}: {'no' if not rows else 'several'} versions have "
                           "a hash starting so")
        raise RegistryError(f"{name}@{pin}: pin a version as {name}@v3 (or a hash prefix of "
                            "7+ hex digits)")

    def _kind_of(self, db, name, kind=None):
        kinds = [kind] if kind else KINDS
        found = [k for k in kinds if db.execute(
            "SELECT 1 FROM heads WHERE kind = ? AND name = ?", (k, name)).fetchone()]
        if not found:
            import difflib
            names = [r[0] for r in db.execute("SELECT DISTINCT name FROM heads")]
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see tally list"
            what = kind or "definition"
            raise NotFound(f"no {what} named {name!r} in the registry{hint}")
        if len(found) > 1 and kind is None:
            if "view" in found:
                return "view"
            raise RegistryError(f"{name!r} names a {' and a '.join(found)}; write "
                                f"{found[0]}:{name}")
        return found[0]

    def _info(self, db, kind, name, version):
        row = db.execute("SELECT * FROM versions WHERE kind = ? AND name = ? AND version = ?",
                         (kind, name, version)).fetchone()
        if row is None:
            raise NotFound(f"{kind} {name!r} has no version v{version}")
        return self._row_info(row)

    @staticmethod
    def _row_info(row):
        return VersionInfo(row["kind"], row["name"], row["version"], row["hash"], row["state"],
                           row["created_at"], row["created_by"], row["origin"],
                           from_document(json.loads(row["body"])), row["state_hash"])

    def resolve(self, ref, kind=None):
        """The VersionInfo ``ref`` names: ``name`` (current), ``name@v3``,
        ``kind:name``; a ``view.feature`` ref resolves to its view."""
        ref_kind, name, version, _ = self._parse_ref(ref)
        kind = kind or ref_kind
        with self._read() as db:
            kind = self._kind_of(db, name, kind)
            if version is None:
                current, candidate = self._head(db, kind, name)
                if current is None:
                    raise NotFound(f"{kind} {name!r} has no current version yet"
                                   + (f" (v{candidate} is deploying); pin it as "
                                      f"{name}@v{candidate}" if candidate else ""))
                version = current
            return self._info(db, kind, name, version)

    def get(self, ref, kind=None):
        """The definition ``ref`` names (a FeatureView, Source or Entity; a Feature
        for ``view.feature``)."""
        info = self.resolve(ref, kind)
        feature = self._parse_ref(ref)[3]
        if feature:
            try:
                return info.definition.feature(feature)
            except KeyError as error:
                raise NotFound(str(error.args[0])) from None
        return info.definition

    def versions(self, ref, kind=None):
        """Every version of a name, oldest first."""
        ref_kind, name, _, _ = self._parse_ref(ref)
        with self._read() as db:
            kind = self._kind_of(db, name, kind or ref_kind)
            rows = db.execute("SELECT * FROM versions WHERE kind = ? AND name = ? "
                              "ORDER BY version", (kind, name)).fetchall()
            return Results(self._row_info(r) for r in rows)

    def list(self, kind=None):
        """The current version of every name, plus pending candidates."""
        query = ("SELECT v.* FROM versions v JOIN heads h ON h.kind = v.kind AND "
                 "h.name = v.name AND (v.version = h.current OR v.version = h.candidate)")
        params = ()
        if kind:
            query += " WHERE v.kind = ?"
            params = (kind,)
        query += " ORDER BY CASE v.kind WHEN 'view' THEN 0 WHEN 'source' THEN 1 ELSE 2 END, " \
                 "v.name, v.version"
        return Results(self._row_info(r) for r in self._conn.execute(query, params))

    def current_definitions(self, kind):
        return [info.definition for info in self.list(kind) if info.state == CURRENT]

    def describe(self, ref, kind=None):
        info = self.resolve(ref, kind)
        history = self.versions(f"{info.kind}:{info.name}")
        candidate = next((v for v in history if v.state == CANDIDATE), None)
        return Description(info, tuple(history),
                           candidate if candidate and candidate.version != info.version
                           else None)

    def diff(self, ref_a, ref_b=None):
        """Differences from ``ref_a`` to ``ref_b``. With one ref: a pinned
        ``name@vN`` is compared with the version before it; a bare name compares
        the current version with the pending candidate, or else with the
        version before it."""
        a = self.resolve(ref_a)
        if ref_b is None:
            pinned = self._parse_ref(ref_a)[2] is not None
            versions = self.versions(f"{a.kind}:{a.name}")
            candidate = next((v for v in versions if v.state == CANDIDATE), None)
            if not pinned and candidate is not None:
                old, new = a, candidate
            else:
                earlier = [v for v in versions if v.version < a.version]
                if not earlier:
                    raise RegistryError(f"{a.kind} {a.ref} is the first version; name two "
                                        f"versions, e.g. tally diff {a.name}@v1 {a.name}@v2")
                old, new = earlier[-1], a
        else:
            old, new = a, self.resolve(ref_b)
            if old.kind != new.kind:
                raise RegistryError(f"cannot diff a {old.kind} with a {new.kind}")
        return Diff(old.kind, old, new, diff_specs(old.kind, old.definition.to_dict(),
                                                   new.definition.to_dict()))

    # discovery -----------------------------------------------------------------

    def search(self, text=None, tag=None, owner=None, entity=None, source=None, topic=None,
               kind=None):
        """Current (and candidate) definitions matching every given criterion:
        ``text`` (case-insensitive) in a name, feature name, description or tag; a
        tag; an owner; an entity, source or topic."""
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
        pattern = None
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
        for row in self._conn.execute(query, params):
            info = self._row_info(row)
            d = info.definition
            features = ()
            if text and isinstance(d, FeatureView):
                features = tuple(f.name for f in d.features if text.lower() in f.name.lower())
            hits.append(SearchHit(info.kind, info.name, info.version, info.state,
                                  getattr(d, "owner", ""), getattr(d, "tags", ()),
                                  getattr(d, "description", ""), features))
        return hits

    def lineage(self, ref):
        """Upstream lineage of a feature (``view.feature``) or of every feature
        of a view: feature -> view -> source -> topic -> fields."""
        info = self.resolve(ref)
        feature = self._parse_ref(ref)[3]
        if info.kind != "view":
            raise RegistryError(f"{info.kind} {info.name!r} is not a view; for the features "
                                f"that read it use readers(source={info.name!r}) "
                                f"(tally lineage --source {info.name})")
        rows = view_lineage(info.definition)
        if feature:
            rows = [r for r in rows if r["feature"] == feature]
            if not rows:
                raise NotFound(f"view {info.ref} has no feature {feature!r}; it has "
                               f"{', '.join(f.name for f in info.definition.features)}")
        view = info.definition
        return Lineage(LineageRow(view.name, info.version, info.state, r["feature"],
                                  view.source.name, view.source.topic, tuple(r["fields"]))
                       for r in rows)

    def readers(self, topic=None, source=None, field=None, all_versions=False):
        """Downstream lineage: the features that read a topic or source (and
        optionally one of its fields), in current and candidate versions (or
        every version with ``all_versions``)."""
        if topic is None and source is None:
            raise RegistryError("name a topic or a source, e.g. readers(topic='read_events')")
        where, params = [], []
        for column, value in (("topic", topic), ("source", source), ("field", field)):
            if value is not None:
                where.append(f"m.{column} = ?")
                params.append(value)
        # the features with a matching row, then all the fields they read
        query = ("SELECT v.name AS view, v.version, v.state, l.feature, l.source, l.topic, "
                 "l.field, l.role FROM lineage l JOIN versions v ON v.id = l.version_id")
        if not all_versions:
            query += (" JOIN heads h ON h.kind = v.kind AND h.name = v.name AND "
                      "(v.version = h.current OR v.version = h.candidate)")
        query += (" WHERE EXISTS (SELECT 1 FROM lineage m WHERE m.version_id = l.version_id "
                  "AND m.feature = l.feature AND " + " AND ".join(where) + ")"
                  " ORDER BY v.name, v.version, l.rowid")
        grouped = {}
        for row in self._conn.execute(query, params):
            key = (row["view"], row["version"], row["state"], row["feature"], row["source"],
                   row["topic"])
            grouped.setdefault(key, []).append((row["field"], row["role"]))
        return Lineage(LineageRow(*key, tuple(fields)) for key, fields in grouped.items())


def view_lineage(view):
    """Per feature of ``view``: the source fields it reads, with their roles."""
    from tally.core.filters import filter_columns
    result = []
    for feature in view.features:
        fields = []
        if feature.column:
            fields.append((feature.column, "value"))
        if feature.filter:
            fields += [(c, "filter") for c in sorted(filter_columns(feature.filter))
                       if c != feature.column]
        fields.append((view.key_column, "key"))
        fields.append((view.source.timestamp_field, "event_time"))
        seen, unique = set(), []
        for name, role in fields:
            if name not in seen:
                seen.add(name)
                unique.append((name, role))
        result.append({"feature": feature.name, "fields": unique})
    return result
