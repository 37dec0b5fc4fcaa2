"""The streaming service's health per view, from its ``/metrics`` endpoint
(``tally serve --metrics``, Prometheus text format).

:class:`MetricsHistory` scrapes it every ``interval`` seconds and keeps the
last hour in memory: per (view, version), the events folded (summed over
partitions: a rate comes from two samples), freshness (newest event of the
last batch to its online write) and event-time lag (wall clock minus the
watermark), both the worst partition's. Nothing is stored on disk: a
restarted UI starts a new hour.
"""
import asyncio
import logging
import re
import time
from collections import deque
from urllib.parse import urlsplit

log = logging.getLogger("tally.ui")

SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
EVENTS, FRESHNESS, LAG = ("tally_events_total", "tally_freshness_seconds",
                          "tally_event_time_lag_seconds")


def parse_prometheus(text):
    """[(name, {label: value}, number)] of the exposition format's samples;
    comments and lines that are not samples are skipped."""
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        labels = {k: re.sub(r'\\[\\"n]', lambda m: UNESCAPE[m.group(0)], v)
                  for k, v in LABEL.findall(match.group(2) or "")}
        try:
            samples.append((match.group(1), labels, float(match.group(3))))
        except ValueError:
            continue
    return samples


def per_view(samples):
    """{(view, version): {"events": sum, "freshness": max, "lag": max}}."""
    result = {}
    for name, labels, number in samples:
        if name not in (EVENTS, FRESHNESS, LAG) or "view" not in labels:
            continue
        entry = result.setdefault((labels["view"], int(labels.get("version", 0))), {})
        if name == EVENTS:
            entry["events"] = entry.get("events", 0.0) + number
        else:
            key = "freshness" if name == FRESHNESS else "lag"
            entry[key] = max(entry.get(key, number), number)
    return result


def metrics_url(address):
    """``host:port`` (as ``tally serve --metrics`` takes it) or a URL -> (host, port, path)."""
    parts = urlsplit(address if "//" in address else f"http://{address}")
    return parts.hostname, parts.port or 80, parts.path or "/metrics"


async def fetch(address, timeout=5.0):
    """The body of GET ``address`` (the service answers and closes)."""
    host, port, path = metrics_url(address)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        reply = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise OSError(f"{address}: {status.decode('latin-1')}")
    return body.decode()


class MetricsHistory:
    """The last ``span`` seconds of per-view samples of one metrics endpoint."""

    def __init__(self, address, interval=10.0, span=3600.0):
        self.address, self.interval, self.span = address, interval, span
        self.samples = deque()              # (wall time, per_view(...))
        self.error = None                   # why the last scrape failed, if it did

    async def scrape(self):
        try:
            text = await fetch(self.address)
        except (OSError, asyncio.TimeoutError) as error:
            if self.error is None:          # once per outage, not per scrape
                log.warning("cannot scrape %s: %r", self.address, error)
            self.error = f"{self.address}: {error or type(error).__name__}"
            return
        self.error = None
        self.add(time.time(), per_view(parse_prometheus(text)))

    def add(self, when, views):
        self.samples.append((when, views))
        while self.samples and self.samples[0][0] < when - self.span:
            self.samples.popleft()

    async def run(self):
        while True:
            await self.scrape()
            await asyncio.sleep(self.interval)

    def series(self, view, version, now=None):
        """{"rate", "freshness", "lag"}: (seconds ago, value) points, oldest first.
        A rate needs two samples; a counter that went down (the service
        restarted) gives no point."""
        now = time.time() if now is None else now
        mine = [(t, v[(view, version)]) for t, v in self.samples if (view, version) in v]
        out = {"rate": [], "freshness": [], "lag": []}
        for (t0, a), (t1, b) in zip(mine, mine[1:]):
            if "events" in a and "events" in b and b["events"] >= a["events"] and t1 > t0:
                out["rate"].append((now - t1, (b["events"] - a["events"]) / (t1 - t0)))
        for t, entry in mine:
            for key in ("freshness", "lag"):
                if key in entry:
                    out[key].append((now - t, entry[key]))
        return out

    def versions(self, view):
        """The versions of ``view`` the newest sample has."""
        if not self.samples:
            return []
        return sorted(version for name, version in self.samples[-1][1] if name == view)
