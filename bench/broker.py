"""How long the local Pulsar broker takes to become ready (the admin API lists
``public/default``), from a fresh data directory with the distribution cached."""
import argparse
import statistics
import time

from tally.service.pulsar.distribution import ensure_distribution
from tally.service.pulsar.local import LocalPulsar


def run(quick=False, argv=()):
    parser = argparse.ArgumentParser(prog="python -m tally.bench broker")
    parser.add_argument("--starts", type=int, default=2 if quick else 5)
    args = parser.parse_args(argv)
    ensure_distribution()
    ready, stopped = [], []
    for _ in range(args.starts):
        broker = LocalPulsar()
        broker.start()
        ready.append(broker.startup_seconds)
        begin = time.monotonic()
        broker.stop()
        stopped.append(time.monotonic() - begin)
    return {"benchmark": "broker", "starts": args.starts,
            "ready_seconds_min": round(min(ready), 2),
            "ready_seconds_median": round(statistics.median(ready), 2),
            "ready_seconds_max": round(max(ready), 2),
            "stop_seconds_median": round(statistics.median(stopped), 2),
            "goal_seconds": 60}
