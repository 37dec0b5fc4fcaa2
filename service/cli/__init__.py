"""The ``tally`` command line."""
import argparse
import json
import os
import sys

DEFAULT_STORE = os.environ.get("TALLY_STORE", os.path.join(".tally", "store"))


def _cmd_get(args):
    from tally.service.store.lmdb import LmdbStore, StoreError
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


def _cmd_lookup_server(args):
    from tally.service.store.lmdb import StoreError
    from tally.service.lookup.server import serve_lookups
    try:
        return serve_lookups(args.store, args.host, args.port, args.http_port, args.token,
                             args.max_frame_bytes, args.max_batch)
    except (StoreError, OSError) as error:
        print(f"tally lookup-server: {error}", file=sys.stderr)
        return 2


def _cmd_quickstart(args):
    from tally.service import quickstart
    quickstart.main(args.rest + ["--store", args.store])
    return 0


def _cmd_dev(args):
    from tally.service.pulsar import local as pulsar_local
    return pulsar_local.main_dev(args.rest)


def _cmd_create_topic(args):
    import urllib.error
    import urllib.request

    from tally.service.pulsar.local import topic_rest_path
    url = f"{args.admin.rstrip('/')}{topic_rest_path(args.topic)}/partitions"
    request = urllib.request.Request(url, data=str(args.partitions).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as error:
        print(f"tally create-topic: {url}: HTTP {error.code}: "
              f"{error.read().decode(errors='replace')[:300]}", file=sys.stderr)
        return 2
    except urllib.error.URLError as error:
        print(f"tally create-topic: cannot reach {args.admin}: {error.reason}", file=sys.stderr)
        return 2
    print(f"created {args.topic} with {args.partitions} partitions")
    return 0


def _cmd_serve(args):
    from tally.service.ingest import service as serve
    return serve.main(args.rest)


def _cmd_bootstrap(args):
    from tally.service.history import bootstrap
    return bootstrap.main(args.rest)


def _cmd_training_set(args):
    """Build a point-in-time training set (tally.core.training) into a Parquet file."""
    import time

    import pyarrow.parquet as pq

    from tally.core.definitions import DefinitionError, FeatureView
    from tally.core.errors import TrainingSetError
    from tally.service.training import training_set
    from tally.service.registry import RegistryError, load_file
    started = time.monotonic()

    def bar(done, total):
        width = 30
        filled = width * done // max(total, 1)
        print(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} rows "
              f"{time.monotonic() - started:6.1f} s", end="", file=sys.stderr, flush=True)
    try:
        views = [d for path in args.definitions or () for d in load_file(path)
                 if isinstance(d, FeatureView)]
        keys = dict(item.split("=", 1) for item in args.key or ())
        pulsar = args.pulsar
        if pulsar and args.admin:
            from tally.service.training import PulsarTopic
            pulsar = PulsarTopic(pulsar, admin_url=args.admin, readers=args.readers)
        table = training_set(args.spine, [f for f in args.features.split(",") if f],
                             views=views, registry=args.registry, pulsar=pulsar,
                             timestamp_column=args.timestamp_column, keys=keys,
                             spill_dir=args.spill_dir, progress=bar)
        pq.write_table(table, args.out)
    except (TrainingSetError, DefinitionError, RegistryError, OSError) as error:
        print(f"\ntally training-set: {error}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - started
    print(f"\nwrote {table.num_rows:,} rows x {table.num_columns} columns to {args.out} in "
          f"{seconds:.1f} s ({table.num_rows / max(seconds, 1e-9):,.0f} rows/s)",
          file=sys.stderr)
    return 0


# --- registry commands ------------------------------------------------------

def _registry(args):
    from tally.service.registry import Registry, RegistryError, default_path
    path = args.registry or default_path()
    if args.command not in ("apply", "plan") and not os.path.exists(path):
        raise RegistryError(f"no registry at {path}; apply definitions first (tally apply "
                            "<file.py|file.sql>), or name one with --registry or "
                            "$TALLY_REGISTRY")
    return Registry(path)


def _print_json(value):
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


def _load_files(registry, paths):
    """Definitions of the files, in order; .sql files may use the sources and
    entities of the registry and of the .py files given before them."""
    from tally.core.definitions import Entity, FeatureView, Source
    from tally.service.registry import load_file
    sources = {s.name: s for s in registry.current_definitions("source")}
    entities = {e.name: e for e in registry.current_definitions("entity")}
    definitions = []
    for path in sorted(paths, key=lambda p: p.endswith(".sql")):
        found = load_file(path, sources.values(), entities.values())
        for d in found:
            if isinstance(d, Source):
                sources[d.name] = d
            elif isinstance(d, Entity):
                entities[d.name] = d
            elif isinstance(d, FeatureView):
                sources.setdefault(d.source.name, d.source)
                entities.setdefault(d.entity.name, d.entity)
        definitions += found
    return definitions


def _cmd_apply(args, dry_run=False):
    registry = _registry(args)
    with registry:
        definitions = _load_files(registry, args.files)
        origin = ", ".join(os.path.basename(p) for p in args.files)
        plan = (registry.plan(definitions, origin=origin) if dry_run
                else registry.apply(definitions, origin=origin))
        if args.json:
            _print_json({"dry_run": dry_run, "deploy_mode": registry.deploy_mode,
                         "items": [item.to_dict() for item in plan]})
        else:
            if dry_run:
                print(f"Plan (dry run; nothing is stored) for {origin}:")
            print(plan)
            if not dry_run and registry.deploy_mode == "managed" and \
                    any(i.state == "candidate" and i.changed for i in plan):
                print("Candidates become current when the streaming service has caught up.")
    return 0


def _cmd_plan(args):
    return _cmd_apply(args, dry_run=True)


def _cmd_list(args):
    with _registry(args) as registry:
        infos = registry.list(args.kind)
        if args.json:
            _print_json([{k: v for k, v in i.to_dict().items() if k != "definition"}
                         for i in infos])
            return 0
        if not infos:
            print("The registry is empty; apply definitions with: tally apply <file.py|file.sql>")
            return 0
        rows = [("KIND", "NAME", "VERSION", "STATE", "OWNER", "TAGS", "DETAILS")]
        for info in infos:
            d = info.definition
            if info.kind == "view":
                details = f"{len(d.features)} features of {d.entity.name} from {d.source.name}"
            elif info.kind == "source":
                details = f"topic {d.topic}, {d.format}, {len(d.schema)} fields"
            else:
                details = f"{d.key_type} key"
            rows.append((info.kind, info.name, f"v{info.version}", info.state,
                         getattr(d, "owner", "") or "", ",".join(getattr(d, "tags", ())),
                         details))
        _print_table(rows)
    return 0


def _print_table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _cmd_search(args):
    with _registry(args) as registry:
        hits = registry.search(args.text, tag=args.tag, owner=args.owner, entity=args.entity,
                               source=args.source, topic=args.topic, kind=args.kind)
        if args.json:
            _print_json([h.to_dict() for h in hits])
        else:
            print(hits)
    return 0


def _cmd_describe(args):
    with _registry(args) as registry:
        description = registry.describe(args.ref, kind=args.kind)
        if args.json:
            _print_json(description.to_dict())
        elif args.sql:
            from tally.core.sql import source_to_sql, view_to_sql
            d = description.info.definition
            if description.info.kind == "view":
                print(source_to_sql(d.source) + ";\n")
                print(view_to_sql(d) + ";")
            elif description.info.kind == "source":
                print(source_to_sql(d) + ";")
            else:
                print(f"-- entities are implicit in SQL: GROUP BY a {d.key_type} column")
        else:
            print(description)
    return 0


def _cmd_diff(args):
    with _registry(args) as registry:
        diff = registry.diff(args.ref, args.other)
        if args.json:
            _print_json(diff.to_dict())
        else:
            print(diff)
    return 0


def _cmd_rollback(args):
    with _registry(args) as registry:
        info = registry.rollback(args.ref, to=args.to)
        if args.json:
            _print_json({k: v for k, v in info.to_dict().items() if k != "definition"})
        else:
            print(f"{info.kind} {info.name}: current version is now v{info.version} "
                  f"({info.hash[:12]})")
    return 0


def _cmd_lineage(args):
    with _registry(args) as registry:
        if args.topic or args.source:
            rows = registry.readers(topic=args.topic, source=args.source, field=args.field,
                                    all_versions=args.all_versions)
            what = f"topic {args.topic}" if args.topic else f"source {args.source}"
            title = f"Features reading {what}" + (f", field {args.field}" if args.field else "")
        elif args.ref:
            info = registry.resolve(args.ref)
            if info.kind == "source":
                rows = registry.readers(source=info.name, field=args.field,
                                        all_versions=args.all_versions)
                title = f"Features reading source {info.name} (topic {info.definition.topic})"
            else:
                rows = registry.lineage(args.ref)
                title = f"Lineage of {args.ref}"
        else:
            raise SystemExit("tally lineage: name a view, view.feature or source, or pass "
                             "--topic/--source")
        if args.json:
            _print_json([r.to_dict() for r in rows])
            return 0
        print(f"{title}:")
        if not rows:
            print("  (none)")
        for row in rows:
            print(f"  {row}")
    return 0


def _cmd_versions(args):
    with _registry(args) as registry:
        infos = registry.versions(args.ref)
        if args.json:
            _print_json([{k: v for k, v in i.to_dict().items() if k != "definition"}
                         for i in infos])
        else:
            for info in infos:
                print(f"v{info.version:<3} {info.state:9} {info.hash[:12]}  {info.created_at} "
                      f"{info.created_by}" + (f"  {info.origin}" if info.origin else ""))
    return 0


def _cmd_changes(args):
    with _registry(args) as registry:
        changes = registry.changes(args.since)
        if args.json:
            _print_json([c.to_dict() for c in changes])
        else:
            for change in changes:
                print(change)
    return 0


def _cmd_promote(args):
    with _registry(args) as registry:
        kind, name, version, _ = registry._parse_ref(args.ref)
        if version is None:
            raise SystemExit("tally promote: pin the candidate, e.g. user_reading@v3")
        info = registry.promote(name, version, kind=kind or "view")
        print(f"{info.kind} {info.name}: current version is now v{info.version}")
    return 0


def _registry_commands(commands):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, metavar="PATH",
                        help="registry file (default: $TALLY_REGISTRY or .tally/registry.db)")
    common.add_argument("--json", action="store_true", help="print JSON")

    def add(name, run, help_text):
        sub = commands.add_parser(name, parents=[common], help=help_text,
                                  description=help_text)
        sub.set_defaults(run=run)
        return sub

    apply = add("apply", _cmd_apply, "apply definition files (.py or .sql): store new "
                "versions of changed definitions")
    apply.add_argument("files", nargs="+", metavar="file")
    plan = add("plan", _cmd_plan, "show what apply would do (a dry run)")
    plan.add_argument("files", nargs="+", metavar="file")
    listing = add("list", _cmd_list, "list the current definitions (and candidates)")
    listing.add_argument("--kind", choices=("view", "source", "entity"))
    search = add("search", _cmd_search, "search definitions by name, tag, owner, entity, "
                 "source or topic")
    search.add_argument("text", nargs="?", help="text in a name, feature name or description")
    for option in ("tag", "owner", "entity", "source", "topic"):
        search.add_argument(f"--{option}")
    search.add_argument("--kind", choices=("view", "source", "entity"))
    describe = add("describe", _cmd_describe, "describe a definition (name, name@vN, "
                   "kind:name)")
    describe.add_argument("ref")
    describe.add_argument("--kind", choices=("view", "source", "entity"))
    describe.add_argument("--sql", action="store_true", help="print the definition as SQL")
    diff = add("diff", _cmd_diff, "differences between two versions (name@v1 name@v2), or "
               "of one version against the one before")
    diff.add_argument("ref")
    diff.add_argument("other", nargs="?")
    rollback = add("rollback", _cmd_rollback, "re-point a name's current version (by "
                   "default to the previous one)")
    rollback.add_argument("ref")
    rollback.add_argument("--to", help="the version to make current, e.g. v2")
    lineage = add("lineage", _cmd_lineage, "lineage: feature -> view -> source -> topic -> "
                  "fields, or the features reading a topic/source")
    lineage.add_argument("ref", nargs="?", help="view, view.feature or source")
    lineage.add_argument("--topic", help="the features reading this topic")
    lineage.add_argument("--source", help="the features reading this source")
    lineage.add_argument("--field", help="... only those reading this field")
    lineage.add_argument("--all-versions", action="store_true",
                         help="include retired and cancelled versions")
    versions = add("versions", _cmd_versions, "every version of a name")
    versions.add_argument("ref")
    changes = add("changes", _cmd_changes, "the registry's change log (what the service "
                  "polls)")
    changes.add_argument("--since", type=int, default=0)
    promote = add("promote", _cmd_promote, "make a candidate current (what the service does "
                  "when it has caught up)")
    promote.add_argument("ref", help="the candidate, e.g. user_reading@v3")


