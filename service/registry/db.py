"""The registry: immutable, versioned feature definitions in SQLite.

Every definition (entity, source, feature view) is stored once per distinct
content, identified by its content hash (:func:`tally.core.definitions.content_hash`)
and numbered v1, v2, ... per (kind, name) in apply order. Applying an
unchanged definition creates nothing. A name resolves to its *current*
version; ``name@v3`` pins one; rollback re-points the current version. How
versions become current is the deployment cycle (:mod:`.deploy`).

Concurrency: one SQLite file in WAL mode; every write is one ``BEGIN
IMMEDIATE`` transaction (writers queue on the lock, with a busy timeout), so
two processes applying at once serialise, and applying the same content
twice creates one version. Readers never block writers. (SQLite's locking
needs a local filesystem: do not put the file on NFS.)
"""
import dataclasses
import json
import os
import sqlite3
import time
from contextlib import contextmanager

from tally.core.definitions import (DefinitionError, canonical_document, canonical_json,
                                    content_hash, from_document, state_hash)
from tally.core.expressions import referenced
from tally.service import config
from tally.service.registry import deploy
from tally.service.registry.deploy import CANDIDATE, CURRENT, IMMEDIATE, MANAGED
from tally.service.registry.diff import diff_specs
from tally.service.registry.errors import NotFound, RegistryError
from tally.service.registry.files import collect
from tally.service.registry.lineage import feature_lineage, find_readers, index_rows
from tally.service.registry.results import (Change, Deployment, Description, Diff, Lineage,
                                            Plan, PlanItem, Results, VersionInfo)
from tally.service.registry.schema import MIGRATIONS, SCHEMA_VERSION
from tally.service.registry.search import KIND_ORDER, facets_of, find_definitions

KINDS = ("view", "service", "source", "entity")   # lookup order of a bare name


def default_path():
    """The registry file used when none is named: ``$TALLY_REGISTRY``, else
    ``.tally/registry.db``."""
    return config.default("registry")


