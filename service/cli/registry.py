"""The registry commands: apply, plan, list, search, describe, diff,
rollback, lineage, versions, changes, promote."""
import argparse
import json
import os

from tally.service import config

# the kinds of definitions (tally.service.registry.db.KINDS, without importing it)
KINDS = ("view", "service", "source", "entity")

def _registry(args):
    from tally.service.registry import Registry, RegistryError
    path = args.registry or config.default("registry")
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
                for source in [d.source] + [j.dimension for j in d.joins]:
                    sources.setdefault(source.name, source)
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
            elif info.kind == "service":
                details = f"{len(d.features)} features of {', '.join(d.views)}"
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
                               source=args.source, topic=args.topic, kind=args.kind,
                               view=args.view)
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
            from tally.core.sql import service_to_sql, source_to_sql, view_to_sql
            d = description.info.definition
            if description.info.kind == "service":
                print(service_to_sql(d) + ";")
            elif description.info.kind == "view":
                for source in [d.source] + [j.dimension for j in d.joins]:
                    print(source_to_sql(source) + ";\n")
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
    _serve_in_store(args, info)
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
            raise SystemExit("tally lineage: name a view, view.feature, service or source, or pass "
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
    _serve_in_store(args, info)
    return 0


def _add_store_option(parser):
    parser.add_argument("--store", default=None, help="also switch this online store (path "
                        "or URL) to serve that version now, if it holds it (default: the "
                        "running tally serve switches it when it next polls the registry)")


def _serve_in_store(args, info):
    """With --store: point the store's readers at the version at once."""
    if not args.store or info.kind != "view":
        return
    from tally.service.store import StoreError, open_store
    with open_store(args.store) as store:
        try:
            store.promote(info.name, info.version)
        except StoreError as error:
            print(f"store {args.store}: not switched ({error}); `tally serve` computes the "
                  "version and serves it")
            return
    print(f"store {args.store}: serves {info.name} v{info.version}")


def add_commands(commands):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, metavar="PATH",
                        help=f"registry file (default: {config.describe('registry')})")
    common.add_argument("--json", action="store_true", help="print JSON")

    def add(name, run, help_text):
        sub = commands.add_parser(name, parents=[common], help=help_text,
                                  description=help_text)
        sub.set_defaults(run=run)
        return sub

    apply = add("apply", _cmd_apply, "apply definition files (.py or .sql): store new "
                "versions of changed definitions")
    apply.add_argument("files", nargs="+", metavar="file", help="a .py or .sql file")
    plan = add("plan", _cmd_plan, "show what apply would do (a dry run)")
    plan.add_argument("files", nargs="+", metavar="file", help="a .py or .sql file")
    listing = add("list", _cmd_list, "list the current definitions (and candidates)")
    listing.add_argument("--kind", choices=KINDS, help="only this kind (default: all)")
    search = add("search", _cmd_search, "search definitions by name, tag, owner, entity, "
                 "source or topic")
    search.add_argument("text", nargs="?", help="text in a name, feature name or description")
    for option, what in (("tag", "with"), ("owner", "of"), ("entity", "of"),
                         ("source", "reading"), ("topic", "reading")):
        search.add_argument(f"--{option}", help=f"only definitions {what} this {option} "
                            "(default: any)")
    search.add_argument("--view", help="the feature services reading this view "
                        "(default: any)")
    search.add_argument("--kind", choices=KINDS, help="only this kind (default: all)")
    describe = add("describe", _cmd_describe, "describe a definition (name, name@vN, "
                   "kind:name)")
    describe.add_argument("ref", help="name, name@vN or kind:name")
    describe.add_argument("--kind", choices=KINDS, help="the kind, when several share the "
                          "name (default: the name's only kind)")
    describe.add_argument("--sql", action="store_true", help="print the definition as SQL")
    diff = add("diff", _cmd_diff, "differences between two versions (name@v1 name@v2), or "
               "of one version against the one before")
    diff.add_argument("ref", help="name or name@vN")
    diff.add_argument("other", nargs="?", help="the version to compare it with, name@vN "
                      "(default: for name@vN the version before; for a name its candidate, "
                      "else the version before)")
    rollback = add("rollback", _cmd_rollback, "re-point a name's current version (by "
                   "default to the previous one)")
    rollback.add_argument("ref", help="name or kind:name (name@vN: roll back to vN)")
    rollback.add_argument("--to", help="the version to make current, e.g. v2 (default: the "
                          "newest older version that has been current)")
    _add_store_option(rollback)
    lineage = add("lineage", _cmd_lineage, "lineage: feature -> view -> source -> topic -> "
                  "fields, or the features reading a topic/source")
    lineage.add_argument("ref", nargs="?", help="view, view.feature or source")
    lineage.add_argument("--topic", help="the features reading this topic (default: none, "
                         "the lineage of ref)")
    lineage.add_argument("--source", help="the features reading this source (default: none, "
                         "the lineage of ref)")
    lineage.add_argument("--field", help="... only those reading this field (default: any)")
    lineage.add_argument("--all-versions", action="store_true",
                         help="include retired and cancelled versions")
    versions = add("versions", _cmd_versions, "every version of a name")
    versions.add_argument("ref", help="name or kind:name")
    changes = add("changes", _cmd_changes, "the registry's change log (what the service "
                  "polls)")
    changes.add_argument("--since", type=int, default=0, metavar="N",
                         help="only the changes after change number N (default: 0, all)")
    promote = add("promote", _cmd_promote, "make a candidate current (what the service does "
                  "when it has caught up)")
    promote.add_argument("ref", help="the candidate, e.g. user_reading@v3")
    _add_store_option(promote)