REGISTRY_COMMANDS = ("apply", "plan", "list", "search", "describe", "diff", "rollback",
                     "lineage", "versions", "changes", "promote")


def build_parser():
    parser = argparse.ArgumentParser(prog="tally", description="Tally, a streaming feature "
                                     "store on Apache Pulsar")
    commands = parser.add_subparsers(dest="command", required=True)

    get = commands.add_parser("get", help="look up features of entities in the online store")
    get.add_argument("view")
    get.add_argument("keys", nargs="+", metavar="key")
    get.add_argument("--store", default=DEFAULT_STORE, help=f"store path ({DEFAULT_STORE})")
    get.set_defaults(run=_cmd_get)

    lookups = commands.add_parser("lookup-server", help="serve lookups over msgpack/TCP and "
                                  "HTTP/JSON (see tally.service.lookup.server)")
    lookups.add_argument("--store", default=DEFAULT_STORE, help=f"store path ({DEFAULT_STORE})")
    lookups.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    lookups.add_argument("--port", type=int, default=8255, help="msgpack/TCP port (8255; 0: any)")
    lookups.add_argument("--http-port", type=int, default=8256, help="HTTP port (8256; 0: any)")
    lookups.add_argument("--token", default=None, help="bearer token both ports require "
                         "(default: $TALLY_TOKEN, which keeps it out of `ps`)")
    lookups.add_argument("--max-frame-bytes", type=int, default=1 << 20)
    lookups.add_argument("--max-batch", type=int, default=1000, help="keys per request (1000)")
    lookups.set_defaults(run=_cmd_lookup_server)

    quick = commands.add_parser("quickstart", help="run the news-reading example end to end "
                                "on a local broker", add_help=False)
    quick.add_argument("--store", default=DEFAULT_STORE)
    quick.set_defaults(run=_cmd_quickstart)

    dev = commands.add_parser("dev", help="run a local Pulsar broker in the foreground",
                              add_help=False)
    dev.set_defaults(run=_cmd_dev)

    topic = commands.add_parser("create-topic", help="create a partitioned topic (state is "
                                "sharded by partition)")
    topic.add_argument("topic")
    topic.add_argument("--partitions", type=int, default=4)
    topic.add_argument("--admin", default="http://127.0.0.1:8080", help="Pulsar admin URL")
    topic.set_defaults(run=_cmd_create_topic)

    serve = commands.add_parser("serve", help="run the streaming service (exactly-once "
                                "ingestion into the online store)", add_help=False)
    serve.set_defaults(run=_cmd_serve)

    bootstrap = commands.add_parser(
        "bootstrap", help="compute a view's state from all of history with parallel readers "
        "(archive, offloaded and BookKeeper ledgers) and hand it over to tally serve",
        add_help=False)
    bootstrap.set_defaults(run=_cmd_bootstrap)

    training = commands.add_parser(
        "training-set", help="point-in-time training data: the spine's rows joined with "
        "feature values as of each row's time, replayed by the online engine")
    training.add_argument("--spine", required=True, help="Parquet file: entity key column(s), "
                          "a timestamp column (epoch ms) and labels")
    training.add_argument("--features", required=True, metavar="VIEW:FEATURE,...",
                          help="comma-separated view:feature (or view) references")
    training.add_argument("--definitions", action="append", metavar="FILE",
                          help="a .py or .sql file of views (repeatable)")
    training.add_argument("--registry", metavar="PATH", help="resolve views in this registry")
    training.add_argument("--pulsar", metavar="URL", help="read each source's topic from this "
                          "broker (earliest to now); without it, sources need an archive")
    training.add_argument("--admin", metavar="URL", help="the broker's admin REST URL: read "
                          "the topics with parallel reader processes, as a bootstrap does")
    training.add_argument("--readers", type=int, help="reader processes with --admin "
                          "(default: the number of cores)")
    training.add_argument("--out", required=True, help="the Parquet file to write")
    training.add_argument("--timestamp-column", help="spine time column (default ts)")
    training.add_argument("--key", action="append", metavar="ENTITY=COLUMN",
                          help="the spine column holding an entity's keys")
    training.add_argument("--spill-dir", help="where to spill sorted runs (default: temp)")
    training.set_defaults(run=_cmd_training_set)
    _registry_commands(commands)
    return parser


def main(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("quickstart", "dev", "serve", "bootstrap"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    if args.command in REGISTRY_COMMANDS:
        sys.exit(_run_registry_command(args))
    sys.exit(args.run(args))


def _run_registry_command(args):
    """Run a registry command; refusals and errors become one line on stderr."""
    from tally.core.definitions import DefinitionError
    from tally.service.registry import RegistryError
    try:
        return args.run(args)
    except DefinitionError as error:
        print(f"tally {args.command}: refused: {error}", file=sys.stderr)
        return 1
    except RegistryError as error:
        print(f"tally {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    main()
