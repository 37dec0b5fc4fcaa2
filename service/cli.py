"""The ``tally`` command line."""
import argparse
import json
import os
import sys

DEFAULT_STORE = os.environ.get("TALLY_STORE", os.path.join(".tally", "store"))


def _cmd_get(args):
    from tally.service.lmdb_store import LmdbStore, StoreError
    try:
        with LmdbStore(args.store, readonly=True) as store:
            schema = store.schema(args.view)
            keys = [int(k) if schema.key_type == "int64" else k for k in args.keys]
            for key, record in zip(keys, store.get_many(args.view, keys)):
                print(json.dumps({"key": key, "features": record}))
    except StoreError as error:
        print(f"tally get: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"tally get: bad key: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_quickstart(args):
    from tally.service import quickstart
    quickstart.main(args.rest + ["--store", args.store])
    return 0


def _cmd_dev(args):
    from tally.service import pulsar_local
    return pulsar_local.main_dev(args.rest)


def build_parser():
    parser = argparse.ArgumentParser(prog="tally", description="Tally, a streaming feature "
                                     "store on Apache Pulsar")
    commands = parser.add_subparsers(dest="command", required=True)

    get = commands.add_parser("get", help="look up features of entities in the online store")
    get.add_argument("view")
    get.add_argument("keys", nargs="+", metavar="key")
    get.add_argument("--store", default=DEFAULT_STORE, help=f"store path ({DEFAULT_STORE})")
    get.set_defaults(run=_cmd_get)

    quick = commands.add_parser("quickstart", help="run the news-reading example end to end "
                                "on a local broker", add_help=False)
    quick.add_argument("--store", default=DEFAULT_STORE)
    quick.set_defaults(run=_cmd_quickstart)

    dev = commands.add_parser("dev", help="run a local Pulsar broker in the foreground",
                              add_help=False)
    dev.set_defaults(run=_cmd_dev)
    return parser


def main(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "get":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    sys.exit(args.run(args))
