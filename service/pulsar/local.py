"""A real Apache Pulsar standalone broker on loopback, for tests and `tally dev`.

The broker is the official server distribution, fetched from Maven Central with
the machine's own Maven (`pulsar-server-distribution:<v>:tar.gz:bin`) and cached
once per user. It runs in its own JVM with a config file and a log4j2 file
written by this module, so what the broker does is decided here and not by
whatever lies in the distribution's `conf/`.

Needs Java 17+ (`java` on PATH or JAVA_HOME) and Maven (`mvn`) the first time.

    with LocalPulsar() as pulsar:
        pulsar.create_partitioned_topic("read_events", 4)
        client = pulsar_client.Client(pulsar.service_url)

Importing this module has no side effects.

With `tiered_storage` the broker offloads ledgers to a tier: by default
an S3 bucket served on loopback by s3proxy (`LocalS3`, started and stopped
with the broker), or a directory (the filesystem offloader).

Long because a broker's whole life is here: configuration, ports,
the JVM and its watchdog, readiness, stop, and ``tally dev``.
"""
from __future__ import annotations

import atexit
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from xml.sax.saxutils import escape as xml_escape

from tally.service.pulsar.admin import Admin, PulsarAdminError
from tally.service.pulsar.cluster import Cluster, TieredStorage
from tally.service.pulsar.distribution import (PulsarStartError, cache_dir_for_version,
                                               ensure_distribution, ensure_offloader,
                                               ensure_s3proxy, filesystem_offload_config,
                                               s3_offload_config, s3_offloader_jvm_options)
from tally.service.pulsar.security import Credentials, broker_security_config, make_credentials

LOOPBACK = "127.0.0.1"
DEFAULT_BROKER_PORT = 6650
DEFAULT_WEB_PORT = 8080
STOP_GRACE_SECONDS = 30.0
PORT_CONFLICT_ATTEMPTS = 3
LOG_TAIL_LINES = 60
LOG_LINE_MAX_CHARS = 1000
MAX_MESSAGE_BYTES = 5 * 1024 * 1024          # the broker's default maxMessageSize


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