class Registry:
    """Versioned definitions in one SQLite file (see the module docstring).

    ``Registry(path)``; the path defaults to ``$TALLY_REGISTRY`` or
    ``.tally/registry.db``. Usable as a context manager.

    The whole public API is this one class, the deployment cycle's methods
    (:meth:`promote`, :meth:`mark_failed`, :meth:`rollback`, :meth:`deployments`,
    :meth:`changes`) included: each resolves names, opens the transaction and
    calls the state machine in :mod:`.deploy`, whose functions act on that
    transaction."""

    def __init__(self, path=None, timeout=60.0):
        self.path = path or default_path()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        with self._sqlite_errors():
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._set_wal(timeout)
            self._check_integrity()
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._migrate()

    @contextmanager
    def _sqlite_errors(self):
        """SQLite's errors as one clear RegistryError (a corrupt file, a file
        that is no registry, a lock held too long), never a raw traceback."""
        try:
            yield
        except sqlite3.Error as error:
            raise RegistryError(f"{self.path}: {error}; if the registry is corrupt, restore "
                                "it from a backup (tally apply rebuilds one from the "
                                "definition files, without their history)") from None

    def _check_integrity(self):
        problems = [row[0] for row in self._conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise RegistryError(f"{self.path} is corrupt ({'; '.join(problems[:3])}); "
                                "restore it from a backup")

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
        with self._sqlite_errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self):
        with self._sqlite_errors():
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
            self._check_services(db, items)
            mode = self.deploy_mode
            return Plan(self._plan_item(db, kind, d, mode) for kind, d in items)

    def apply(self, definitions, origin=None, actor=None):
        """Store the definitions (new versions for changed content) and deploy
        them; returns the :class:`Plan` carried out. All or nothing."""
        items = collect(definitions, origin)
        actor = actor or deploy.default_actor()
        with self._write() as db:
            self._check_services(db, items)
            mode = self.deploy_mode
            plan = Plan()
            for kind, definition in items:
                item = self._plan_item(db, kind, definition, mode)
                self._execute(db, item, definition, origin, actor)
                plan.append(item)
            return plan

    def _check_services(self, db, items):
        """Every feature service, applied now or already current, must find its
        features in the views it will be served with: those applied with it,
        else the registry's (so a view change dropping a feature a service
        reads is refused, naming the service)."""
        views = {d.name: d for kind, d in items if kind == "view"}
        services = {d.name: d for kind, d in items if kind == "service"}
        if not services and not views:
            return
        for service in self._heads(db, "service"):
            services.setdefault(service.name, service)
        wanted = {v for s in services.values() for v in s.views if v not in views}
        for name in wanted:
            head = self._heads(db, "view", name)
            if head:
                views[name] = head[0]
        for service in services.values():
            try:
                service.validate(views)
            except DefinitionError as error:
                if service.name in {d.name for k, d in items if k == "service"}:
                    raise
                raise DefinitionError(f"{error} (the service is in the registry: apply "
                                      "the views with the features it reads, or a new "
                                      "version of the service without them)") from None

    def _heads(self, db, kind, name=None):
        """The current (else candidate) definitions of ``kind`` (one ``name``)."""
        query = ("SELECT v.body FROM versions v JOIN heads h ON h.kind = v.kind AND "
                 "h.name = v.name AND v.version = COALESCE(h.current, h.candidate) "
                 "WHERE v.kind = ?" + (" AND v.name = ?" if name else ""))
        rows = db.execute(query, (kind, name) if name else (kind,)).fetchall()
        return [from_document(json.loads(row["body"])) for row in rows]

    def _plan_item(self, db, kind, definition, mode):
        digest = content_hash(definition)
        head = db.execute("SELECT current, candidate FROM heads WHERE kind = ? AND name = ?",
                          (kind, definition.name)).fetchone()
        current = head["current"] if head else None
        candidate = head["candidate"] if head else None
        row = db.execute("SELECT version FROM versions WHERE kind = ? AND name = ? AND hash = ?",
                         (kind, definition.name, digest)).fetchone()
        deploy_as = deploy.deploy_state(db, kind, definition, mode, current)
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

    def _execute(self, db, item, definition, origin, actor):
        if item.action == "unchanged":
            return
        if item.action == "cancel-candidate":
            deploy.cancel_candidate(db, item.kind, item.name, actor,
                                    "the current content was applied again")
            return
        if item.action == "create":
            document = canonical_document(definition)
            cursor = db.execute(
                "INSERT INTO versions (kind, name, version, hash, state_hash, body, state, "
                "created_at, created_by, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.kind, item.name, item.version, item.hash,
                 state_hash(definition) if item.kind == "view" else None,
                 canonical_json(document), "new", deploy.now(), actor, origin))
            self._index(db, cursor.lastrowid, item.kind, definition)
            deploy.log(db, item.kind, item.name, item.version, "created", actor=actor,
                       detail=origin)
        if item.state == CANDIDATE:
            deploy.make_candidate(db, item.kind, item.name, item.version, actor)
        else:
            deploy.make_current(db, item.kind, item.name, item.version, "promoted", actor,
                                "applied" if item.action == "create" else "re-applied")

    def _index(self, db, version_id, kind, definition):
        """What search and lineage queries read about a new version."""
        if kind == "view":
            db.executemany("INSERT INTO lineage (version_id, view, feature, source, topic, "
                           "field, role) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           index_rows(version_id, definition))
        db.executemany("INSERT INTO facets (version_id, key, value) VALUES (?, ?, ?)",
                       [(version_id, k, v) for k, v in facets_of(kind, definition)])

    # the deployment cycle (the contract: see deploy) ---------------------------

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
            deploy.promote(db, kind, name, version, actor or deploy.default_actor())
            return self._info(db, kind, name, version)

    def mark_failed(self, name, version, reason, kind="view", actor=None):
        """The service could not compute candidate ``version``; the current
        version keeps serving."""
        with self._write() as db:
            deploy.mark_failed(db, kind, name, version, reason, actor)

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
            current, _ = deploy.head(db, kind, name)
            if current is None:
                raise RegistryError(f"{kind} {name!r} has no current version to roll back")
            if to is None:
                # the newest older version that has been current
                target = deploy.previous_current(db, kind, name, current)
                if target is None:
                    raise RegistryError(f"{kind} {name!r}: no version before v{current} has "
                                        "been current; there is nothing to roll back to "
                                        f"(pin one: tally rollback {name} --to vN)")
            else:
                target = self._version_number(db, kind, name, to)
            if target == current:
                raise RegistryError(f"{kind} {name}@v{target} is already current")
            deploy.make_current(db, kind, name, target, "rolled_back",
                                actor or deploy.default_actor(), f"rollback from v{current}")
            return self._info(db, kind, name, target)

    def rollback_target(self, ref):
        """The version a bare ``rollback(ref)`` would make current (the newest
        older version that has been current), or None: what a UI shows
        beside the history."""
        kind, name, _, _ = self._parse_ref(ref)
        with self._read() as db:
            kind = self._kind_of(db, name, kind)
            current = db.execute("SELECT current FROM heads WHERE kind = ? AND name = ?",
                                 (kind, name)).fetchone()["current"]
            if current is None:
                return None
            return deploy.previous_current(db, kind, name, current)

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
        return VersionInfo.from_row(row)

    def resolve(self, ref, kind=None):
        """The VersionInfo ``ref`` names: ``name`` (current), ``name@v3``,
        ``kind:name``; a ``view.feature`` ref resolves to its view."""
        ref_kind, name, version, _ = self._parse_ref(ref)
        kind = kind or ref_kind
        with self._read() as db:
            kind = self._kind_of(db, name, kind)
            if version is None:
                current, candidate = deploy.head(db, kind, name)
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
            return Results(VersionInfo.from_row(r) for r in rows)

    def list(self, kind=None):
        """The current version of every name, plus pending candidates."""
        query = ("SELECT v.* FROM versions v JOIN heads h ON h.kind = v.kind AND "
                 "h.name = v.name AND (v.version = h.current OR v.version = h.candidate)")
        params = ()
        if kind:
            query += " WHERE v.kind = ?"
            params = (kind,)
        query += f" ORDER BY {KIND_ORDER}, v.name, v.version"
        return Results(VersionInfo.from_row(r) for r in self._conn.execute(query, params))

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
               kind=None, view=None):
        """Current (and candidate) definitions matching every given criterion:
        ``text`` (case-insensitive) in a name, feature name, description or tag; a
        tag; an owner; an entity, source or topic; ``view``: the feature
        services reading that view."""
        return find_definitions(self._conn, text, tag=tag, owner=owner, entity=entity,
                                source=source, topic=topic, kind=kind, view=view)

    def lineage(self, ref):
        """Upstream lineage of a feature (``view.feature``), of every feature
        of a view, or of every feature a feature service reads: feature ->
        view -> source -> topic -> fields."""
        info = self.resolve(ref)
        feature = self._parse_ref(ref)[3]
        if info.kind == "service":
            return self._service_lineage(info.definition)
        if info.kind != "view":
            raise RegistryError(f"{info.kind} {info.name!r} is not a view; for the features "
                                f"that read it use readers(source={info.name!r}) "
                                f"(tally lineage --source {info.name})")
        return feature_lineage(info, feature)

    def _service_lineage(self, service):
        """The lineage of each feature a service reads, then of each of its
        request-time columns: what the features it names read."""
        by_ref = {f"{f.view}.{f.feature}": list(feature_lineage(self.resolve(f.view, "view"),
                                                                f.feature))
                  for f in service.features}
        rows = [row for f in service.features for row in by_ref[f"{f.view}.{f.feature}"]]
        for entry in service.computed:
            names = referenced(entry.expression) if entry.kind == "expression" else entry.inputs
            rows += [dataclasses.replace(row, feature=entry.name)
                     for name in names for row in by_ref.get(name, ())]
        return Lineage(rows)

    def readers(self, topic=None, source=None, field=None, all_versions=False):
        """Downstream lineage: the features that read a topic or source (and
        optionally one of its fields), in current and candidate versions (or
        every version with ``all_versions``)."""
        if topic is None and source is None:
            raise RegistryError("name a topic or a source, e.g. readers(topic='read_events')")
        return find_readers(self._conn, topic, source, field, all_versions)
