"""Commands over the stream: serve, bootstrap, training-set, create-topic."""
import functools
import json
import logging
import os
import signal
import sys
import time

from tally.core.errors import UsageError
from tally.service import config, logs


def add_commands(commands):
    _add_serve(commands)
    _add_bootstrap(commands)
    _add_training_set(commands)
    topic = commands.add_parser("create-topic", help="create a partitioned topic (state is "
                                "sharded by partition)")
    topic.add_argument("topic", help="the topic's name, e.g. read_events")
    topic.add_argument("--partitions", type=int, default=4, help="partitions (default: 4)")
    topic.add_argument("--admin", default=config.default("admin"),
                       help=f"Pulsar admin URL (default: {config.describe('admin')})")
    topic.set_defaults(run=cmd_create_topic)


def _add_store_options(parser):
    parser.add_argument("--pulsar", default=config.default("pulsar"),
                        help=f"broker service URL (default: {config.describe('pulsar')})")
    parser.add_argument("--store", default=config.default("store"),
                        help=f"online store path or URL (default: {config.describe('store')})")
    parser.add_argument("--checkpoints", default=config.default("checkpoints"),
                        help=f"checkpoint directory (default: {config.describe('checkpoints')})")


# -- tally serve ---------------------------------------------------------------

def _add_serve(commands):
    serve = commands.add_parser(
        "serve", help="run the streaming service (exactly-once ingestion into the online "
        "store)", description="One asyncio task per (view, partition): receive, fold, "
        "write the online store, checkpoint every few seconds. SIGTERM checkpoints and exits 0.")
    serve.add_argument("definitions", nargs="?",
                       help="a .py or .sql file of feature views (or use --registry)")
    serve.add_argument("--registry", metavar="PATH", help="follow the views applied to this "
                       "registry: new versions are computed alongside and promoted once "
                       "caught up (default: without a definitions file, "
                       f"{config.describe('registry')})")
    serve.add_argument("--views", help="comma-separated view names (default: all)")
    _add_store_options(serve)
    serve.add_argument("--name", help="consumer name of this process (default: host-pid)")
    serve.add_argument("--checkpoint-interval", type=float, metavar="SECONDS",
                       default=config.CHECKPOINT_INTERVAL_S,
                       help=f"seconds between checkpoints (default: {config.CHECKPOINT_INTERVAL_S})")
    serve.add_argument("--admin", metavar="URL", default=config.configured("admin"),
                       help="the broker's admin REST URL (e.g. http://127.0.0.1:8080): "
                       "versions without a checkpoint are then bootstrapped from history by "
                       "parallel readers, else they read it through their subscription "
                       "(default: $TALLY_ADMIN or tally.toml, else none)")
    serve.add_argument("--bootstrap-readers", type=int, metavar="N",
                       help="reader processes per bootstrap (default: the number of cores)")
    serve.add_argument("--metrics", default=config.default("metrics"), metavar="HOST:PORT",
                       help="Prometheus endpoint (/metrics, /health); 'off' disables it "
                       f"(default: {config.describe('metrics')})")
    serve.add_argument("--subscription-prefix", default=config.default("subscription_prefix"),
                       metavar="PREFIX",
                       help="first part of the subscription names (<prefix>.<view>.<state "
                       "hash>): give each deployment sharing a cluster its own "
                       f"(default: {config.describe('subscription_prefix')})")
    serve.add_argument("--log-format", choices=("text", "json"),
                       default=config.default("log_format"),
                       help="text, or json: one object per line (time, level, logger, "
                       "message and fields such as view and partition) for log shippers "
                       f"(default: {config.describe('log_format')})")
    serve.set_defaults(run=cmd_serve)


