"""The Apache Pulsar distribution, fetched once from Maven Central and cached.

The broker is the official server distribution
(``pulsar-server-distribution:<v>:tar.gz:bin``), fetched with the machine's
own Maven and extracted once per user under ``$TALLY_CACHE`` or
``~/.cache/tally``; so are the offloaders' NARs for tiered storage (the
filesystem one, and the jcloud one that writes to S3) and s3proxy, the
loopback S3 endpoint the S3 tier writes to. Safe to call from several
processes at once.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tally.core.errors import TallyError

# 4.0 is the LTS line; 4.0.8 is the newest patch whose server tarball resolves
# from Maven Central here (4.0.9 and later do not).
PULSAR_VERSION = "4.0.8"
DISTRIBUTION_ARTIFACT = (
    f"org.apache.pulsar:pulsar-server-distribution:{PULSAR_VERSION}:tar.gz:bin"
)
TARBALL_NAME = f"pulsar-server-distribution-{PULSAR_VERSION}-bin.tar.gz"
DISTRIBUTION_DIR_NAME = f"apache-pulsar-{PULSAR_VERSION}"
# Pinned so every machine fetches with the plugin this was verified with.
MAVEN_COPY_GOAL = "org.apache.maven.plugins:maven-dependency-plugin:2.8:copy"
# The offloaders, by driver: the jar deployed to Central is the NAR itself
# (classes plus META-INF/bundled-dependencies); the broker only looks for *.nar.
# One directory each, as the broker unpacks every NAR it finds at start.
OFFLOADER_ARTIFACTS = {
    "filesystem": f"org.apache.pulsar:tiered-storage-file-system:{PULSAR_VERSION}",
    "aws-s3": f"org.apache.pulsar:tiered-storage-jcloud:{PULSAR_VERSION}",
}
# s3proxy serves the S3 API over a local directory (its jclouds filesystem
# backend); the jar with dependencies runs on its own (`java -jar`).
S3PROXY_VERSION = "2.6.0"
S3PROXY_ARTIFACT = f"org.gaul:s3proxy:{S3PROXY_VERSION}:jar:jar-with-dependencies"


class PulsarStartError(TallyError, RuntimeError):
    """The broker could not be fetched or did not become ready."""


# --------------------------------------------------------------------------
# The distribution: fetched once through Maven, extracted once, cached.
# --------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, $TALLY_CACHE or ~/.cache/tally."""
    root = cache_dir or os.environ.get("TALLY_CACHE") or Path.home() / ".cache" / "tally"
    return Path(root).expanduser()


