"""Prometheus metrics of the streaming service, in the text exposition format,
served on a small HTTP endpoint (``GET /metrics``, ``GET /health``)."""
import asyncio
import time


class Metrics:
    """Counters and gauges keyed by (name, labels); rendered on demand."""

    def __init__(self):
        self.help = {}
        self.kinds = {}
        self.values = {}

    def declare(self, name, kind, help_text):
        self.kinds[name], self.help[name] = kind, help_text

    def add(self, name, amount, **labels):
        key = (name, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0) + amount

    def set(self, name, value, **labels):
        self.values[(name, tuple(sorted(labels.items())))] = value

    def render(self):
        lines = []
        for name in sorted(self.kinds):
            lines.append(f"# HELP {name} {self.help[name]}")
            lines.append(f"# TYPE {name} {self.kinds[name]}")
            for (metric, labels), value in sorted(self.values.items()):
                if metric == name:
                    label_text = ",".join(f'{k}="{v}"' for k, v in labels)
                    lines.append(f"{name}{{{label_text}}} {value}")
        return "\n".join(lines) + "\n"


def service_metrics():
    metrics = Metrics()
    for name, kind, text in (
            ("tally_events_total", "counter", "Events folded into the state"),
            ("tally_messages_total", "counter", "Pulsar messages received"),
            ("tally_dead_letters_total", "counter", "Payloads sent to the dead-letter topic"),
            ("tally_batches_total", "counter", "Batches processed"),
            ("tally_batch_seconds_total", "counter", "Time spent processing batches"),
            ("tally_checkpoints_total", "counter", "Checkpoints published"),
            ("tally_checkpoint_age_seconds", "gauge", "Seconds since the last checkpoint"),
            ("tally_freshness_seconds", "gauge",
             "Newest event time of the last batch to its online write, in seconds"),
            ("tally_event_time_lag_seconds", "gauge",
             "Wall clock minus the partition's watermark (newest event time)"),
            ("tally_unacknowledged", "gauge",
             "1 if the partition has folded messages awaiting a checkpoint"),
            ("tally_store_write_retries_total", "counter",
             "Online store writes retried after an error"),
            ("tally_bootstrap_units", "gauge",
             "Work units of a running bootstrap from history (state: done or total)"),
            ("tally_bootstrap_events_total", "counter",
             "Events folded by a running bootstrap's finished units")):
        metrics.declare(name, kind, text)
    return metrics


async def serve_metrics(metrics, host, port, refresh=None):
    """Serve ``/metrics`` and ``/health`` until cancelled; ``refresh()`` updates
    gauges just before each scrape."""
    async def handle(reader, writer):
        try:
            request = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            if path == "/metrics":
                if refresh:
                    refresh()
                status, body, kind = "200 OK", metrics.render(), "text/plain; version=0.0.4"
            elif path == "/health":
                status, body, kind = "200 OK", '{"status": "ok"}', "application/json"
            else:
                status, body, kind = "404 Not Found", "not found\n", "text/plain"
            payload = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                         .encode() + payload)
            await writer.drain()
        finally:
            writer.close()
    server = await asyncio.start_server(handle, host, port)
    async with server:
        await server.serve_forever()


def seconds_since(monotonic_time):
    return round(time.monotonic() - monotonic_time, 3)
