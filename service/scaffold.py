"""``tally init``: a new project's files.

``tally.toml`` with every setting commented out at its default
(``tally.service.config.template``), a ``definitions`` folder holding the
news-reading example, and a README stub saying how to run it. Nothing is
overwritten: if any of the files exists, none is written.
"""
import importlib.resources
import os

from tally.core.errors import UsageError
from tally.service import config

EXAMPLE = "reading.py"

README = """# {name}

A Tally feature store project. Settings are in `tally.toml` (flag >
`$TALLY_*` environment variable > `tally.toml` > built-in default); feature
definitions in `definitions/`.

```sh
tally dev &                                    # a local broker on 127.0.0.1:6650
tally create-topic read_events --partitions 4
tally apply definitions/{example}              # record the definitions in the registry
tally serve --registry .tally/registry.db      # compute them into the online store
tally get user_reading 42
```
"""


def init_project(directory):
    """Write the project files into ``directory`` (created if missing) and
    return their paths."""
    example = importlib.resources.files("tally.service.examples") / EXAMPLE
    files = {
        os.path.join(directory, config.PROJECT_FILE): config.template(),
        os.path.join(directory, "definitions", EXAMPLE): example.read_text(),
        os.path.join(directory, "README.md"): README.format(
            name=os.path.basename(os.path.abspath(directory)), example=EXAMPLE),
    }
    existing = [path for path in files if os.path.exists(path)]
    if existing:
        raise UsageError(f"refusing to overwrite {', '.join(existing)}")
    for path, text in files.items():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "x") as f:
            f.write(text)
    return list(files)
