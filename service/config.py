"""Every setting of Tally's commands, in one place, and the project file.

A setting's value is, in this order of precedence:

1. the command-line flag, where the command has one (``--pulsar``, ``--admin``,
   ``--store``, ``--registry``, ``--checkpoints``, ``--metrics``);
2. its environment variable (``TALLY_`` and the setting's name in capitals,
   dots as underscores: ``auth.token_file`` is ``$TALLY_AUTH_TOKEN_FILE``);
3. the project file, ``tally.toml``: the one named by ``tally --config PATH``,
   else by ``$TALLY_CONFIG``, else the first found walking up from the
   working directory;
4. the built-in default below.

Relative paths in ``tally.toml``, and the built-in default paths when a
project file is in use, are relative to the file's directory, so every
command run anywhere inside the project uses the same store, registry and
checkpoints. Every command reads settings through :func:`default` and
builds its one connection to the cluster with :func:`cluster`.
"""
import dataclasses
import os

from tally.core.errors import TallyError

try:
    import tomllib
except ModuleNotFoundError:                  # Python 3.10
    import tomli as tomllib

PROJECT_FILE = "tally.toml"


class ConfigError(TallyError, ValueError):
    """A project file that cannot be read, or a setting with a bad value."""


@dataclasses.dataclass(frozen=True)
class Setting:
    default: object
    help: str
    kind: str = "text"                       # "text", "path" (a file or directory), "bool"

    def variable(self, name):
        return "TALLY_" + name.upper().replace(".", "_")


# name -> Setting; a dotted name is a key of a table in tally.toml ([auth], [tls]):
# they come last, as tally init writes them (a plain key after a table would join it)
SETTINGS = {
    "pulsar": Setting("pulsar://127.0.0.1:6650",
                      "broker service URL (pulsar+ssl:// for TLS)"),
    "admin": Setting("http://127.0.0.1:8080", "the broker's admin REST URL (https:// for TLS)"),
    # a path, lmdb:///path or aerospike://host:port[,host:port]/namespace[?options]
    # (tally.service.store.open_store)
    "store": Setting(os.path.join(".tally", "store"), "online store path or URL", "path"),
    "registry": Setting(os.path.join(".tally", "registry.db"), "the registry", "path"),
    "checkpoints": Setting(os.path.join(".tally", "checkpoints"),
                           "checkpoint directory", "path"),
    "metrics": Setting("127.0.0.1:9464", "Prometheus endpoint of tally serve (HOST:PORT "
                       "or off)"),
    "subscription_prefix": Setting("tally", "first part of every subscription name "
                                   "(<prefix>.<view>.<state hash>): one per deployment "
                                   "sharing a cluster"),
    "log_format": Setting("text", "tally serve's log lines: text, or json (one object a "
                          "line, for log shippers)"),
    "auth.token": Setting(None, "the cluster's token (a JWT)"),
    "auth.token_file": Setting(None, "a file holding the cluster's token, re-read on "
                               "reconnect", "path"),
    "auth.oauth2_issuer_url": Setting(None, "OAuth2 issuer (client credentials flow)"),
    "auth.oauth2_credentials_file": Setting(None, "JSON file with client_id and "
                                            "client_secret", "path"),
    "auth.oauth2_audience": Setting(None, "OAuth2 audience"),
    "auth.oauth2_scope": Setting(None, "OAuth2 scope"),
    "tls.ca_file": Setting(None, "CA certificates that sign the brokers' (default: the "
                           "system's)", "path"),
    "tls.cert_file": Setting(None, "client certificate (mTLS; with no token or OAuth2 it "
                             "is the identity)", "path"),
    "tls.key_file": Setting(None, "the client certificate's private key", "path"),
    "tls.allow_insecure": Setting(False, "accept any broker certificate", "bool"),
    "tls.validate_hostname": Setting(True, "check the broker certificate's host name",
                                     "bool"),
    "tiered_storage.direct": Setting(True, "bootstraps read offloaded ledgers straight from "
                                           "object storage (false: through the broker)",
                                     "bool"),
    "tiered_storage.endpoint": Setting(None, "the object store's endpoint URL (default: the "
                                             "broker's offload policies)"),
    "tiered_storage.bucket": Setting(None, "the offload bucket (default: the broker's)"),
    "tiered_storage.region": Setting(None, "the offload region (default: the broker's)"),
    "tiered_storage.access_key": Setting(None, "object store access key (default: the "
                                               "platform's credential chain, e.g. "
                                               "AWS_ACCESS_KEY_ID)"),
    "tiered_storage.secret_key": Setting(None, "object store secret key"),
    "tiered_storage.mount": Setting(None, "a directory where the offload buckets are mounted "
                                          "as files (<mount>/<bucket>/<key>, e.g. Mountpoint "
                                          "for Amazon S3), read instead of the object store's "
                                          "API"),
}

