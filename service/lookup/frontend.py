"""What the TCP and HTTP front ends share: the registry of open connections
and the request metrics (``tally.service.metrics``, served on ``/metrics``).

Labels come from fixed sets (transports, ops, error codes), never from client
input, so the number of series stays bounded.
"""
import asyncio
import contextlib
import functools

from tally.service.metrics import Metrics, series

REQUESTS = "tally_lookup_requests_total"
ERRORS = "tally_lookup_errors_total"
DURATION = "tally_lookup_request_duration_seconds"
KEYS = "tally_lookup_keys_total"
CONNECTIONS = "tally_lookup_connections"
TRANSPORTS = ("tcp", "http")
DURATION_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                    50e-3, 100e-3, 250e-3, 1.0)


def lookup_metrics():
    """A Metrics with the lookup server's series declared."""
    metrics = Metrics()
    metrics.declare(REQUESTS, "counter", "Requests answered, by status (ok or an error code).")
    metrics.declare(ERRORS, "counter", "Refused requests, by error code.")
    metrics.declare(DURATION, "histogram", "Time from a request read to its answer written.",
                    buckets=DURATION_BUCKETS)
    metrics.declare(KEYS, "counter", "Entity keys looked up.")
    metrics.declare(CONNECTIONS, "gauge", "Open client connections.")
    for transport in TRANSPORTS:
        metrics.set(CONNECTIONS, 0, transport=transport)
    return metrics


def count_request(metrics, transport, op, status, seconds, n_keys=0):
    """Count one answered request: a few dict updates, on every request."""
    requests, duration, keys, errors = _request_series(transport, op, status)
    metrics.add_at(requests, 1)
    metrics.observe_at(duration, seconds)
    if n_keys:
        metrics.add_at(keys, n_keys)
    if errors is not None:
        metrics.add_at(errors, 1)


@functools.lru_cache(maxsize=1024)      # the label sets are few (see the docstring)
def _request_series(transport, op, status):
    """The series a request counts in, built (labels sorted) once per label set."""
    return (series(REQUESTS, transport=transport, op=op, status=status),
            series(DURATION, transport=transport, op=op),
            series(KEYS, transport=transport),
            None if status == "ok" else series(ERRORS, transport=transport, code=status))


class Connections:
    """The open connections of one front end: counted for /metrics, and
    closed by the server's close() (asyncio's Server.close() only stops
    accepting new ones)."""

    def __init__(self, transport, metrics):
        self.transport = transport
        self.metrics = metrics
        self.open_ones = {}                 # handler task -> its writer

    @contextlib.asynccontextmanager
    async def open(self, writer):
        task = asyncio.current_task()
        self.open_ones[task] = writer
        self.metrics.add(CONNECTIONS, 1, transport=self.transport)
        try:
            yield
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                            # the client went away mid-request
        finally:
            self.metrics.add(CONNECTIONS, -1, transport=self.transport)
            del self.open_ones[task]
            writer.close()

    async def close_all(self):
        """Close every connection; each handler then ends at its next read.
        (Cancelling the handlers instead trips Python 3.11's streams, which
        log a cancelled handler as an error.)"""
        tasks = list(self.open_ones)
        for writer in self.open_ones.values():
            writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
