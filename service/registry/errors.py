"""The registry's errors; every message says what went wrong and what to do."""
from tally.core.errors import TallyError


class RegistryError(TallyError, RuntimeError):
    """A registry operation failed; the message says why and what to do."""


class NotFound(RegistryError, KeyError):
    """No definition, version or feature has the name asked for."""

    def __str__(self):
        return self.args[0] if self.args else "not found"


class Conflict(RegistryError):
    """A compare-and-set (promote, mark_failed) lost against a concurrent change."""
