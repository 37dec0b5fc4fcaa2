"""``tally ui``: the read-only web UI (``tally.service.ui``)."""
from tally.service import config


def add_commands(commands):
    ui = commands.add_parser(
        "ui", help="browse the registry, online values and freshness in a web browser",
        description="Serve a read-only web UI: search, views with their versions and "
        "diffs, lineage, freshness from tally serve's metrics, online values through the "
        "lookup path (see tally.service.ui).")
    ui.add_argument("--registry", default=config.default("registry"),
                    help=f"registry file (default: {config.describe('registry')})")
    ui.add_argument("--store", default=config.default("store"),
                    help=f"store path or URL (default: {config.describe('store')})")
    ui.add_argument("--metrics", default=config.default("metrics"), metavar="HOST:PORT",
                    help="tally serve's metrics endpoint, sampled for freshness; 'off' for "
                    f"none (default: {config.describe('metrics')})")
    ui.add_argument("--scrape-interval", type=float, default=10.0,
                    help="seconds between samples of the metrics (default: 10)")
    ui.add_argument("--host", default=config.LOOKUP_HOST,
                    help=f"address to bind (default: {config.LOOKUP_HOST})")
    ui.add_argument("--port", type=int, default=8257, help="HTTP port (default: 8257; 0: any)")
    ui.add_argument("--token", default=None, help="bearer token every page requires "
                    "(default: $TALLY_TOKEN, which keeps it out of ps)")
    ui.set_defaults(run=cmd_ui)


def cmd_ui(args):
    from tally.service.ui.server import serve_ui
    metrics = None if args.metrics == "off" else args.metrics
    return serve_ui(args.registry, args.store, metrics, args.host, args.port, args.token,
                    args.scrape_interval)
