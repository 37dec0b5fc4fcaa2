"""``python -m tally.bench setup-peers``: install every peer the benchmarks
compare Tally with, outside the repository, once.

* Feast (``feast[redis,duckdb]``: the Redis online store of ``services``, the
  DuckDB offline store of ``training``) in a venv of its own under the peer
  cache, ``<cache>/peers/feast`` (``$TALLY_FEAST_PYTHON`` names another
  interpreter instead);
* the ``bench`` extra's Python packages (DuckDB, Polars, psutil, matplotlib) in this
  interpreter, from the requirements in Tally's own metadata;
* Debian's ``redis-server`` (by apt-get when run as root, else the command is
  printed);
* the Flink peer (``bench/peers/flink``, a Maven project) built with its
  dependencies from Maven Central into ``<cache>/peers/flink-<digest of its
  sources>``, so an edited job builds anew.

``<cache>`` is ``$TALLY_CACHE`` or ``~/.cache/tally``, where the Pulsar
distribution lives too. Each step first looks for what it would install, so
a second run only says what is there. A benchmark whose peer is missing says
so with ``missing_peer`` and still prints its own figures.
"""
import argparse
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tally.service.pulsar.distribution import cache_root

FEAST_REQUIREMENT = "feast[redis,duckdb]"
FEAST_EXTRAS_MODULES = ("redis", "ibis")      # what the two extras bring
FLINK_PROJECT = Path(__file__).resolve().parent / "peers" / "flink"
SETUP_COMMAND = "python -m tally.bench setup-peers"


def peers_dir(cache_dir=None):
    """``<cache>/peers``: everything this module installs but the apt package."""
    return cache_root(cache_dir) / "peers"


def missing_peer(what):
    """What a benchmark reports in place of a peer's figures."""
    return f"{what} is not installed: `{SETUP_COMMAND}` installs it"


# ---- Feast ---------------------------------------------------------------------

def feast_python(cache_dir=None):
    """The python of the Feast venv: ``$TALLY_FEAST_PYTHON``, else the cache's."""
    return os.environ.get("TALLY_FEAST_PYTHON") or str(peers_dir(cache_dir) / "feast" / "bin" /
                                                       "python")


def feast_version(python, also=()):
    """Feast's version in that interpreter if it imports Feast and the modules
    ``also`` names, else None."""
    if not os.path.exists(python):
        return None
    imports = ", ".join(("feast",) + tuple(also))
    done = subprocess.run([python, "-c", f"import {imports}; print(feast.__version__)"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def setup_feast():
    python = feast_python()
    version = feast_version(python, FEAST_EXTRAS_MODULES)
    if version:
        return f"there: Feast {version} at {python}"
    venv = Path(python).parent.parent
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", FEAST_REQUIREMENT], check=True)
    return f"installed: Feast {feast_version(python, FEAST_EXTRAS_MODULES)} at {python}"


# ---- this interpreter's packages -------------------------------------------------

def bench_requirements():
    """The ``bench`` extra's requirements, as Tally's installed metadata has them."""
    marker = re.compile(r";\s*extra\s*==\s*['\"]bench['\"]")
    return [marker.split(r)[0].strip() for r in importlib.metadata.requires("tally") or ()
            if marker.search(r)]


def requirement_name(requirement):
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)


def setup_python_packages():
    missing = []
    for requirement in bench_requirements():
        try:
            importlib.metadata.version(requirement_name(requirement))
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    if not missing:
        return f"there: {', '.join(bench_requirements())} in {sys.executable}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    return f"installed: {', '.join(missing)} in {sys.executable}"


# ---- redis-server ------------------------------------------------------------------

def setup_redis():
    found = shutil.which("redis-server")
    if found:
        return f"there: {found}"
    command = ["apt-get", "install", "-y", "redis-server"]
    if os.geteuid() != 0:
        return f"missing: run `sudo {' '.join(command)}`"
    subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return f"installed: {shutil.which('redis-server')}"


# ---- the Flink peer ------------------------------------------------------------------

def flink_sources(project=FLINK_PROJECT):
    """The Maven project's files, relative to it, in a stable order."""
    return sorted(p.relative_to(project) for p in project.rglob("*")
                  if p.is_file() and "target" not in p.relative_to(project).parts)


def flink_build_dir(cache_dir=None, project=FLINK_PROJECT):
    """``<cache>/peers/flink-<digest>``: the digest covers every source file's
    path and bytes, so an edit to the job is built apart from older builds."""
    digest = hashlib.sha256()
    for path in flink_sources(project):
        digest.update(str(path).encode() + b"\0" + (project / path).read_bytes() + b"\0")
    return peers_dir(cache_dir) / f"flink-{digest.hexdigest()[:12]}"


def flink_classpath(cache_dir=None):
    """``java -cp`` of the built job (its classes, then every jar Maven
    resolved), or None when it is not built or a jar has gone from ~/.m2."""
    build = flink_build_dir(cache_dir) / "target"
    listing = build / "classpath.txt"
    if not listing.exists():
        return None
    jars = listing.read_text().strip().split(os.pathsep)
    if not all(os.path.exists(jar) for jar in jars):
        return None
    return os.pathsep.join([str(build / "classes")] + jars)


def setup_flink():
    if flink_classpath():
        return f"there: {flink_build_dir()}"
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            return f"missing: {tool} (Java 17 and Maven build the Flink peer: apt-get install -y " \
                   "openjdk-17-jdk-headless maven)"
    final = flink_build_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    # Built in a scratch copy renamed into place: a cut-off build never looks done.
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=".flink-build-"))
    try:
        for path in flink_sources():
            (scratch / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(FLINK_PROJECT / path, scratch / path)
        done = subprocess.run(["mvn", "-q", "-B", "package", "-DskipTests"], cwd=scratch,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"mvn package of the Flink peer failed:\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(scratch, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for older in final.parent.glob("flink-*"):     # builds of earlier sources
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return f"built: {final}"


STEPS = {"python": setup_python_packages, "redis": setup_redis, "flink": setup_flink,
         "feast": setup_feast}


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog=f"{SETUP_COMMAND}")
    parser.add_argument("--only", choices=sorted(STEPS), action="append",
                        help="install only this peer (repeatable); default: all")
    args = parser.parse_args(argv)
    report = {"benchmark": "setup-peers", "cache": str(peers_dir())}
    for name in args.only or STEPS:
        started = time.perf_counter()
        report[name] = STEPS[name]()
        print(f"{name}: {report[name]} ({time.perf_counter() - started:.1f} s)", flush=True)
    return report