def cmd_serve(args):
    import uvloop

    from tally.core.definitions import FeatureService, FeatureView
    from tally.service.ingest import service as streaming
    from tally.service.registry import Registry, load_file

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: streaming.STOP_REQUESTED_DURING_STARTUP.set())
    if args.definitions and args.registry:
        raise UsageError("give a definitions file or --registry, not both")
    if not args.definitions and not args.registry:
        args.registry = config.default("registry")       # what `tally apply` wrote
        if not os.path.exists(args.registry):
            raise UsageError(f"no registry at {args.registry}: give a definitions file, "
                             "--registry PATH, or `tally apply` definitions first")
    wanted = args.views.split(",") if args.views else None
    views, services, registry = [], [], None
    if args.registry:
        registry = Registry(args.registry)
    else:
        definitions = load_file(args.definitions)
        views = [d for d in definitions if isinstance(d, FeatureView)]
        services = [d for d in definitions if isinstance(d, FeatureService)]
        if wanted:
            views = [v for v in views if v.name in wanted]
            missing = set(wanted) - {v.name for v in views}
            if missing:
                raise UsageError(f"no view named {sorted(missing)} in {args.definitions}")
    logs.configure(args.log_format)
    service = streaming.StreamingService(
        config.cluster(args.pulsar, args.admin), args.store, args.checkpoints, views=views,
        services=services, registry=registry,
        only_views=wanted, consumer_name=args.name,
        checkpoint_interval_s=args.checkpoint_interval,
        metrics_address=_address(args.metrics), bootstrap_readers=args.bootstrap_readers,
        subscription_prefix=args.subscription_prefix)
    logging.getLogger("tally.serve").info(
        "serving %s as consumer %r (pid %d) into store %s, subscriptions %s.*",
        [f"{name}@v{version}" for name, version in service.runners]
        if not registry else f"the views of registry {args.registry}", service.consumer_name,
        os.getpid(),
        args.store, args.subscription_prefix,
        extra={"consumer": service.consumer_name, "store": args.store})
    return uvloop.run(service.run())


def _address(text):
    if text == "off":
        return None
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


# -- tally bootstrap -------------------------------------------------------------

def _add_bootstrap(commands):
    bootstrap = commands.add_parser(
        "bootstrap", help="compute a view's state from all of history with parallel readers "
        "(archive, offloaded and BookKeeper ledgers) and hand it over to tally serve",
        description="Compute a view's state from all of its history (archive, offloaded and "
        "BookKeeper ledgers) with parallel readers, and hand it over to tally serve at an "
        "exact cut.")
    bootstrap.add_argument("target", help="a view name in the registry (its candidate, else "
                           "its current version), or a .py/.sql file of feature views")
    bootstrap.add_argument("--view", help="with a file: the view to compute (default: the "
                           "file's only view)")
    bootstrap.add_argument("--registry", default=None, metavar="PATH",
                           help=f"the registry (default: {config.describe('registry')})")
    bootstrap.add_argument("--version", type=int, help="with a file: the version number its "
                           "records are written under (default: 1)")
    bootstrap.add_argument("--candidate", action="store_true",
                           help="with a file: write the records as a candidate (not served "
                           "until promoted)")
    bootstrap.add_argument("--readers", type=int, default=os.cpu_count(), metavar="N",
                           help="reader processes (default: the number of cores)")
    bootstrap.add_argument("--archive", help="a Parquet archive older than the topic "
                           "(default: the source's archive)")
    _add_store_options(bootstrap)
    bootstrap.add_argument("--admin", default=config.default("admin"), metavar="URL",
                           help="the broker's admin REST URL, for ledger lists "
                           f"(default: {config.describe('admin')})")
    bootstrap.add_argument("--subscription-prefix", default=config.default("subscription_prefix"),
                           metavar="PREFIX", help="the subscription prefix of the tally serve "
                           "that takes over: its subscription is moved to the cut (default: "
                           f"{config.describe('subscription_prefix')})")
    bootstrap.add_argument("--quiet", action="store_true",
                           help="no progress bar (there is none when stderr is not a terminal)")
    bootstrap.set_defaults(run=cmd_bootstrap)


def cmd_bootstrap(args):
    from tally.service.history.bootstrap import Bootstrap
    from tally.service.ingest.checkpoint import CheckpointStore
    from tally.service.progress import bootstrap_bar, bootstrap_progress
    from tally.service.pulsar.topics import subscription_for
    from tally.service.store import open_store

    view, version, serving = _chosen_view(args)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    with open_store(args.store) as store, bootstrap_bar(args.quiet) as bar:
        job = Bootstrap(view, config.cluster(args.pulsar, args.admin), store,
                        CheckpointStore(args.checkpoints),
                        subscription_for(view, args.subscription_prefix), version=version,
                        serving=serving, readers=args.readers, archive=args.archive,
                        progress=bootstrap_progress(bar))
        report = job.run()
    for warning in job.warnings():
        print(f"tally bootstrap: warning: {warning}", file=sys.stderr)
    print(json.dumps(report, sort_keys=True))
    return 0


