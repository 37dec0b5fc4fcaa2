"""The registry: immutable, versioned feature definitions (see ``db``)."""
from tally.service.registry.db import (Conflict, NotFound, Registry, RegistryError, collect,
                                       default_path, diff_specs, load_file, view_lineage)

__all__ = ["Conflict", "NotFound", "Registry", "RegistryError", "collect", "default_path",
           "diff_specs", "load_file", "view_lineage"]