def cache_dir_for_version(cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache>/pulsar-<version>`."""
    return cache_root(cache_dir) / f"pulsar-{PULSAR_VERSION}"


def ensure_distribution(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the extracted Pulsar distribution root (with `lib/` and `conf/`).

    Fast when already cached. Safe to call from several processes at once: a
    file lock serialises the fetch, and the extracted tree only appears under
    its final name once complete.
    """
    version_dir = cache_dir_for_version(cache_dir)
    distribution = version_dir / DISTRIBUTION_DIR_NAME
    if _is_complete_distribution(distribution):
        return distribution
    version_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(version_dir / ".lock"):
        if not _is_complete_distribution(distribution):
            tarball = version_dir / TARBALL_NAME
            if not tarball.is_file():
                _fetch_with_maven(DISTRIBUTION_ARTIFACT, tarball)
            _extract_atomically(tarball, distribution)
            # Maven's local repository keeps a copy; no need for a third one.
            tarball.unlink()
    return distribution


def _is_complete_distribution(root: Path) -> bool:
    return (root / "conf").is_dir() and any((root / "lib").glob("*pulsar-broker-*.jar"))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_offloader(driver: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the NAR of the offloader for `driver` ("filesystem"
    or "aws-s3"), fetched once: the broker's `offloadersDirectory`."""
    artifact = OFFLOADER_ARTIFACTS[driver]
    offloaders = cache_dir_for_version(cache_dir) / "offloaders" / driver
    _ensure_maven_file(artifact, offloaders / f"{artifact.split(':')[1]}-{PULSAR_VERSION}.nar")
    return offloaders


def ensure_s3proxy(cache_dir: str | os.PathLike | None = None) -> Path:
    """The s3proxy jar (with its dependencies), fetched once."""
    return _ensure_maven_file(S3PROXY_ARTIFACT, cache_root(cache_dir) / f"s3proxy-{S3PROXY_VERSION}"
                              / f"s3proxy-{S3PROXY_VERSION}-jar-with-dependencies.jar")


def _ensure_maven_file(artifact: str, destination: Path) -> Path:
    """`destination`, fetched once from Maven as `artifact` (locked, like the
    distribution, against several processes fetching at once)."""
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(destination.parent / ".lock"):
        if not destination.is_file():
            _fetch_with_maven(artifact, destination)
    return destination


# Drop the BookKeeper copy as soon as a ledger is offloaded, and look for
# ledgers to drop every second: reads then truly come from the tier.
_DROP_BOOKKEEPER_COPIES = {
    "managedLedgerOffloadDeletionLagMs": 0,
    "retentionCheckIntervalInSeconds": 1,
}


def filesystem_offload_config(offload_dir: Path, offloaders_dir: Path) -> dict[str, Any]:
    """Broker keys for the filesystem offloader writing under `offload_dir`.

    In 4.0 the offloader's base path is `fileSystemURI` itself (its
    constructor reads fs.defaultFS back), so the URI names the directory."""
    return {
        "managedLedgerOffloadDriver": "filesystem",
        "offloadersDirectory": str(offloaders_dir),
        "fileSystemURI": Path(offload_dir).resolve().as_uri(),
        **_DROP_BOOKKEEPER_COPIES,
    }


def s3_offload_config(store, offloaders_dir: Path) -> dict[str, Any]:
    """Broker keys for the jcloud offloader writing to the bucket of `store`
    (an `S3Location`); the broker also needs `s3_offloader_jvm_options` and
    `store.env()`.

    The credentials are not among the keys: the aws-s3 driver falls back to
    the AWS SDK's default chain, whose first link reads AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY from the broker's environment (`S3Location.env`);
    in the config they would be echoed by the admin API's offload policies."""
    return {
        "managedLedgerOffloadDriver": "aws-s3",
        "offloadersDirectory": str(offloaders_dir),
        "s3ManagedLedgerOffloadBucket": store.bucket,
        "s3ManagedLedgerOffloadRegion": store.region,
        "s3ManagedLedgerOffloadServiceEndpoint": store.endpoint,
        **_DROP_BOOKKEEPER_COPIES,
    }


def s3_offloader_jvm_options(store) -> list[str]:
    """jclouds settings the aws-s3 driver needs for an endpoint that is not AWS.

    Knowing many AWS regions, jclouds asks https://s3.amazonaws.com where the
    bucket lives (GetBucketLocation) whatever the endpoint, and retries for
    ever offline. With one region it asks nobody, and that region's endpoint
    is where it sends every request. The offloader hands the JVM's jclouds.*
    system properties to jclouds (TieredStorageConfiguration.getOverrides)."""
    return [f"-Djclouds.regions={store.region}",
            f"-Djclouds.region.{store.region}.endpoint={store.endpoint}"]


def _fetch_with_maven(artifact: str, destination: Path) -> None:
    """Copy `artifact` from Maven (Central, through the local repository) to
    `destination`."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise PulsarStartError(
            f"Maven (mvn) is needed once to fetch {artifact} from Maven Central; "
            "install it (e.g. apt-get install maven) or pre-fill the cache at "
            f"{destination}"
        )
    # Download into a scratch dir first: a cut-off download must never look
    # like a finished file.
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".fetch-") as scratch:
        command = [
            mvn, "-q", "-B", MAVEN_COPY_GOAL,
            f"-Dartifact={artifact}",
            f"-DoutputDirectory={scratch}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        fetched = list(Path(scratch).iterdir())
        if result.returncode != 0 or len(fetched) != 1:
            output = (result.stdout + result.stderr).strip()[-4000:]
            raise PulsarStartError(
                f"mvn could not fetch {artifact} (exit {result.returncode}):\n{output}"
            )
        os.replace(fetched[0], destination)


def _extract_atomically(tarball: Path, destination: Path) -> None:
    scratch = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".extract-"))
    try:
        with tarfile.open(tarball) as archive:
            # The 'data' filter refuses absolute paths and links out of the tree.
            if hasattr(tarfile, "data_filter"):
                archive.extractall(scratch, filter="data")
            else:  # Python without the PEP 706 backport
                archive.extractall(scratch)
        extracted = scratch / DISTRIBUTION_DIR_NAME
        if not _is_complete_distribution(extracted):
            raise PulsarStartError(f"{tarball} does not hold {DISTRIBUTION_DIR_NAME}/lib")
        os.rename(extracted, destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
