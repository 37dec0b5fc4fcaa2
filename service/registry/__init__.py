"""The registry: immutable, versioned feature definitions.

* ``db``      - :class:`Registry`: the SQLite file, apply and plan, reads, rollback;
* ``deploy``  - the deployment cycle: version states, promotion, the change log;
* ``schema``  - the SQLite tables, as numbered migrations;
* ``results`` - what reads return, with their text and HTML forms;
* ``diff``    - differences between two versions' specs;
* ``files``   - loading definition files (``.py``, ``.sql``) and collecting them;
* ``search``  - the facets search matches and the search query;
* ``lineage`` - which source fields each feature reads, upstream and downstream;
* ``errors``  - :class:`RegistryError`, :class:`NotFound`, :class:`Conflict`.
"""
from tally.service.registry.db import Registry, default_path
from tally.service.registry.diff import diff_specs
from tally.service.registry.errors import Conflict, NotFound, RegistryError
from tally.service.registry.files import collect, load_file
from tally.service.registry.lineage import view_lineage

__all__ = ["Conflict", "NotFound", "Registry", "RegistryError", "collect", "default_path",
           "diff_specs", "load_file", "view_lineage"]