# Ports this process already handed out: the kernel may offer a just-closed
# port again, and two brokers started side by side must not both take it.
_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_loopback_ports(count: int) -> list[int]:
    """Distinct loopback TCP ports that are free right now."""
    with _ports_lock:
        sockets: list[socket.socket] = []
        try:
            while len(sockets) < count:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((LOOPBACK, 0))
                if sock.getsockname()[1] in _handed_out_ports:
                    sock.close()
                    continue
                sockets.append(sock)  # kept open so the next bind gets another port
            ports = [sock.getsockname()[1] for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
        _handed_out_ports.update(ports)
        return ports


def is_port_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        # Like the broker's own listeners: a port whose old connections linger
        # in TIME_WAIT (e.g. after the last dev run) is still usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------
# Broker configuration
# --------------------------------------------------------------------------

def broker_config(
    broker_port: int,
    web_port: int,
    max_entries_per_ledger: int,
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The standalone.conf keys, as strings. `extra_config` wins over everything."""
    config: dict[str, Any] = {
        "clusterName": "standalone",
        # Network: loopback only, and tell clients the same address we bind.
        "bindAddress": LOOPBACK,
        "bindAddresses": "",
        "advertisedAddress": LOOPBACK,
        "brokerServicePort": broker_port,
        "webServicePort": web_port,
        # Empty -> the starter keeps metadata in RocksDB under --metadata-dir;
        # a value here would make it parse a ZooKeeper port out of it.
        "metadataStoreUrl": "",
        "configurationMetadataStoreUrl": "",
        # This same file is read as the bookie's ServerConfiguration too. The
        # bookie advertises advertisedAddress (127.0.0.1), and BookKeeper
        # refuses a loopback address unless allowLoopback is set.
        "allowLoopback": True,
        # Without this the bookie ignores --bookkeeper-port and picks a random
        # port of its own (BKCluster.newServerConfiguration).
        "allowEphemeralPorts": True,
        # The bookie has no bind address key: it listens on 0.0.0.0 unless
        # given the loopback interface by name.
        "listeningInterface": loopback_interface_name(),
        "journalSyncData": False,  # test data: no fsync per entry
        "journalMaxGroupWaitMSec": 1,
        "ledgerStorageClass": "org.apache.bookkeeper.bookie.storage.ldb.DbLedgerStorage",
        # Small bookie caches for a 2-core CI box; when left empty the
        # standalone sizes each to a quarter of half the direct memory.
        "dbStorage_writeCacheMaxSizeMb": 32,
        "dbStorage_readAheadCacheMaxSizeMb": 32,
        "dbStorage_rocksDB_blockCacheSize": 16 * 1024 * 1024,
        "dbStorage_rocksDB_writeBufferSizeMB": 4,
        "dbStorage_rocksDB_sstSizeInMB": 4,
        # CI disks are often >95% full, which flips the bookie to read-only.
        "diskUsageThreshold": 0.99,
        "diskUsageWarnThreshold": 0.99,
        # One bookie.
        "managedLedgerDefaultEnsembleSize": 1,
        "managedLedgerDefaultWriteQuorum": 1,
        "managedLedgerDefaultAckQuorum": 1,
        # Ledger rollover by entry count only, so tests get many small ledgers.
        "managedLedgerMaxEntriesPerLedger": max_entries_per_ledger,
        "managedLedgerMinLedgerRolloverTimeMinutes": 0,
        # The topic is the immutable log: keep everything, never drop topics.
        "defaultRetentionTimeInMinutes": -1,
        "defaultRetentionSizeInMB": -1,
        "brokerDeleteInactiveTopicsEnabled": False,
        # A single broker: nothing to balance, no extra services.
        "loadManagerClassName": "org.apache.pulsar.broker.loadbalance.NoopLoadManager",
        "loadBalancerEnabled": False,
        "functionsWorkerEnabled": False,
        "webSocketServiceEnabled": False,
        "transactionCoordinatorEnabled": False,
        # One limit for both sides, as the stock standalone.conf has it: a
        # bookie frame smaller than the broker's largest message made the
        # broker roll ledgers for ever on one message near the limit.
        "maxMessageSize": MAX_MESSAGE_BYTES,
        "nettyMaxFrameSizeBytes": MAX_MESSAGE_BYTES + 10 * 1024,
        "allowAutoTopicCreation": True,
        "allowAutoTopicCreationType": "non-partitioned",
        # Default is ./offloaders style paths relative to the broker's cwd
        # (the data dir); keep NAR unpacking per broker too.
        "narExtractionDirectory": "nar",
    }
    config.update(extra_config or {})
    return {key: _config_value(value) for key, value in config.items()}


def loopback_interface_name() -> str:
    """'lo' on Linux, 'lo0' on macOS."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in names if name.startswith("lo")), "lo")


def _config_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


def render_properties(config: Mapping[str, str]) -> str:
    lines = ["# Written by tally.service.pulsar.local; rewritten on every start."]
    for key, value in config.items():
        lines.append(f"{key}={_escape_property_value(value)}")
    return "\n".join(lines) + "\n"


def _escape_property_value(value: str) -> str:
    # java.util.Properties reads ISO-8859-1: anything outside ASCII (a path
    # under a non-English home dir, say) must be written as \uXXXX units.
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    if value.isascii():
        return value
    units = value.encode("utf-16-be")
    return "".join(
        chr(code) if code < 128 else f"\\u{code:04x}"
        for code in (int.from_bytes(units[i:i + 2], "big") for i in range(0, len(units), 2))
    )


def render_log4j2(log_file: Path) -> str:
    # shutdownHook="disable": the broker's own shutdown hook logs while it
    # closes; log4j must not stop first (bin/pulsar does the same).
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN" shutdownHook="disable">
  <Appenders>
    <File name="file" fileName="{xml_escape(str(log_file))}" append="true" immediateFlush="true">
      <PatternLayout pattern="%d{{ISO8601}} %-5level [%t] %c{{1.}} - %msg%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="org.apache.pulsar" level="info"/>
    <Root level="warn"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


def log_tail(paths: Sequence[Path], lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` of each file that exists, under a heading naming it."""
    parts = []
    for path in paths:
        if path.is_file():
            # Cut long lines: "messaging service is ready" dumps the whole config.
            text = [line[:LOG_LINE_MAX_CHARS]
                    for line in path.read_text(errors="replace").splitlines()[-lines:]]
            if text:
                parts.append(f"--- tail of {path} ---\n" + "\n".join(text))
    return "\n".join(parts)


def java_executable() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise PulsarStartError("Java 17+ is needed to run Pulsar; no `java` on PATH")
    return java


def class_data_archive_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the broker's class archive lives; one per JDK build, next to the jars."""
    java = Path(java_executable()).resolve()
    stat = java.stat()
    jdk_identity = f"{java}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(jdk_identity.encode()).hexdigest()[:16]
    return cache_dir_for_version(cache_dir) / "class-archives" / f"broker-{digest}.jsa"


def jvm_options(heap: str, direct_memory: str, log4j2_file: Path) -> list[str]:
    """The flags bin/pulsar passes, minus GC logs and the functions settings."""
    return [
        f"-Xms{heap}", f"-Xmx{heap}", f"-XX:MaxDirectMemorySize={direct_memory}",
        "-XX:+PerfDisableSharedMem",  # no hsperfdata files in /tmp
        f"-Dlog4j2.configurationFile={log4j2_file}",
        "-Dlog4j.shutdownHookEnabled=false",
        "-Dlog4j2.is.webapp=false",
        "-Djava.net.preferIPv4Stack=true",
        "-Dio.netty.tryReflectionSetAccessible=true",
        "-Dorg.apache.pulsar.shade.io.netty.tryReflectionSetAccessible=true",
        "-Dio.netty.recycler.maxCapacityPerThread=4096",
        "-Dpulsar.allocator.exit_on_oom=true",
        "--add-opens", "java.base/java.io=ALL-UNNAMED",
        "--add-opens", "java.base/java.util.zip=ALL-UNNAMED",
        "--add-opens", "java.management/sun.management=ALL-UNNAMED",
        "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
        "--add-opens", "java.base/java.nio=ALL-UNNAMED",
        "--add-opens", "java.base/jdk.internal.misc=ALL-UNNAMED",
        "--add-opens", "java.base/jdk.internal.platform=ALL-UNNAMED",
        "-Dbookkeeper.metadata.bookie.drivers="
        "org.apache.pulsar.metadata.bookkeeper.PulsarMetadataBookieDriver",
        "-Dbookkeeper.metadata.client.drivers="
        "org.apache.pulsar.metadata.bookkeeper.PulsarMetadataClientDriver",
    ]


# The JVM is started through this small Python watchdog. If the Python process
# that started the broker dies without running atexit (SIGKILL, OOM killer),
# the watchdog's stdin pipe closes: it stops the JVM and removes the temporary
# data dir, so no broker is ever orphaned. A SIGTERM sent to the process group
# reaches the JVM directly; the watchdog then just waits for the JVM and exits
# with its status. argv: <dir to remove if orphaned, or ""> <java command...>
_WATCHDOG_SOURCE = r"""
import os, shutil, signal, subprocess, sys, threading
orphan_cleanup_dir, command = sys.argv[1], sys.argv[2:]
java = subprocess.Popen(command, stdin=subprocess.DEVNULL)
signal.signal(signal.SIGTERM, lambda *_: None)
signal.signal(signal.SIGINT, lambda *_: None)
parent_gone = threading.Event()
def stop_java_when_parent_is_gone():
    while os.read(0, 4096):  # raw fd: a buffered stdin would break interpreter exit
        pass
    parent_gone.set()
    java.terminate()
    try:
        java.wait(30)
    except subprocess.TimeoutExpired:
        java.kill()
threading.Thread(target=stop_java_when_parent_is_gone, daemon=True).start()
status = java.wait()
if parent_gone.is_set() and orphan_cleanup_dir:
    shutil.rmtree(orphan_cleanup_dir, ignore_errors=True)
os._exit(status if status >= 0 else 128 - status)  # shell convention for signals
"""


# --------------------------------------------------------------------------
# The S3 tier: s3proxy on loopback
# --------------------------------------------------------------------------

S3_BUCKET = "tally-offload"
S3_REGION = "us-east-1"
S3_ACCESS_KEY = "tally"
S3_SECRET_KEY = "tally-secret"
S3_STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class S3Location:
    """An S3 bucket and how to reach it: where the broker's S3 offloader
    writes, and what a reader of the offloaded ledgers needs."""

    endpoint: str                      # http://127.0.0.1:<port>
    bucket: str
    region: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """The AWS SDK's environment variables for these credentials."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


def s3proxy_properties(port: int, blob_dir: Path) -> dict[str, str]:
    """s3proxy's configuration: one endpoint on loopback, the fixed
    credentials (AWS signatures v2 and v4), blobs as files under `blob_dir`."""
    return {
        "s3proxy.endpoint": f"http://{LOOPBACK}:{port}",
        "s3proxy.authorization": "aws-v2-or-v4",
        "s3proxy.identity": S3_ACCESS_KEY,
        "s3proxy.credential": S3_SECRET_KEY,
        # The jclouds backend: a bucket is a directory, an object a file in it.
        "jclouds.provider": "filesystem",
        "jclouds.filesystem.basedir": str(blob_dir),
        # The filesystem backend checks no credentials, but jclouds wants some.
        "jclouds.identity": "local",
        "jclouds.credential": "local",
    }


class LocalS3:
    """s3proxy on 127.0.0.1 serving one bucket from `<data_dir>/blobs/<bucket>`.

        with LocalS3() as s3:
            s3.location.endpoint     # http://127.0.0.1:<port>

    A `data_dir` given by the caller is kept; otherwise a temporary one is
    made and removed by `stop()`. Like the broker, the JVM runs under the
    watchdog, so it never outlives the Python process that started it.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, bucket: str = S3_BUCKET,
                 port: int | None = None, cache_dir: str | os.PathLike | None = None,
                 heap: str = "128m"):
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.bucket = bucket
        self.port = port
        self.cache_dir = cache_dir
        self.heap = heap
        self._owns_data_dir = data_dir is None
        self._process: subprocess.Popen | None = None

    @property
    def location(self) -> S3Location:
        if self.port is None:
            raise RuntimeError("a LocalS3 has no port before start()")
        return S3Location(f"http://{LOOPBACK}:{self.port}", self.bucket, S3_REGION,
                          S3_ACCESS_KEY, S3_SECRET_KEY)

    @property
    def pid(self) -> int | None:
        """The s3proxy watchdog process (the JVM is its child), if running."""
        return self._process.pid if self._process is not None else None

    @property
    def blob_dir(self) -> Path:
        """The backend's base directory: the bucket is a directory in it."""
        return self._require_data_dir() / "blobs"

    @property
    def log_file(self) -> Path:
        return self._require_data_dir() / "s3proxy.log"

    def _require_data_dir(self) -> Path:
        if self.data_dir is None:
            raise RuntimeError("LocalS3 has no data directory before start()")
        return self.data_dir

    def start(self, timeout: float = 60) -> "LocalS3":
        """Launch s3proxy and wait until it answers HTTP."""
        if self._process is not None:
            raise RuntimeError("this LocalS3 is already started")
        jar = ensure_s3proxy(self.cache_dir)
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="tally-s3-"))
        # Creating the bucket: the filesystem backend lists its directories as buckets.
        (self.blob_dir / self.bucket).mkdir(parents=True, exist_ok=True)
        picked_port = self.port is None
        for attempt in range(1, PORT_CONFLICT_ATTEMPTS + 1):
            if picked_port:
                self.port = free_loopback_ports(1)[0]
            try:
                self._launch(jar)
                self._wait_until_ready(time.monotonic() + timeout)
                return self
            except BaseException as error:
                self._stop_process()
                # Someone may take the picked port before the JVM binds it: pick again.
                if attempt == PORT_CONFLICT_ATTEMPTS or not picked_port \
                        or "Address already in use" not in str(error):
                    self.stop()
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the JVM (SIGTERM, then SIGKILL); remove a data dir of its own. Idempotent."""
        self._stop_process()
        if self._owns_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _terminate_process_group(process, S3_STOP_GRACE_SECONDS)

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _launch(self, jar: Path) -> None:
        properties = self._require_data_dir() / "s3proxy.properties"
        properties.write_text(render_properties(s3proxy_properties(self.port, self.blob_dir)),
                              encoding="ascii")
        java_command = [java_executable(), f"-Xmx{self.heap}", "-XX:+PerfDisableSharedMem",
                        "-jar", str(jar), "--properties", str(properties)]
        with open(self.log_file, "ab") as console:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG_SOURCE,
                 str(self.data_dir) if self._owns_data_dir else "", *java_command],
                stdin=subprocess.PIPE, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True)

    def _wait_until_ready(self, deadline: float) -> None:
        while True:
            if self._process is None or self._process.poll() is not None:
                raise PulsarStartError("s3proxy exited during startup\n" + self._log_tail())
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise PulsarStartError("s3proxy did not answer in time\n" + self._log_tail())
            time.sleep(0.1)

    def _answers(self) -> bool:
        # Any HTTP answer will do: unsigned, s3proxy says 403 AccessDenied.
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def _log_tail(self) -> str:
        return log_tail([self.log_file])


# --------------------------------------------------------------------------
# The broker process
# --------------------------------------------------------------------------

_running_brokers: set["LocalPulsar"] = set()
_atexit_registered = False


def _stop_all_brokers() -> None:
    for broker in list(_running_brokers):
        broker.stop()


def _register_atexit_once() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_stop_all_brokers)
        _atexit_registered = True


class LocalPulsar:
    """One Pulsar standalone JVM (broker + one bookie, RocksDB metadata) on 127.0.0.1.

    Ports left as None are picked free at start. A `data_dir` given by the
    caller is kept (and reused on the next start); otherwise a temporary one
    is created and removed by `stop()`. `extra_config` takes any broker.conf
    or bookkeeper.conf key and overrides the defaults in `broker_config`.
    `max_entries_per_ledger` is the rollover size (entries = producer batches).
    `class_data_sharing=False` skips the cached class archive (see below).
    `tiered_storage="s3"` (or True) adds the S3 offloader (jcloud, driver
    aws-s3), writing to a bucket of a `LocalS3` under `<data_dir>/s3` that
    starts and stops with the broker (`object_store` says how to reach it);
    `tiered_storage="filesystem"` the filesystem offloader, writing into
    `offload_dir`. Either way BookKeeper copies are dropped once offloaded
    (see `offload`).
    `secure=True` makes the broker demand what a production cluster may: TLS
    only (a CA and certificates made at start), a trusted client certificate,
    and a token (`tally.service.pulsar.security`); `cluster` then carries the
    super-user's credentials, and `credentials` makes other tokens.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        max_entries_per_ledger: int = 50000,
        extra_config: Mapping[str, Any] | None = None,
        heap: str = "512m",
        direct_memory: str = "1g",
        broker_port: int | None = None,
        web_port: int | None = None,
        bookie_port: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        extra_jvm_options: Sequence[str] = (),
        class_data_sharing: bool = True,
        tiered_storage: bool | str = False,
        secure: bool = False,
    ):
        self.tiered_storage = _tier_name(tiered_storage)
        self.s3: LocalS3 | None = None
        self.secure = secure
        self.credentials: Credentials | None = None
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.max_entries_per_ledger = max_entries_per_ledger
        self.extra_config = dict(extra_config or {})
        self.heap = heap
        self.direct_memory = direct_memory
        self.broker_port = broker_port
        self.web_port = web_port
        self.bookie_port = bookie_port
        self.cache_dir = cache_dir
        self.extra_jvm_options = list(extra_jvm_options)
        self.class_data_sharing = class_data_sharing
        self._class_archive_being_written: Path | None = None
        self.startup_seconds: float | None = None
        self._owns_data_dir = data_dir is None
        self._process: subprocess.Popen | None = None

    # -- addresses -----------------------------------------------------------

    @property
    def service_url(self) -> str:
        return f"pulsar{'+ssl' if self.secure else ''}://{LOOPBACK}:{self.broker_port}"

    @property
    def admin_url(self) -> str:
        return f"http{'s' if self.secure else ''}://{LOOPBACK}:{self.web_port}"

    @property
    def cluster(self) -> Cluster:
        """How to reach this broker: its URLs, the S3 tier's credentials
        (its endpoint and bucket come from the broker's offload policies)
        and, when secure, the super-user's token, the CA and the client
        certificate."""
        tiered = TieredStorage()
        if self.s3 is not None:
            tiered = TieredStorage(access_key=self.object_store.access_key,
                                   secret_key=self.object_store.secret_key)
        if not self.secure:
            return Cluster(self.service_url, self.admin_url, tiered_storage=tiered)
        if self.credentials is None:
            raise RuntimeError("a secure LocalPulsar has no credentials before start()")
        return Cluster(self.service_url, self.admin_url, token=self.credentials.token(),
                       tiered_storage=tiered,
                       tls_ca_file=str(self.credentials.ca_file),
                       tls_cert_file=str(self.credentials.cert_file("client")),
                       tls_key_file=str(self.credentials.key_file("client")))

    @property
    def log_file(self) -> Path:
        return self._require_data_dir() / "broker.log"

    @property
    def pid(self) -> int | None:
        """The broker's watchdog process (the JVM is its child), if running."""
        return self._process.pid if self._process is not None else None

    @property
    def offload_dir(self) -> Path:
        """Where the filesystem offloader writes (with `tiered_storage="filesystem"`)."""
        return self._require_data_dir() / "offloaded"

    @property
    def object_store(self) -> S3Location:
        """The bucket the S3 offloader writes to (with `tiered_storage="s3"`)."""
        if self.s3 is None:
            raise RuntimeError("this LocalPulsar has no S3 tier running")
        return self.s3.location

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 120) -> "LocalPulsar":
        """Launch the JVM and wait until `public/default` exists.

        `timeout` covers the JVM only, not a first-time fetch of the
        distribution (or of the tier's offloader and s3proxy), nor s3proxy's
        own start. Raises PulsarStartError with the log tail on failure.
        """
        if self._process is not None:
            raise RuntimeError("this LocalPulsar is already started")
        distribution = ensure_distribution(self.cache_dir)
        requested_ports = (self.broker_port, self.web_port, self.bookie_port)
        for attempt in range(1, PORT_CONFLICT_ATTEMPTS + 1):
            try:
                return self._start_once(distribution, timeout)
            except PulsarStartError as error:
                # A port we picked can be taken by someone else before the JVM
                # binds it (another test's client connection, say): pick again.
                picked_some = None in requested_ports
                if attempt == PORT_CONFLICT_ATTEMPTS or not picked_some \
                        or "Address already in use" not in str(error):
                    raise
                self.broker_port, self.web_port, self.bookie_port = requested_ports
        raise AssertionError("unreachable")

    def _start_once(self, distribution: Path, timeout: float) -> "LocalPulsar":
        self._prepare_data_dir()
        self._pick_ports()
        try:
            if self.tiered_storage == "s3":
                self.s3 = LocalS3(self._require_data_dir() / "s3", cache_dir=self.cache_dir)
                self.s3.start()
            conf_file, log4j2_file = self._write_config_files()
            began = time.monotonic()
            self._launch(distribution, conf_file, log4j2_file)
            _running_brokers.add(self)
            _register_atexit_once()
            self._wait_until_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop the JVM (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        process, self._process = self._process, None
        _running_brokers.discard(self)
        if process is not None:
            graceful = _terminate_process_group(process, STOP_GRACE_SECONDS)
            self._settle_class_archive(keep=graceful)
        # After the broker: it may be offloading until it stops.
        s3, self.s3 = self.s3, None
        if s3 is not None:
            s3.stop()
        if self._owns_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> "LocalPulsar":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _require_data_dir(self) -> Path:
        if self.data_dir is None:
            raise RuntimeError("LocalPulsar has no data directory before start()")
        return self.data_dir

    def _prepare_data_dir(self) -> None:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="tally-pulsar-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _pick_ports(self) -> None:
        # A reused data dir keeps its first bookie port: the starter reads it
        # back from the bookie cookie and ignores --bookkeeper-port.
        self.bookie_port = bookie_port_from_cookie(self._require_data_dir()) or self.bookie_port
        missing = [name for name in ("broker_port", "web_port", "bookie_port")
                   if getattr(self, name) is None]
        for name, port in zip(missing, free_loopback_ports(len(missing))):
            setattr(self, name, port)

    def _write_config_files(self) -> tuple[Path, Path]:
        conf_dir = self._require_data_dir() / "conf"
        conf_dir.mkdir(exist_ok=True)
        extra = dict(self.extra_config)
        if self.tiered_storage == "filesystem":
            offloaders = ensure_offloader("filesystem", self.cache_dir)
            extra = {**filesystem_offload_config(self.offload_dir, offloaders), **extra}
        elif self.tiered_storage == "s3":
            offloaders = ensure_offloader("aws-s3", self.cache_dir)
            extra = {**s3_offload_config(self.object_store, offloaders), **extra}
        if self.secure:
            self.credentials = make_credentials(self._require_data_dir() / "security")
            extra = {**broker_security_config(self.credentials, self.broker_port,
                                              self.web_port), **extra}
        config = broker_config(self.broker_port, self.web_port,
                               self.max_entries_per_ledger, extra)
        conf_file = conf_dir / "standalone.conf"
        conf_file.write_text(render_properties(config), encoding="ascii")
        log4j2_file = conf_dir / "log4j2.xml"
        log4j2_file.write_text(render_log4j2(self.log_file), encoding="utf-8")
        return conf_file, log4j2_file

    def _launch(self, distribution: Path, conf_file: Path, log4j2_file: Path) -> None:
        data_dir = self._require_data_dir()
        java_command = [
            java_executable(), "-cp", str(distribution / "lib" / "*"),
            *jvm_options(self.heap, self.direct_memory, log4j2_file),
            *self._class_data_sharing_options(),
            *(s3_offloader_jvm_options(self.object_store) if self.s3 else []),
            *self.extra_jvm_options,
            "org.apache.pulsar.PulsarStandaloneStarter",
            "--config", str(conf_file),
            "--no-functions-worker",  # else it loads conf/functions_worker.yml
            "--no-stream-storage",
            "--metadata-dir", str(data_dir / "metadata"),
            "--bookkeeper-dir", str(data_dir / "bookkeeper"),
            "--bookkeeper-port", str(self.bookie_port),
        ]
        console = open(data_dir / "jvm-console.log", "ab")
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG_SOURCE,
                 str(data_dir) if self._owns_data_dir else "", *java_command],
                cwd=data_dir,  # relative defaults (offloaders/, nar/) land here
                env=self._broker_env(),
                stdin=subprocess.PIPE,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group, away from Ctrl-C
            )
        finally:
            console.close()

    def _broker_env(self) -> dict[str, str]:
        if self.s3 is None:
            return dict(os.environ)
        # The S3 offloader's credentials (see s3_offload_config); a session
        # token of the caller's own AWS account would be sent along with them.
        env = {name: value for name, value in os.environ.items() if name != "AWS_SESSION_TOKEN"}
        # The AWS SDK 1.x prints a deprecation notice with a stack trace otherwise.
        return {**env, **self.object_store.env(),
                "AWS_JAVA_V1_DISABLE_DEPRECATION_ANNOUNCEMENT": "true"}

    # Class data sharing: loading and verifying ~20k classes is most of the
    # startup on a small box. The first broker dumps the classes it loaded
    # into an archive in the cache (JDK 17's dynamic AppCDS); later brokers map
    # it and start roughly twice as fast. A JVM that finds the archive stale
    # (other JDK build, changed jars) warns on its console and runs without it.

    def _class_data_sharing_options(self) -> list[str]:
        if not self.class_data_sharing:
            return []
        archive = class_data_archive_path(self.cache_dir)
        if archive.is_file():
            return [f"-XX:SharedArchiveFile={archive}"]
        archive.parent.mkdir(parents=True, exist_ok=True)
        # Several brokers may dump at once: each to its own file, renamed at stop.
        self._class_archive_being_written = archive.with_name(
            f".{archive.stem}-{os.getpid()}-{id(self):x}.tmp")
        return [f"-XX:ArchiveClassesAtExit={self._class_archive_being_written}"]

    def _settle_class_archive(self, keep: bool) -> None:
        written, self._class_archive_being_written = self._class_archive_being_written, None
        if written is None or not written.exists():
            return
        if keep and written.stat().st_size > 0:
            os.replace(written, class_data_archive_path(self.cache_dir))
        else:  # the JVM was killed, maybe mid-dump
            written.unlink()

    def _wait_until_ready(self, deadline: float) -> None:
        # The log says "messaging service is ready" before the standalone has
        # created public/default, so ask the admin API instead.
        while True:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise PulsarStartError(
                    f"the Pulsar JVM exited during startup (exit {code})\n"
                    + self.log_tail())
            if self._default_namespace_exists():
                return
            if time.monotonic() > deadline:
                raise PulsarStartError(
                    "Pulsar did not become ready in time\n" + self.log_tail())
            time.sleep(0.25)

    def _default_namespace_exists(self) -> bool:
        # Ask for the tenant first: listing the namespaces of a tenant that
        # does not exist yet logs an ERROR in the broker on every poll.
        try:
            return ("public" in self.admin("GET", "/admin/v2/tenants", timeout=2)
                    and "public/default" in self.admin(
                        "GET", "/admin/v2/namespaces/public", timeout=2))
        except (OSError, PulsarAdminError, ValueError):
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of the broker log and of the JVM's console output."""
        if self.data_dir is None:
            return ""
        return log_tail([self.data_dir / "jvm-console.log", self.data_dir / "broker.log"], lines)

    # -- admin REST ----------------------------------------------------------

    @property
    def admin_client(self) -> Admin:
        return Admin(self.cluster)

    def admin(self, method: str, path: str, body: Any = None,
              timeout: float = 30) -> Any:
        """Call the admin REST API; JSON in and out (None for an empty answer)."""
        return self.admin_client.request(method, path, body, timeout)

    def create_partitioned_topic(self, topic: str, partitions: int) -> None:
        self.admin_client.create_partitioned_topic(topic, partitions)

    def internal_stats(self, topic: str) -> dict:
        """Managed-ledger stats: `ledgers` [{ledgerId, entries, size, offloaded}], ..."""
        return self.admin_client.internal_stats(topic)

    def offload(self, topic: str, before_ledger: int, timeout: float = 60) -> None:
        """Offload every closed ledger of `topic` (one partition) older than
        `before_ledger`, and wait until the offload has finished."""
        self.admin_client.offload(topic, before_ledger, timeout)

    def bookkeeper_deleted_ledgers(self) -> set[int]:
        """Ledgers whose BookKeeper metadata the broker has deleted, from its
        log: the admin API does not say whether an offloaded ledger's
        BookKeeper copy is gone, the metadata store's log does."""
        deleted = set()
        if self.data_dir is None or not self.log_file.is_file():
            return deleted
        for match in _DELETED_LEDGER.finditer(self.log_file.read_text(errors="replace")):
            deleted.add(int(match.group(1) + match.group(2) + match.group(3)))
        return deleted


def _tier_name(tiered_storage: bool | str) -> str | None:
    """None, "s3" or "filesystem"; True is the production-like S3 tier."""
    if tiered_storage is True:
        return "s3"
    if tiered_storage in (False, None):
        return None
    if tiered_storage not in ("s3", "filesystem"):
        raise ValueError(f"tiered_storage: {tiered_storage!r} is not 's3' or 'filesystem'")
    return tiered_storage


# BookKeeper's hierarchical ledger path: the id as 10 digits, split 2/4/4.
_DELETED_LEDGER = re.compile(r"Deleted path: /ledgers/(\d{2})/(\d{4})/L(\d{4})\b")


def bookie_port_from_cookie(data_dir: Path) -> int | None:
    """The port recorded by a bookie that already ran in `data_dir`, if any."""
    cookie = data_dir / "bookkeeper" / "current" / "VERSION"
    if not cookie.is_file():
        return None
    match = re.search(r'bookieHost: "[^"]*:(\d+)"', cookie.read_text())
    return int(match.group(1)) if match else None


def _terminate_process_group(process: subprocess.Popen, grace_seconds: float) -> bool:
    """SIGTERM, wait, SIGKILL. True if it stopped within the grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(grace_seconds)
        graceful = True
    except subprocess.TimeoutExpired:
        graceful = False
    # SIGKILL the whole group even if the watchdog exited: anything left in it
    # is a JVM that did not stop in time.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    if process.stdin is not None:
        process.stdin.close()
    return graceful
