"""``python -m tally.bench <name> [--quick]``: run a benchmark; the last line
printed is one JSON object of figures."""
import argparse
import importlib
import json
import sys

BENCHMARKS = {
    "broker": "tally.bench.broker",
    "ingest": "tally.bench.ingest",
    "freshness": "tally.bench.freshness",
    "core": "tally.bench.core",
    "training": "tally.bench.training",
    "lookup": "tally.bench.lookup",
    "bootstrap": "tally.bench.bootstrap",
    "load": "tally.bench.load",
    "record": "tally.bench.record",
    "services": "tally.bench.services",
    "aerospike_write": "tally.bench.aerospike_write",
    "enrich": "tally.bench.enrich",
    "keyindex": "tally.bench.keyindex",
    "flink": "tally.bench.flink",
    "setup-peers": "tally.bench.setup_peers",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tally.bench")
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(BENCHMARKS[args.name])
    figures = module.run(quick=args.quick, argv=rest)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
