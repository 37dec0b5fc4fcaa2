"""Tally's exceptions: one root, and each error also the builtin it behaves as.

Every exception Tally raises on purpose derives from :class:`TallyError`, so
``except TallyError`` catches them all; each also subclasses the builtin that
describes it (a bad definition is a ``ValueError``, an unknown view a
``LookupError``), so callers need not import anything to handle them.
Service-side errors (registry, stores, Pulsar, bootstrap) derive from the
root in their own modules.
"""


class TallyError(Exception):
    """The root of every error Tally raises on purpose."""


class DefinitionError(TallyError, ValueError):
    """A definition is invalid; the message names the definition, the field and a fix."""


class FilterError(TallyError, ValueError):
    """A filter is not valid; the message says what and how to fix it."""


class RecordError(TallyError, ValueError):
    """A stored record does not match the layout or the view's schema."""


class SnapshotError(TallyError, ValueError):
    """A snapshot file is truncated, corrupt or of an unknown format."""


class TrainingSetError(TallyError, ValueError):
    """A spine, feature reference or source cannot be used; the message says why."""


class UsageError(TallyError, ValueError):
    """A command or request that cannot be carried out as given (a bad key, a
    missing argument); the message says what to give instead."""


class TrainingSetWarning(UserWarning):
    """A training set was built, but without some events; the message says which and why."""
