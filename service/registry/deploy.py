"""The deployment cycle (the contract with the streaming service)
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

How the code is laid out: this module is the state machine. Its functions
work inside the caller's write transaction (``db``, a ``BEGIN IMMEDIATE``
opened by :class:`~tally.service.registry.db.Registry`), keep the ``heads``
table (per name: the current and the candidate version) and the versions'
states in step, and log every state change. The :class:`Registry` methods
named above resolve names, open the transaction and call these.
"""
import datetime
import getpass
import os

from tally.core.definitions import state_hash
from tally.service.registry.errors import Conflict

CANDIDATE, CURRENT, RETIRED, CANCELLED, FAILED = (
    "candidate", "current", "retired", "cancelled", "failed")
IMMEDIATE, MANAGED = "immediate", "managed"


def now():
    """The time a version or change is stamped with: UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def default_actor():
    """Who a change is logged as, unless the caller names someone."""
    try:
        return os.environ.get("TALLY_USER") or getpass.getuser()
    except Exception:   # no login name in some containers
        return "unknown"


def deploy_state(db, kind, definition, mode, current):
    """The state a newly applied version of ``definition`` enters: a view in
    ``managed`` mode becomes a candidate, unless its computed state equals the
    ``current`` version's; everything else becomes current."""
    if mode != MANAGED or kind != "view":
        return CURRENT
    if current is not None:
        # only metadata changed: the state computed for the current version
        # is this version's state too, so there is nothing to catch up
        same = db.execute("SELECT state_hash FROM versions WHERE kind = ? AND "
                          "name = ? AND version = ?",
                          (kind, definition.name, current)).fetchone()
        if same["state_hash"] == state_hash(definition):
            return CURRENT
    return CANDIDATE


def head(db, kind, name):
    """(current, candidate) version numbers of a name; creates its empty head
    row when there is none."""
    row = db.execute("SELECT current, candidate FROM heads WHERE kind = ? AND name = ?",
                     (kind, name)).fetchone()
    if row is None:
        db.execute("INSERT INTO heads (kind, name) VALUES (?, ?)", (kind, name))
        return None, None
    return row["current"], row["candidate"]


def state_of(db, kind, name, version):
    row = db.execute("SELECT state FROM versions WHERE kind = ? AND name = ? AND "
                     "version = ?", (kind, name, version)).fetchone()
    return row["state"] if row else None


def _set_state(db, kind, name, version, state):
    db.execute("UPDATE versions SET state = ? WHERE kind = ? AND name = ? AND version = ?",
               (state, kind, name, version))


def cancel_candidate(db, kind, name, actor, reason):
    """Cancel the pending candidate, if any."""
    _, candidate = head(db, kind, name)
    if candidate is None:
        return
    _set_state(db, kind, name, candidate, CANCELLED)
    db.execute("UPDATE heads SET candidate = NULL WHERE kind = ? AND name = ?", (kind, name))
    log(db, kind, name, candidate, "cancelled", actor=actor, detail=reason)


def make_candidate(db, kind, name, version, actor):
    """Make ``version`` the candidate, cancelling another pending one."""
    current, candidate = head(db, kind, name)
    if candidate is not None and candidate != version:
        cancel_candidate(db, kind, name, actor, f"superseded by v{version}")
    _set_state(db, kind, name, version, CANDIDATE)
    db.execute("UPDATE heads SET candidate = ? WHERE kind = ? AND name = ?",
               (version, kind, name))
    log(db, kind, name, version, "candidate", from_version=current, actor=actor,
        detail="computing alongside the current version"
        if current is not None else "computing the first version")


def make_current(db, kind, name, version, event, actor, detail=None):
    """Make ``version`` current (logged as ``event``): the previous current
    version retires and another pending candidate is cancelled."""
    current, candidate = head(db, kind, name)
    if candidate is not None and candidate != version:
        cancel_candidate(db, kind, name, actor, f"v{version} became current")
    if current is not None and current != version:
        _set_state(db, kind, name, current, RETIRED)
        log(db, kind, name, current, "retired", actor=actor,
            detail=f"replaced by v{version}")
    _set_state(db, kind, name, version, CURRENT)
    db.execute("UPDATE heads SET current = ?, candidate = NULL WHERE kind = ? AND name = ?",
               (version, kind, name))
    log(db, kind, name, version, event, from_version=current, actor=actor, detail=detail)


def promote(db, kind, name, version, actor):
    """Compare-and-set: make candidate ``version`` current, or raise
    :class:`Conflict` if it is no longer the candidate."""
    _, candidate = head(db, kind, name)
    if candidate != version:
        state = state_of(db, kind, name, version)
        raise Conflict(f"{kind} {name}@v{version} is not the candidate (it is "
                       f"{state or 'unknown'}; the candidate is "
                       f"{'v' + str(candidate) if candidate else 'none'}); "
                       "re-read deployments() and act on the new candidate")
    make_current(db, kind, name, version, "promoted", actor, "caught up")


def mark_failed(db, kind, name, version, reason, actor=None):
    """Compare-and-set: candidate ``version`` failed; the current version keeps
    serving. Raises :class:`Conflict` if it is no longer the candidate."""
    _, candidate = head(db, kind, name)
    if candidate != version:
        raise Conflict(f"{kind} {name}@v{version} is not the candidate; nothing to "
                       "mark failed")
    _set_state(db, kind, name, version, FAILED)
    db.execute("UPDATE heads SET candidate = NULL WHERE kind = ? AND name = ?",
               (kind, name))
    log(db, kind, name, version, "failed", actor=actor, detail=reason)


def previous_current(db, kind, name, current):
    """The newest version older than ``current`` that has been current (what a
    rollback goes back to), or None."""
    return db.execute(
        "SELECT MAX(v.version) FROM versions v WHERE v.kind = ? AND v.name = ? AND "
        "v.version < ? AND EXISTS (SELECT 1 FROM changes c WHERE c.kind = v.kind "
        "AND c.name = v.name AND c.version = v.version AND c.event IN "
        "('promoted', 'rolled_back'))", (kind, name, current)).fetchone()[0]


def log(db, kind, name, version, event, from_version=None, detail=None, actor=None):
    """Append a change to the change log (its sequence number is the next one)."""
    db.execute("INSERT INTO changes (at, kind, name, version, event, from_version, detail, "
               "actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (now(), kind, name, version, event, from_version, detail,
                actor or default_actor()))
