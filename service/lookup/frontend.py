"""What the TCP and HTTP front ends share: the registry of open connections
(with its cap and its idle timeout) and the request metrics
(``tally.service.metrics``, served on ``/metrics``).

**Idle connections.** A connection that sends no request for
``idle_timeout`` seconds (60) is closed, quietly: a client that opened one
and went away, or sends a request one byte a minute, would otherwise hold
its socket forever. One timer per connection, re-armed lazily from the time
of its last request, so a request only stores that time.

**The cap.** Each port serves at most ``max_connections`` (1024) at once; one
more is answered ``too_many_connections`` (a TCP error frame, or HTTP 503)
and closed. Both are counted in ``tally_lookup_connections_dropped_total``.

Labels come from fixed sets (transports, ops, error codes), never from client
input, so the number of series stays bounded.
"""
import asyncio
import contextlib
import functools
import time

from tally.service.metrics import Metrics, series

REQUESTS = "tally_lookup_requests_total"
ERRORS = "tally_lookup_errors_total"
DURATION = "tally_lookup_request_duration_seconds"
KEYS = "tally_lookup_keys_total"
CONNECTIONS = "tally_lookup_connections"
DROPPED = "tally_lookup_connections_dropped_total"
DROP_REASONS = ("idle_timeout", "too_many_connections")
DEFAULT_IDLE_TIMEOUT_SECONDS = 60.0
DEFAULT_MAX_CONNECTIONS = 1024
# A refused connection's input is read for at most this long before it is
# closed: closing a socket with unread input sends a reset, which may destroy
# the refusal before the client reads it.
REFUSAL_LINGER_SECONDS = 1.0
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
    metrics.declare(DROPPED, "counter", "Connections the server closed: idle for "
                    "idle_timeout, or refused beyond max_connections.")
    for transport in TRANSPORTS:
        metrics.set(CONNECTIONS, 0, transport=transport)
        for reason in DROP_REASONS:
            metrics.add(DROPPED, 0, transport=transport, reason=reason)
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


class Connection:
    """One open connection: its writer, and when its last request arrived
    (a time.perf_counter(), which the front ends read for each request)."""
    __slots__ = ("writer", "last_request", "timer")

    def __init__(self, writer):
        self.writer = writer
        self.last_request = time.perf_counter()
        self.timer = None


class Connections:
    """The open connections of one front end: counted for /metrics, capped,
    closed when idle, and closed by the server's close() (asyncio's
    Server.close() only stops accepting new ones)."""

    def __init__(self, transport, metrics, max_connections=DEFAULT_MAX_CONNECTIONS,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT_SECONDS):
        if max_connections < 1 or not idle_timeout > 0:
            raise ValueError(f"max_connections ({max_connections}) must be at least 1 and "
                             f"idle_timeout ({idle_timeout}) above 0 seconds")
        self.transport = transport
        self.metrics = metrics
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.open_ones = {}                 # handler task -> its Connection

    def full(self):
        return len(self.open_ones) >= self.max_connections

    def refusal_message(self):
        return (f"the server has max_connections={self.max_connections} open on this "
                "port; retry later, or reuse a connection")

    def register(self, done, writer):
        """Count and watch a connection until ``unregister(done)``: ``done``
        is what ``close_all`` awaits (its handler task, or a future set when
        it is lost), ``writer`` what closes it (a stream writer or a
        transport). Returns its Connection, whose ``last_request`` the
        handler sets per request."""
        connection = self.open_ones[done] = Connection(writer)
        self.metrics.add(CONNECTIONS, 1, transport=self.transport)
        self._watch(connection, self.idle_timeout)
        return connection

    def unregister(self, done):
        connection = self.open_ones.pop(done)
        connection.timer.cancel()
        self.metrics.add(CONNECTIONS, -1, transport=self.transport)
        connection.writer.close()

    def count_refusal(self):
        self.metrics.add(DROPPED, 1, transport=self.transport, reason="too_many_connections")

    @contextlib.asynccontextmanager
    async def open(self, writer):
        """Register the connection for the handler's lifetime (a streams
        handler's); yields its Connection."""
        task = asyncio.current_task()
        connection = self.register(task, writer)
        try:
            yield connection
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                            # the client went away mid-request
        finally:
            self.unregister(task)

    def _watch(self, connection, delay):
        loop = asyncio.get_running_loop()
        connection.timer = loop.call_later(delay, self._check_idle, connection)

    def _check_idle(self, connection):
        """Close the connection if it has been idle for idle_timeout, else
        look again when it would be."""
        idle = time.perf_counter() - connection.last_request
        if idle < self.idle_timeout:
            self._watch(connection, self.idle_timeout - idle)
            return
        self.metrics.add(DROPPED, 1, transport=self.transport, reason="idle_timeout")
        connection.writer.close()           # the handler ends at its pending read

    async def serve(self, reader, writer, refusal, serve_request):
        """A stream connection's requests, one after another, until
        ``serve_request(reader, writer, connection)`` returns False; beyond
        max_connections, ``refusal()`` (the reply's bytes) instead."""
        if self.full():
            await self.refuse(reader, writer, refusal())
            return
        async with self.open(writer) as connection:
            while await serve_request(reader, writer, connection):
                pass

    async def refuse(self, reader, writer, reply):
        """Answer a connection beyond max_connections with ``reply``, then
        close it, after reading what the client sent (see REFUSAL_LINGER_SECONDS)."""
        self.count_refusal()
        try:
            writer.write(reply)
            writer.write_eof()
            await asyncio.wait_for(_discard_input(reader), REFUSAL_LINGER_SECONDS)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass                            # gone, or slow to go: closed all the same
        finally:
            writer.close()

    async def close_all(self):
        """Close every connection and wait until each is gone; a streams
        handler ends at its next read. (Cancelling the handlers instead trips
        Python 3.11's streams, which log a cancelled handler as an error.)"""
        tasks = list(self.open_ones)
        for connection in self.open_ones.values():
            connection.writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


async def _discard_input(reader):
    while await reader.read(1 << 16):
        pass
