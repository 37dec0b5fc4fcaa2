"""The peers' bookkeeping of ``python -m tally.bench setup-peers`` and the
pure parts of ``python -m tally.bench flink``; installing and running the
peers needs the network and minutes, so no test does."""
import ast
import shutil
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:                 # Python 3.10
    import tomli as tomllib

import numpy as np
import pytest

from tally.bench import flink, setup_peers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TALLY_FEAST_PYTHON", raising=False)
    return tmp_path / "cache"


def test_peers_live_in_the_tally_cache_and_feast_can_be_named(cache, monkeypatch):
    assert setup_peers.peers_dir() == cache / "peers"
    assert setup_peers.feast_python() == str(cache / "peers" / "feast" / "bin" / "python")
    monkeypatch.setenv("TALLY_FEAST_PYTHON", "/opt/feast/bin/python")
    assert setup_peers.feast_python() == "/opt/feast/bin/python"


def test_a_missing_peer_says_how_to_install_it():
    message = setup_peers.missing_peer("redis-server")
    assert message.startswith("redis-server ")
    assert "`python -m tally.bench setup-peers`" in message


def test_the_flink_build_follows_its_sources_and_nothing_else(tmp_path):
    project = tmp_path / "flink"
    shutil.copytree(setup_peers.FLINK_PROJECT, project,
                    ignore=shutil.ignore_patterns("target"))
    first = setup_peers.flink_build_dir(tmp_path, project)
    assert first.parent == tmp_path / "peers" and first.name.startswith("flink-")
    (project / "target").mkdir()
    (project / "target" / "classpath.txt").write_text("anything")
    assert setup_peers.flink_build_dir(tmp_path, project) == first
    job = next(project.rglob("ReadingJob.java"))
    job.write_text(job.read_text() + "\n")
    assert setup_peers.flink_build_dir(tmp_path, project) != first


def test_the_flink_classpath_is_there_only_while_every_jar_is(cache, tmp_path):
    assert setup_peers.flink_classpath() is None
    target = setup_peers.flink_build_dir() / "target"
    target.mkdir(parents=True)
    jars = [tmp_path / "a.jar", tmp_path / "b.jar"]
    for jar in jars:
        jar.write_bytes(b"PK")
    (target / "classpath.txt").write_text(":".join(map(str, jars)) + "\n")
    assert setup_peers.flink_classpath() == ":".join([str(target / "classes")] +
                                                     [str(j) for j in jars])
    jars[1].unlink()
    assert setup_peers.flink_classpath() is None


# import name -> distribution, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "pulsar": "pulsar-client", "aerospike_helpers": "aerospike",
                 "aerospike_py": "aerospike-py"}


def bench_imports():
    """Top-level modules the bench package's code imports (not the scripts it
    hands Feast's interpreter as strings)."""
    found = set()
    for path in (REPO / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"tally"}


def requirement_names(requirements):
    return {setup_peers.requirement_name(r).lower() for r in requirements}


def test_the_bench_extra_covers_every_import_of_the_benchmarks():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    allowed = requirement_names(project["dependencies"] + extras["bench"] + extras["aerospike"])
    needed = {DISTRIBUTIONS.get(m, m).lower() for m in bench_imports()}
    assert needed - allowed == set()
    assert "duckdb" in needed      # the scan sees the imports inside functions


def test_the_checked_window_is_the_one_a_read_at_the_end_covers():
    hour = flink.HOUR
    assert flink.check_window_end(10 * hour) == 11 * hour
    assert flink.check_window_end(10 * hour + hour - 1) == 11 * hour


def test_the_oracle_sums_per_user_and_over_the_last_week_only():
    week_end = 30 * 24 * flink.HOUR
    events = {"user": np.array([3, 3, 5, 3]),
              "readtime": np.array([1.5, 2.0, 4.0, 8.0]),
              "ts": np.array([week_end - flink.WEEK - 1, week_end - flink.WEEK,
                              week_end - 10, week_end - 1])}
    assert flink.oracle(events, week_end) == {3: (11.5, 3, 10.0), 5: (4.0, 1, 4.0)}