LOOKUP_HOST = "127.0.0.1"
LOOKUP_PORT = 8255
LOOKUP_HTTP_PORT = 8256
CHECKPOINT_INTERVAL_S = 5.0
BATCH_SIZE = 1000

_chosen_file = None                          # tally --config PATH


def use_file(path):
    """Read settings from ``path`` (``tally --config``); None: look it up."""
    global _chosen_file
    _chosen_file = path


def project_file():
    """The tally.toml in use (absolute), or None."""
    path = _chosen_file or os.environ.get("TALLY_CONFIG")
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        return os.path.abspath(path)
    directory = os.getcwd()
    while True:
        candidate = os.path.join(directory, PROJECT_FILE)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def default(setting):
    """The value of ``setting`` when no flag gives one: its environment
    variable, else tally.toml, else the built-in default."""
    value = configured(setting)
    if value is not None:
        return value
    spec = SETTINGS[setting]
    path = project_file()
    if spec.kind == "path" and spec.default and path:
        return _resolved(spec.default, os.path.dirname(path))
    return spec.default


def configured(setting):
    """The value the environment or tally.toml gives ``setting``, else None
    (for options whose absence means something, like serve's --admin)."""
    spec = SETTINGS[setting]
    text = os.environ.get(spec.variable(setting))
    if text:
        return _from_text(setting, spec, text)
    path = project_file()
    return load(path).get(setting) if path else None


def describe(setting):
    """'$TALLY_STORE, tally.toml, else .tally/store': for --help texts."""
    spec = SETTINGS[setting]
    where = f"${spec.variable(setting)}, {PROJECT_FILE}"
    return f"{where}, else {spec.default}" if spec.default is not None else where


def cluster(pulsar=None, admin=None):
    """The one ``Cluster`` of a command: its URLs (flags first) and the
    authentication and TLS settings."""
    from tally.service.pulsar.cluster import Cluster, TieredStorage
    options = {"token": default("auth.token"), "token_file": default("auth.token_file"),
               **{f"oauth2_{name}": default(f"auth.oauth2_{name}")
                  for name in ("issuer_url", "credentials_file", "audience", "scope")},
               **{f"tls_{name}": default(f"tls.{name}")
                  for name in ("ca_file", "cert_file", "key_file", "allow_insecure",
                               "validate_hostname")}}
    tiered = TieredStorage(**{name: default(f"tiered_storage.{name}") for name in (
        "direct", "endpoint", "bucket", "region", "access_key", "secret_key", "mount")})
    return Cluster(service_url=pulsar or default("pulsar"), admin_url=admin,
                   tiered_storage=tiered, **options)


# -- tally.toml ---------------------------------------------------------------

_loaded = {}                                 # path -> (mtime, settings)


def load(path):
    """The settings ``path`` gives, by setting name, paths made absolute;
    unknown keys and wrong types are refused, naming the key and the file."""
    mtime = os.stat(path).st_mtime_ns
    cached = _loaded.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None
    settings = {}
    for name, value in _flattened(document):
        spec = SETTINGS.get(name)
        if spec is None:
            raise ConfigError(f"{path}: unknown setting {name!r} (known: "
                              f"{', '.join(SETTINGS)})")
        expected = bool if spec.kind == "bool" else str
        if not isinstance(value, expected):
            raise ConfigError(f"{path}: {name} must be a {expected.__name__}, not "
                              f"{value!r}")
        settings[name] = _resolved(value, os.path.dirname(path)) \
            if spec.kind == "path" else value
    _loaded[path] = (mtime, settings)
    return settings


def _flattened(document, prefix=""):
    for key, value in document.items():
        if isinstance(value, dict):
            yield from _flattened(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _resolved(path, base):
    """A relative file path against ``base``; a URL (lmdb://, aerospike://) as is."""
    if "://" in path:
        return path
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _from_text(name, spec, text):
    if spec.kind != "bool":
        return text
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"${spec.variable(name)}: {text!r} is not true or false")


def template():
    """tally.toml as ``tally init`` writes it: every setting, commented out,
    at its built-in default."""
    lines = [f"# Tally project settings. Precedence: flag > $TALLY_* environment variable > "
             f"this file > built-in default.",
             "# Relative paths are relative to this file's directory.", ""]
    table = None
    for name, spec in SETTINGS.items():
        section, _, key = name.rpartition(".")
        if section != (table or ""):
            table = section
            lines += ["", f"[{section}]"]
        value = spec.default
        shown = ("true" if value else "false") if spec.kind == "bool" else \
            '""' if value is None else f'"{value}"'
        lines += [f"# {spec.help} (${spec.variable(name)})", f"# {key} = {shown}"]
    return "\n".join(lines) + "\n"
