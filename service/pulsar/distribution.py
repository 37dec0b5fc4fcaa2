"""The Apache Pulsar distribution, fetched once from Maven Central and cached.

The broker is the official server distribution
(``pulsar-server-distribution:<v>:tar.gz:bin``), fetched with the machine's
own Maven and extracted once per user under ``$TALLY_CACHE`` or
``~/.cache/tally``; so is the filesystem offloader's NAR for tiered storage.
Safe to call from several processes at once.
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
# The filesystem offloader: the jar deployed to Central is the NAR itself
# (classes plus META-INF/bundled-dependencies); the broker only looks for *.nar.
FILESYSTEM_OFFLOADER_ARTIFACT = f"org.apache.pulsar:tiered-storage-file-system:{PULSAR_VERSION}"
FILESYSTEM_OFFLOADER_JAR = f"tiered-storage-file-system-{PULSAR_VERSION}.jar"


class PulsarStartError(TallyError, RuntimeError):
    """The broker could not be fetched or did not become ready."""


# --------------------------------------------------------------------------
# The distribution: fetched once through Maven, extracted once, cached.
# --------------------------------------------------------------------------

def cache_dir_for_version(cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache>/pulsar-<version>`; cache is `cache_dir`, $TALLY_CACHE or ~/.cache/tally."""
    root = cache_dir or os.environ.get("TALLY_CACHE") or Path.home() / ".cache" / "tally"
    return Path(root).expanduser() / f"pulsar-{PULSAR_VERSION}"


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
                _fetch_with_maven(version_dir)
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


def ensure_filesystem_offloader(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the filesystem offloader NAR (fetched once)."""
    offloaders = cache_dir_for_version(cache_dir) / "offloaders"
    nar = offloaders / FILESYSTEM_OFFLOADER_JAR.replace(".jar", ".nar")
    if nar.is_file():
        return offloaders
    offloaders.mkdir(parents=True, exist_ok=True)
    with _file_lock(offloaders / ".lock"):
        if not nar.is_file():
            _fetch_with_maven(offloaders, FILESYSTEM_OFFLOADER_ARTIFACT,
                              FILESYSTEM_OFFLOADER_JAR)
            os.replace(offloaders / FILESYSTEM_OFFLOADER_JAR, nar)
    return offloaders


def tiered_storage_config(offload_dir: Path, offloaders_dir: Path) -> dict[str, Any]:
    """Broker keys for the filesystem offloader writing under `offload_dir`.

    In 4.0 the offloader's base path is `fileSystemURI` itself (its
    constructor reads fs.defaultFS back), so the URI names the directory."""
    return {
        "managedLedgerOffloadDriver": "filesystem",
        "offloadersDirectory": str(offloaders_dir),
        "fileSystemURI": Path(offload_dir).resolve().as_uri(),
        # Drop the BookKeeper copy as soon as a ledger is offloaded, and look
        # for ledgers to drop every second: reads then truly come from the tier.
        "managedLedgerOffloadDeletionLagMs": 0,
        "retentionCheckIntervalInSeconds": 1,
    }


def _fetch_with_maven(version_dir: Path, artifact: str = DISTRIBUTION_ARTIFACT,
                      file_name: str = TARBALL_NAME) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise PulsarStartError(
            "Maven (mvn) is needed once to fetch Pulsar from Maven Central; "
            "install it (e.g. apt-get install maven) or pre-fill the cache at "
            f"{version_dir}"
        )
    # Download into a scratch dir first: a cut-off download must never look
    # like a finished tarball.
    with tempfile.TemporaryDirectory(dir=version_dir, prefix=".fetch-") as scratch:
        command = [
            mvn, "-q", "-B", MAVEN_COPY_GOAL,
            f"-Dartifact={artifact}",
            f"-DoutputDirectory={scratch}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(scratch) / file_name
        if result.returncode != 0 or not fetched.is_file():
            output = (result.stdout + result.stderr).strip()[-4000:]
            raise PulsarStartError(
                f"mvn could not fetch {artifact} (exit {result.returncode}):\n{output}"
            )
        os.replace(fetched, version_dir / file_name)


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
