"""The ``tally`` command line: one parser tree, one place for errors.

Every subcommand is declared here with its options (defaults from
``tally.service.config``); the commands themselves live by area:
``registry`` (apply, list, describe, ...), ``online`` (get, lookup-server),
``stream`` (serve, bootstrap, training-set, create-topic) and ``local``
(dev, quickstart). A user error -- a refused definition, an unknown view, a
broker that cannot be reached -- is one line on stderr and exit status 2
(1 for a refused definition), never a traceback.
"""
import argparse
import sys

from tally.core.errors import DefinitionError, TallyError
from tally.service import config
from tally.service.cli import local, online, registry, stream, ui


def build_parser():
    parser = argparse.ArgumentParser(prog="tally", description="Tally, a streaming feature "
                                     "store on Apache Pulsar")
    parser.add_argument("--version", action="version", version=f"tally {_version()}")
    parser.add_argument("--config", metavar="PATH", help="the project file (default: "
                        f"$TALLY_CONFIG, else the first {config.PROJECT_FILE} found walking "
                        "up from the working directory)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for area in (online, stream, local, registry, ui):
        area.add_commands(commands)
    return parser


def _version():
    import tally
    return tally.__version__


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # the option defaults come from the project file: find it before building the parser
    config.use_file(_config_option(argv))
    try:
        parser = build_parser()
    except config.ConfigError as error:
        print(f"tally: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(parser.parse_args(argv)))


def _config_option(argv):
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config")
    return early.parse_known_args(argv)[0].config


def run(args):
    """Run a parsed command; user errors become one line on stderr."""
    try:
        return args.run(args) or 0
    except DefinitionError as error:
        print(f"tally {args.command}: refused: {error}", file=sys.stderr)
        return 1
    except (TallyError, OSError) as error:
        print(f"tally {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
