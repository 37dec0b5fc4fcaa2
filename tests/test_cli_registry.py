"""The registry commands of the ``tally`` CLI on the quick-start example
(``service/examples/reading.py`` and ``reading.sql``)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tally.service.cli import build_parser, main
from tally.service.registry import Registry

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "service", "examples")
READING_PY = os.path.join(EXAMPLES, "reading.py")
READING_SQL = os.path.join(EXAMPLES, "reading.sql")


@pytest.fixture
def tally(tmp_path, capsys):
    """tally(*args) -> (exit code, stdout, stderr), against a fresh registry."""
    path = str(tmp_path / "registry.db")

    def run(*args, registry=True):
        argv = list(args) + (["--registry", path] if registry else [])
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        out, err = capsys.readouterr()
        return exit_.value.code, out, err
    run.path = path
    return run


def test_the_quickstart_example(tally, tmp_path):
    # plan is a dry run
    code, out, _ = tally("plan", READING_PY)
    assert code == 0
    assert out.splitlines()[0] == "Plan (dry run; nothing is stored) for reading.py:"
    assert "+ view user_reading@v1 (new; current)" in out
    assert tally("list")[1].startswith("The registry is empty")

    code, out, _ = tally("apply", READING_PY)
    assert code == 0 and out.splitlines() == [
        "+ entity user@v1 (new; current)",
        "+ entity article@v1 (new; current)",
        "+ source read_events@v1 (new; current)",
        "+ view user_reading@v1 (new; current)",
        "+ view user_reading_7d@v1 (new; current)",
        "+ view article_popularity@v1 (new; current)",
        "6 create"]
    # the SQL file defines the very same things: nothing new
    code, out, _ = tally("apply", READING_SQL)
    assert code == 0 and out.splitlines()[-1] == "6 unchanged"

    code, out, _ = tally("list")
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "VERSION", "STATE", "OWNER", "TAGS", "DETAILS"]
    assert lines[2].split()[:5] == ["view", "user_reading", "v1", "current", "quickstart"]
    assert "topic read_events, msgpack, 4 fields" in out

    code, out, _ = tally("search", "--tag", "reading", "--owner", "quickstart")
    assert out.splitlines() == [
        "view   user_reading_7d@v1 (current) owner=quickstart tags=quickstart,reading - "
        "Reading in the last 7 days, hop 1 hour"]
    code, out, _ = tally("search", "readers", "--json")
    assert [(h["name"], h["features"]) for h in json.loads(out)] == \
        [("article_popularity", ["readers_1d"])]
    assert tally("search", "--entity", "article", "--kind", "view")[1].startswith(
        "view   article_popularity@v1")

    code, out, _ = tally("describe", "user_reading_7d")
    assert "view user_reading_7d@v1 (current)" in out
    assert "recent_articles  last_n(article, 10) sliding 7d hop 1h where readtime > 0" in out
    code, out, _ = tally("describe", "user_reading_7d", "--sql")
    assert "WINDOW SLIDING 7 DAYS HOP 1 HOUR;" in out and out.startswith("CREATE SOURCE")
    described = json.loads(tally("describe", "read_events", "--json")[1])
    assert described["kind"] == "source" and described["definition"]["topic"] == "read_events"

    # a change: a shorter hop, planned, applied, diffed, rolled back
    changed = tmp_path / "reading.sql"
    text = pathlib.Path(READING_SQL).read_text()
    assert text.count("WINDOW SLIDING 7 DAYS HOP 1 HOUR") == 1
    changed.write_text(text.replace("WINDOW SLIDING 7 DAYS HOP 1 HOUR",
                                    "WINDOW SLIDING 7 DAYS HOP 30 MINUTES"))
    code, out, _ = tally("plan", str(changed))
    assert "~ view user_reading_7d@v2 (new version, replaces v1; current)" in out
    assert "    ~ features.readtime_7d.window: sliding 7d hop 1h -> sliding 7d hop 30m" in out
    assert "= view user_reading@v1 (unchanged)" in out
    with Registry(tally.path) as registry:
        assert registry.resolve("user_reading_7d").version == 1
    assert tally("apply", str(changed))[0] == 0
    code, out, _ = tally("diff", "user_reading_7d")
    assert out.splitlines()[0] == "view user_reading_7d@v1 -> user_reading_7d@v2"
    assert len(out.splitlines()) == 5                  # the 4 features' windows
    diff = json.loads(tally("diff", "user_reading_7d@v1", "user_reading_7d@v2", "--json")[1])
    assert diff["changes"][0] == {"path": "features.readtime_7d.window",
                                  "old": "sliding 7d hop 1h", "new": "sliding 7d hop 30m"}
    code, out, _ = tally("rollback", "user_reading_7d")
    assert code == 0 and out.startswith("view user_reading_7d: current version is now v1")
    code, out, _ = tally("versions", "user_reading_7d")
    assert [line.split()[:2] for line in out.splitlines()] == [["v1", "current"],
                                                               ["v2", "retired"]]
    code, out, _ = tally("rollback", "user_reading_7d", "--to", "v2")
    assert "now v2" in out

    # lineage in both directions
    code, out, _ = tally("lineage", "user_reading_7d.long_reads_7d")
    assert out.splitlines() == [
        "Lineage of user_reading_7d.long_reads_7d:",
        "  user_reading_7d.long_reads_7d -> view user_reading_7d@v2 (current) -> source "
        "read_events -> topic read_events -> fields readtime (filter), user (key), ts "
        "(event_time)"]
    code, out, _ = tally("lineage", "--topic", "read_events", "--field", "article")
    assert out.splitlines()[0] == "Features reading topic read_events, field article:"
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "article_popularity.reads_1h", "article_popularity.readers_1d",
        "article_popularity.mean_readtime", "user_reading_7d.recent_articles"]
    code, out, _ = tally("lineage", "read_events")
    assert out.splitlines()[0] == "Features reading source read_events (topic read_events):"
    assert len(out.splitlines()) == 10
    rows = json.loads(tally("lineage", "--source", "read_events", "--json")[1])
    assert {r["view"] for r in rows} == {"user_reading", "user_reading_7d", "article_popularity"}

    changes = json.loads(tally("changes", "--json")[1])
    assert [c["seq"] for c in changes] == list(range(1, len(changes) + 1))
    assert changes[-1]["event"] == "rolled_back"


def test_sql_files_use_the_registry_catalog(tally, tmp_path):
    view_only = tmp_path / "more.sql"
    view_only.write_text("CREATE VIEW article_reads AS\n"
                         "SELECT article, COUNT(*) AS reads FROM read_events GROUP BY article;")
    code, _, err = tally("apply", str(view_only))
    assert code == 1 and "FROM 'read_events' is not a known source" in err
    # in one command with the Python file that defines the source
    code, out, _ = tally("apply", str(view_only), READING_PY)
    assert code == 0 and "+ view article_reads@v1 (new; current)" in out
    # and later on its own, from the registry's sources
    view_only.write_text(view_only.read_text().replace("COUNT(*) AS reads",
                                                       "COUNT(*) AS n_reads"))
    assert "~ view article_reads@v2" in tally("apply", str(view_only))[1]


def test_refusals_and_errors(tally, tmp_path):
    code, _, err = tally("list")
    assert code == 2 and err.startswith(f"tally list: no registry at {tally.path}; apply "
                                        "definitions first")
    bad_py = tmp_path / "bad.py"
    bad_py.write_text(
        "from tally.core.definitions import Entity, Feature, FeatureView, Source\n"
        "src = Source('ev', 'ev', {'user': 'int64', 'country': 'string', 'ts': 'int64'})\n"
        "v = FeatureView('v', Entity('user'), src, [Feature('s', 'sum', 'country')])\n")
    code, out, err = tally("apply", str(bad_py))
    assert code == 1 and out == ""
    assert err == (f"tally apply: refused: {bad_py}: view 'v', feature 's': aggregation sum "
                   "needs a numeric column, but column 'country' is string; aggregate a "
                   "numeric column, or use count, first, last, last_n, distinct_count, top_k, "
                   "histogram for a string column\n")

    bad_sql = tmp_path / "bad.sql"
    bad_sql.write_text("CREATE SOURCE ev (user BIGINT, ts BIGINT);\n"
                       "CREATE VIEW v AS SELECT user, COUNT(*) AS n FROM ev GROUP BY user "
                       "ORDER BY user;")
    code, _, err = tally("plan", str(bad_sql))
    assert code == 1 and err == (f"tally plan: refused: {bad_sql}: view 'v': ORDER BY is "
                                 "outside the Tally SQL dialect; drop it: a view has no order\n")

    broken = tmp_path / "broken.py"
    broken.write_text("import nonexistent_module\n")
    code, _, err = tally("apply", str(broken))
    assert code == 2 and "could not be loaded: ModuleNotFoundError" in err
    assert tally("apply", str(tmp_path / "missing.py"))[2].endswith("missing.py: no such file\n")
    (tmp_path / "defs.txt").write_text("")
    assert "definitions are .py (Python DSL) or .sql" in tally("apply",
                                                                str(tmp_path / "defs.txt"))[2]

    tally("apply", READING_PY)
    code, _, err = tally("describe", "user_readin")
    assert code == 2 and err == ("tally describe: no definition named 'user_readin' in the "
                                 "registry; did you mean 'user_reading'?\n")
    code, _, err = tally("rollback", "user_reading")
    assert code == 2 and "no version before v1 has been current" in err
    code, _, err = tally("promote", "user_reading@v1")
    assert code == 2 and "user_reading@v1 is not the candidate" in err
    with pytest.raises(SystemExit):
        main(["list", "--unknown-flag"])


def test_managed_deploys_and_promote(tally, tmp_path):
    tally("apply", READING_PY)
    with Registry(tally.path) as registry:
        registry.set_deploy_mode("managed")
    changed = tmp_path / "reading.py"
    changed.write_text(pathlib.Path(READING_PY).read_text().replace('Window.sliding("7d", "1h")',
                                                       'Window.sliding("7d", "2h")'))
    code, out, _ = tally("apply", str(changed))
    assert "~ view user_reading_7d@v2 (new version, replaces v1; candidate)" in out
    assert out.splitlines()[-1] == ("Candidates become current when the streaming service has "
                                    "caught up.")
    assert "user_reading_7d     v2       candidate" in tally("list")[1]
    assert "  deploying   v2 (candidate)" in tally("describe", "user_reading_7d")[1]
    code, out, _ = tally("promote", "user_reading_7d@v2")
    assert code == 0 and out == "view user_reading_7d: current version is now v2\n"


def test_registry_path_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TALLY_REGISTRY", str(tmp_path / "env.db"))
    with pytest.raises(SystemExit) as exit_:
        main(["apply", READING_SQL])
    assert exit_.value.code == 0
    assert os.path.exists(tmp_path / "env.db")
    capsys.readouterr()


def test_the_other_commands_still_parse():
    parser = build_parser()
    args = parser.parse_args(["get", "user_reading", "1", "2"])
    assert (args.command, args.keys) == ("get", ["1", "2"])
    # one parser tree: every command's own options parse with it (no hand-off)
    args = parser.parse_args(["quickstart", "--events", "1000"])
    assert args.command == "quickstart" and args.events == 1000
    args = parser.parse_args(["dev", "--port", "6650"])
    assert args.command == "dev" and args.port == 6650 and args.tiered_storage is None
    # the S3 tier unless the filesystem one is named
    assert parser.parse_args(["dev", "--tiered-storage"]).tiered_storage == "s3"
    assert parser.parse_args(["dev", "--tiered-storage", "filesystem"]).tiered_storage \
        == "filesystem"
    args = parser.parse_args(["serve", "defs.py", "--checkpoint-interval", "2"])
    assert args.command == "serve" and args.checkpoint_interval == 2.0
    args = parser.parse_args(["bootstrap", "user_reading", "--readers", "3"])
    assert args.command == "bootstrap" and args.readers == 3


def test_the_installed_command(tmp_path):
    registry = str(tmp_path / "r.db")
    tally_cmd = shutil.which("tally")
    command = [tally_cmd] if tally_cmd else [sys.executable, "-m", "tally.service.cli"]
    done = subprocess.run(command + ["apply", READING_SQL, "--registry", registry, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dry_run"] is False
    assert [(i["kind"], i["name"], i["action"]) for i in result["items"]][-1] == \
        ("view", "article_popularity", "create")
    done = subprocess.run([sys.executable, "-m", "tally.service.cli", "list", "--registry",
                           registry, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 6


def test_every_command_reads_the_same_defaults_from_the_environment(monkeypatch):
    """Once, `tally get` honoured $TALLY_STORE while `tally serve` and
    `tally bootstrap` did not: they wrote one store and read another."""
    monkeypatch.setenv("TALLY_STORE", "/srv/tally/store")
    monkeypatch.setenv("TALLY_CHECKPOINTS", "/srv/tally/ckpt")
    monkeypatch.setenv("TALLY_PULSAR", "pulsar://broker:6650")
    parser = build_parser()
    for argv in (["get", "v", "1"], ["lookup-server"], ["serve", "defs.py"],
                 ["bootstrap", "v"], ["quickstart"]):
        assert parser.parse_args(argv).store == "/srv/tally/store", argv
    for argv in (["serve", "defs.py"], ["bootstrap", "v"]):
        args = parser.parse_args(argv)
        assert (args.checkpoints, args.pulsar) == ("/srv/tally/ckpt", "pulsar://broker:6650")


def test_user_errors_are_one_line_never_a_traceback(tmp_path):
    for argv in (["get", "user_reading", "1", "--store", str(tmp_path / "none")],
                 ["serve"],
                 ["bootstrap", "no_such_view", "--registry", str(tmp_path / "none.db")]):
        done = subprocess.run([sys.executable, "-m", "tally", *argv], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path,
                              env={k: v for k, v in os.environ.items() if k != "TALLY_REGISTRY"})
        assert done.returncode == 2, (argv, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
            (argv, done.stderr)
        assert done.stderr.startswith(f"tally {argv[0]}: ")
        if argv == ["serve"]:               # no definitions: the registry apply writes
            assert "no registry at .tally/registry.db" in done.stderr
