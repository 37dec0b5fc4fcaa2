"""What ``tally ... --help`` and ``tally --version`` print: plain text (no
reStructuredText from docstrings), every argument explained, every option's
default named, and the quick start's stated defaults the ones it runs with."""
import argparse
import importlib.metadata
import inspect
import os
import re

import pytest

from tally.service.cli import build_parser, main

# ``literal``, `interpreted`, :role:`x`, .. directive::
RST_MARKUP = re.compile(r"`|:[a-z]+(:[a-z]+)?:`|^\s*\.\. [a-z-]+::", re.MULTILINE)


def _subcommands():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices


def _printed(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and not err, (argv, err)
    return out


def test_version_is_the_installed_distributions(capsys):
    assert _printed(capsys, "--version") == f"tally {importlib.metadata.version('tally')}\n"


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_is_plain_text(command, capsys):
    text = _printed(capsys, *([command] if command else []), "--help")
    assert text.startswith("usage: tally")
    assert not RST_MARKUP.search(text), RST_MARKUP.search(text)


@pytest.mark.parametrize("command", list(_subcommands()))
def test_every_argument_is_explained_and_every_option_names_its_default(command):
    for action in _subcommands()[command]._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"tally {command} {name}: no help text"
        takes_a_value = action.option_strings and action.nargs != 0
        if takes_a_value and not action.required:
            assert "(default: " in action.help, f"tally {command} {name}: no default named"


@pytest.mark.parametrize("argv, runs, expected", [
    ([], "quickstart", dict(n_events=500_000, n_users=10_000, n_partitions=4)),
    (["--model", "recommend"], "quickstart_model",
     dict(n_events=200_000, n_users=10_000, n_partitions=4)),
    (["--model", "recommend", "--events", "300000", "--partitions", "2"], "quickstart_model",
     dict(n_events=300_000, n_users=10_000, n_partitions=2)),
])
def test_the_quickstart_runs_with_the_defaults_its_help_states(argv, runs, expected, capsys,
                                                               monkeypatch):
    from tally.service import quickstart, quickstart_model
    module = {"quickstart": quickstart, "quickstart_model": quickstart_model}[runs]
    signature, calls = inspect.signature(module.run), []
    monkeypatch.setattr(module, "run", lambda *args, **kwargs: calls.append(
        signature.bind(*args, **kwargs).arguments))
    monkeypatch.delenv("TALLY_STORE", raising=False)
    _printed(capsys, "quickstart", *argv)
    assert calls == [{**expected, "store_path": os.path.join(".tally", "store")}]

    text = " ".join(_printed(capsys, "quickstart", "--help").split())
    assert "reading events to produce (default: 500,000; 200,000 with --model recommend)" in text
    assert "distinct users (default: 10,000)" in text
    assert "partitions of the reading events' topic (default: 4)" in text
    assert "(default: $TALLY_STORE, tally.toml, else .tally/store)" in text
