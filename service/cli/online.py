"""Commands over the online store: ``tally get`` and ``tally lookup-server``."""
import json

from tally.core.errors import UsageError
from tally.service import config


def add_commands(commands):
    get = commands.add_parser(
        "get", help="look up features of entities in the online store",
        description="tally get VIEW KEY... prints each entity's record; tally get --service "
        "NAME ENTITY=KEY... prints the feature vector of one request row, e.g. tally get "
        "--service recommend user=42 article=7")
    get.add_argument("view", nargs="?", help="the view (omit it with --service)")
    get.add_argument("keys", nargs="+", metavar="key",
                     help="entity keys (with --service: entity=key pairs)")
    get.add_argument("--service", metavar="NAME", help="read this feature service's vector: "
                     "the keys are entity=key pairs (default: none, read the view)")
    get.add_argument("--store", default=config.default("store"),
                     help=f"store path or URL (default: {config.describe('store')})")
    get.set_defaults(run=cmd_get)

    lookups = commands.add_parser("lookup-server", help="serve lookups over msgpack/TCP and "
                                  "HTTP/JSON (see tally.service.lookup.server)")
    lookups.add_argument("--store", default=config.default("store"),
                         help=f"store path or URL (default: {config.describe('store')})")
    lookups.add_argument("--host", default=config.LOOKUP_HOST,
                         help=f"address to bind (default: {config.LOOKUP_HOST})")
    lookups.add_argument("--port", type=int, default=config.LOOKUP_PORT,
                         help=f"msgpack/TCP port (default: {config.LOOKUP_PORT}; 0: any)")
    lookups.add_argument("--http-port", type=int, default=config.LOOKUP_HTTP_PORT,
                         help=f"HTTP port (default: {config.LOOKUP_HTTP_PORT}; 0: any)")
    lookups.add_argument("--token", default=None, help="bearer token both ports require "
                         "(default: $TALLY_TOKEN, which keeps it out of the process list)")
    lookups.add_argument("--max-frame-bytes", type=int, default=1 << 20,
                         help="largest request frame or body (default: 1 MiB)")
    lookups.add_argument("--max-batch", type=int, default=1000,
                         help="keys per request (default: 1000)")
    lookups.add_argument("--idle-timeout", type=float, default=60.0,
                         help="close a connection that sends no request for this many "
                         "seconds (default: 60)")
    lookups.add_argument("--max-connections", type=int, default=1024,
                         help="connections each port serves at once; one more is refused "
                         "(default: 1024)")
    lookups.set_defaults(run=cmd_lookup_server)


def cmd_get(args):
    from tally.service.store import open_store
    if args.service:
        return _get_service(args)
    if not args.view or "\0" in args.view:
        raise UsageError(f"{args.view!r} is not a view name; `tally list` shows the views")
    with open_store(args.store, readonly=True) as store:
        schema = store.schema(args.view)
        keys = [_key(k, schema.key_type) for k in args.keys]
        for key, record in zip(keys, store.get_many(args.view, keys)):
            print(json.dumps({"key": key, "features": record}))
    return 0


def _get_service(args):
    from tally.core.serving import ServedService
    from tally.service.store import open_store
    pairs = ([args.view] if args.view else []) + args.keys
    if not all("=" in p for p in pairs):
        raise UsageError("with --service, give entity=key pairs, e.g. user=42 article=7")
    texts = dict(p.split("=", 1) for p in pairs)
    with open_store(args.store, readonly=True) as store:
        served = ServedService.from_bytes(args.service, store.service(args.service))
        row = {}
        for view, (entity, _) in served.views.items():
            if entity not in texts:
                raise UsageError(f"feature service {args.service!r} needs a key for "
                                 f"{entity!r}: add {entity}=KEY")
            row[entity] = _key(texts[entity], store.schema(view).key_type)
        print(json.dumps({"row": row, "features": served.read(store, [row])[0]}))
    return 0


def _key(text, key_type):
    if key_type == "string":
        return text
    try:
        key = int(text)
    except ValueError:
        raise UsageError(f"bad key {text!r}: the view has int64 keys") from None
    if not -2**63 <= key < 2**63:
        raise UsageError(f"bad key {text}: it does not fit in an int64")
    return key


def cmd_lookup_server(args):
    from tally.service.lookup.server import serve_lookups
    if args.max_connections < 1 or not args.idle_timeout > 0:
        raise UsageError("--max-connections must be at least 1 and --idle-timeout above 0")
    return serve_lookups(args.store, args.host, args.port, args.http_port, args.token,
                         args.max_frame_bytes, args.max_batch,
                         idle_timeout=args.idle_timeout, max_connections=args.max_connections)
