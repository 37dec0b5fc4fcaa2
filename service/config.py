"""Every default of Tally's commands, in one place.

A setting's value is, in order of precedence: the command-line flag, then
its environment variable, then the default below. Every command reads paths
and URLs through :func:`default`, so ``tally serve``, ``tally bootstrap``,
``tally get`` and the lookup server agree on which store, registry and
checkpoints they use.
"""
import os

# setting -> (environment variable, default)
SETTINGS = {
    "pulsar": ("TALLY_PULSAR", "pulsar://127.0.0.1:6650"),
    "admin": ("TALLY_ADMIN", "http://127.0.0.1:8080"),
    # a path, lmdb:///path or aerospike://host:port[,host:port]/namespace[?options]
    # (tally.service.store.open_store)
    "store": ("TALLY_STORE", os.path.join(".tally", "store")),
    "registry": ("TALLY_REGISTRY", os.path.join(".tally", "registry.db")),
    "checkpoints": ("TALLY_CHECKPOINTS", os.path.join(".tally", "checkpoints")),
    "metrics": ("TALLY_METRICS", "127.0.0.1:9464"),
    "token": ("TALLY_TOKEN", None),
    # the first part of every subscription name tally serve uses: one per
    # deployment sharing a cluster (tally.service.pulsar.topics.subscription_for)
    "subscription_prefix": ("TALLY_SUBSCRIPTION_PREFIX", "tally"),
    "log_format": ("TALLY_LOG_FORMAT", "text"),       # text, or json: one object a line
}

LOOKUP_HOST = "127.0.0.1"
LOOKUP_PORT = 8255
LOOKUP_HTTP_PORT = 8256
CHECKPOINT_INTERVAL_S = 5.0
BATCH_SIZE = 1000


def default(setting):
    """The value of ``setting`` when no flag gives one: its environment
    variable if set, else the built-in default."""
    variable, value = SETTINGS[setting]
    return os.environ.get(variable) or value


def describe(setting):
    """'$TALLY_STORE, else .tally/store': for --help texts."""
    variable, value = SETTINGS[setting]
    return f"${variable}, else {value}" if value else f"${variable}"
