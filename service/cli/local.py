"""Commands on this machine: ``tally dev`` (a local broker), ``tally quickstart``
and ``tally init`` (a new project)."""
import signal
import sys
import threading

from tally.core.errors import UsageError
from tally.service import config

# events `tally quickstart` produces unless --events says otherwise, by --model
QUICKSTART_EVENTS = {None: 500_000, "recommend": 200_000}


def add_commands(commands):
    dev = commands.add_parser("dev", help="run a local Pulsar broker in the foreground",
                              description="Run a local Apache Pulsar standalone broker on "
                              "127.0.0.1 until Ctrl-C or SIGTERM.")
    dev.add_argument("--port", type=int, default=None,
                     help="broker port (default: 6650, or a free port if it is busy)")
    dev.add_argument("--web-port", type=int, default=None,
                     help="admin/HTTP port (default: 8080, or a free port if it is busy)")
    dev.add_argument("--data-dir", metavar="DIR", default=None,
                     help="keep data here across runs (default: a temporary directory, "
                     "removed on exit)")
    dev.add_argument("--heap", default="512m", help="JVM heap (default: 512m)")
    dev.add_argument("--max-entries-per-ledger", type=int, default=50000,
                     help="ledger rollover, in entries (default: 50000)")
    dev.add_argument("--tiered-storage", nargs="?", const="s3", choices=["s3", "filesystem"],
                     help="offload ledgers (PUT .../offload), dropping their BookKeeper "
                     "copies: to an S3 bucket served on loopback by s3proxy (s3, what the "
                     "flag alone means), or to <data dir>/offloaded (filesystem) (default: "
                     "no tiered storage)")
    dev.add_argument("--timeout", type=float, default=180, metavar="SECONDS",
                     help="seconds to wait for the broker to become ready (default: 180)")
    dev.set_defaults(run=cmd_dev)

    quick = commands.add_parser(
        "quickstart", help="run the news-reading example end to end on a local broker",
        description="Start a local broker (Apache Pulsar, fetched from Maven Central the "
        "first time), produce reading events, compute the example's features with the "
        "partition workers tally serve runs, and print sample lookups and the events/s "
        "reached. With --model recommend: the recommendation model's three views (the "
        "reads joined with an articles changelog), its feature service's vectors and a "
        "point-in-time training set written to a temporary Parquet file.")
    quick.add_argument("--events", type=int, metavar="N",
                       help=f"reading events to produce (default: {QUICKSTART_EVENTS[None]:,}; "
                       f"{QUICKSTART_EVENTS['recommend']:,} with --model recommend)")
    quick.add_argument("--users", type=int, default=10_000, metavar="N",
                       help="distinct users (default: 10,000)")
    quick.add_argument("--partitions", type=int, default=4, metavar="N",
                       help="partitions of the reading events' topic (default: 4)")
    quick.add_argument("--store", default=config.default("store"), metavar="PATH",
                       help=f"online store directory (default: {config.describe('store')})")
    quick.add_argument("--model", choices=["recommend"],
                       help="run the recommendation model instead (default: the news-reading "
                       "example's user_reading view)")
    quick.set_defaults(run=cmd_quickstart)

    init = commands.add_parser("init", help=f"start a project: {config.PROJECT_FILE}, a "
                               "definitions folder with the example, a README",
                               description="Scaffold a project in DIR; existing files are "
                               "never overwritten.")
    init.add_argument("directory", nargs="?", default=".", metavar="DIR",
                      help="the project directory (default: the working directory)")
    init.set_defaults(run=cmd_init)


def cmd_init(args):
    from tally.service.scaffold import init_project
    for path in init_project(args.directory):
        print(f"wrote {path}")
    return 0


def cmd_quickstart(args):
    events = QUICKSTART_EVENTS[args.model] if args.events is None else args.events
    if args.model == "recommend":
        from tally.service import quickstart_model
        quickstart_model.run(events, args.users, n_partitions=args.partitions,
                             store_path=args.store)
        return 0
    from tally.service import quickstart
    quickstart.run(events, args.users, args.partitions, args.store)
    return 0


def cmd_dev(args):
    from tally.service.pulsar.distribution import PULSAR_VERSION, PulsarStartError
    from tally.service.pulsar.local import (DEFAULT_BROKER_PORT, DEFAULT_WEB_PORT, LocalPulsar,
                                            is_port_free)
    for flag, port in (("--port", args.port), ("--web-port", args.web_port)):
        if port is not None and not is_port_free(port):
            raise UsageError(f"{flag} {port}: port is already in use")
    broker_port = args.port or _default_port_if_free(DEFAULT_BROKER_PORT)
    web_port = args.web_port or _default_port_if_free(DEFAULT_WEB_PORT)
    pulsar = LocalPulsar(data_dir=args.data_dir, broker_port=broker_port,
                         web_port=web_port, heap=args.heap,
                         max_entries_per_ledger=args.max_entries_per_ledger,
                         tiered_storage=args.tiered_storage)
    stop_requested = threading.Event()
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    try:
        print(f"starting Pulsar {PULSAR_VERSION} ...", flush=True)
        pulsar.start(timeout=args.timeout)
        print(f"Pulsar is ready in {pulsar.startup_seconds:.1f} s\n"
              f"  service URL: {pulsar.service_url}\n"
              f"  admin URL:   {pulsar.admin_url}\n"
              f"  data dir:    {pulsar.data_dir}"
              f"{'' if args.data_dir else ' (removed on exit)'}\n"
              f"  broker log:  {pulsar.log_file}\n"
              + _tier_banner(pulsar) +
              "Ctrl-C to stop.", flush=True)
        while not stop_requested.wait(1.0):
            if not pulsar.is_running:
                print("the Pulsar JVM exited\n" + pulsar.log_tail(), file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    except PulsarStartError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        print("stopping Pulsar ...", flush=True)
        pulsar.stop()
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def _tier_banner(pulsar):
    """Where offloaded ledgers go, for the banner of `tally dev`."""
    if pulsar.tiered_storage == "filesystem":
        return f"  offloaded:   {pulsar.offload_dir}\n"
    if pulsar.tiered_storage == "s3":
        store = pulsar.object_store
        return (f"  offloaded:   s3://{store.bucket} at {store.endpoint} (region {store.region}, "
                f"key {store.access_key}, secret {store.secret_key})\n")
    return ""


def _default_port_if_free(default: int) -> int | None:
    """`default` if free, else None (LocalPulsar then picks any free port)."""
    from tally.service.pulsar.local import is_port_free
    if is_port_free(default):
        return default
    print(f"port {default} is busy; picking a free one", file=sys.stderr)
    return None