def _chosen_view(args):
    """(view, version, serving) named by the command line."""
    from tally.core.definitions import FeatureView
    from tally.service.registry import Registry, load_file
    if os.path.isfile(args.target):
        views = [d for d in load_file(args.target) if isinstance(d, FeatureView)]
        if args.view:
            views = [v for v in views if v.name == args.view]
        if len(views) != 1:
            raise UsageError(f"name one view with --view (found {[v.name for v in views]})")
        return views[0], args.version or 1, not args.candidate
    path = args.registry or config.default("registry")
    if not os.path.exists(path):
        raise UsageError(f"{args.target!r} is neither a file nor, with no registry at {path}, "
                         "a view name; apply definitions first or name --registry")
    with Registry(path) as registry:
        for deployment in registry.deployments():
            if deployment.name == args.target:
                chosen = deployment.candidate or deployment.current
                return chosen.definition, chosen.version, chosen is deployment.current
    raise UsageError(f"no deployed view named {args.target!r} in {path}")


# -- tally training-set ----------------------------------------------------------

def _add_training_set(commands):
    training = commands.add_parser(
        "training-set", help="point-in-time training data: the spine's rows joined with "
        "feature values as of each row's time, replayed by the online engine")
    training.add_argument("--spine", required=True, metavar="FILE",
                          help="Parquet file: entity key column(s), "
                          "a timestamp column (epoch ms) and labels")
    training.add_argument("--features", required=True, metavar="VIEW:FEATURE,...",
                          help="comma-separated view:feature (or view) references")
    training.add_argument("--definitions", action="append", metavar="FILE",
                          help="a .py or .sql file of views, repeatable (default: none, the "
                          "views come from --registry)")
    training.add_argument("--registry", metavar="PATH", help="resolve views in this registry "
                          "(default: none, only the --definitions files)")
    training.add_argument("--pulsar", metavar="URL", help="read each source's topic from this "
                          "broker, earliest to now (default: none, the sources' archives only)")
    training.add_argument("--admin", metavar="URL", help="the broker's admin REST URL: read "
                          "the topics with parallel reader processes, as a bootstrap does "
                          "(default: none, one reader in this process)")
    training.add_argument("--readers", type=int, metavar="N", help="reader processes with "
                          "--admin (default: the number of cores)")
    training.add_argument("--out", required=True, metavar="FILE",
                          help="the Parquet file to write")
    training.add_argument("--timestamp-column", metavar="COLUMN", help="spine time column "
                          "(default: the first of ts, timestamp, event_timestamp and event_time)")
    training.add_argument("--key", action="append", metavar="ENTITY=COLUMN",
                          help="the spine column holding an entity's keys, repeatable "
                          "(default: the column named after the entity)")
    training.add_argument("--spill-dir", metavar="DIR", help="where to spill sorted runs "
                          "(default: a temporary directory)")
    training.set_defaults(run=cmd_training_set)


def cmd_training_set(args):
    """Build a point-in-time training set into a Parquet file."""
    import pyarrow.parquet as pq

    from tally.core.definitions import FeatureView
    from tally.service.progress import advance, progress_bar
    from tally.service.registry import load_file
    from tally.service.training import PulsarTopic, training_set
    started = time.monotonic()
    views = [d for path in args.definitions or () for d in load_file(path)
             if isinstance(d, FeatureView)]
    keys = dict(item.split("=", 1) for item in args.key or ())
    pulsar = None
    if args.pulsar:     # with --admin, read by parallel readers
        pulsar = PulsarTopic(config.cluster(args.pulsar, args.admin), readers=args.readers)
    with progress_bar("rows") as bar:
        table = training_set(args.spine, [f for f in args.features.split(",") if f],
                             views=views, registry=args.registry, pulsar=pulsar,
                             timestamp_column=args.timestamp_column, keys=keys,
                             spill_dir=args.spill_dir, progress=functools.partial(advance, bar))
    pq.write_table(table, args.out)
    seconds = time.monotonic() - started
    print(f"wrote {table.num_rows:,} rows x {table.num_columns} columns to {args.out} in "
          f"{seconds:.1f} s ({table.num_rows / max(seconds, 1e-9):,.0f} rows/s)",
          file=sys.stderr)
    return 0


# -- tally create-topic ----------------------------------------------------------

def cmd_create_topic(args):
    from tally.service.pulsar.admin import Admin
    Admin(config.cluster(admin=args.admin)).create_partitioned_topic(args.topic,
                                                                     args.partitions)
    print(f"created {args.topic} with {args.partitions} partitions")
    return 0
