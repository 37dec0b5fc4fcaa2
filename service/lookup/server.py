"""The lookup server: the online store over the network.

Two ports, one process, one event loop (uvloop):

* **msgpack over TCP** (default 127.0.0.1:8255), for services: frames,
  ops and error codes in ``tally.service.lookup.protocol``, the front end
  in ``tally.service.lookup.tcp``;
* **HTTP/1.1 + JSON** (default 127.0.0.1:8256), for humans and tools,
  ``/metrics`` included: ``tally.service.lookup.http``.

Both ask one ``LookupService`` (``tally.service.lookup.service``), which
reads the store (through libtally, or Aerospike's client off the event loop)
and keeps the view catalog.

**Token.** With ``token`` set (``--token`` or ``$TALLY_TOKEN``) both ports
need it. TCP: send ``{"op": "auth", "token": ...}`` first, or put a
``"token"`` field in any request; the first request with the right token
authenticates the connection for its lifetime, a wrong one is answered
``unauthorized`` (the connection stays open, unauthenticated). HTTP:
``Authorization: Bearer <token>``, else 401. ``ping`` and ``/health`` stay
open, so that liveness probes need no secret; they reveal nothing.

**Limits.** Each port serves at most ``max_connections`` connections (1024;
one more is answered ``too_many_connections`` and closed) and closes one that
sends no request for ``idle_timeout`` seconds (60): see
``tally.service.lookup.frontend``.
"""
import asyncio
import contextlib
import os
import signal
import sys
import threading

from tally.service.lookup.client import DEFAULT_HOST, DEFAULT_PORT
from tally.service.lookup.frontend import (DEFAULT_IDLE_TIMEOUT_SECONDS,
                                           DEFAULT_MAX_CONNECTIONS, lookup_metrics)
from tally.service.lookup.http import DEFAULT_HTTP_PORT, MAX_HTTP_HEAD_BYTES, HttpFrontEnd
from tally.service.lookup.protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_FRAME_BYTES
from tally.service.lookup.service import (DEFAULT_CATALOG_REFRESH_SECONDS, LookupService,
                                          open_store)
from tally.service.lookup.tcp import TcpFrontEnd

__all__ = ["LookupServer", "serve_lookups", "serve_in_background"]


class LookupServer:
    """Both front ends over one store. ``await start()``, then ``port`` and
    ``http_port`` hold the bound ports (pass 0 for any free one)."""

    def __init__(self, store, host=DEFAULT_HOST, port=DEFAULT_PORT,
                 http_port=DEFAULT_HTTP_PORT, token=None,
                 max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, max_batch=DEFAULT_MAX_BATCH,
                 catalog_refresh=DEFAULT_CATALOG_REFRESH_SECONDS,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT_SECONDS,
                 max_connections=DEFAULT_MAX_CONNECTIONS):
        self.store = open_store(store)
        self.host = host
        self.port, self.http_port = port, http_port
        self.metrics = lookup_metrics()
        self.service = LookupService(self.store, token=token, max_batch=max_batch,
                                     catalog_refresh=catalog_refresh)
        limits = dict(max_connections=max_connections, idle_timeout=idle_timeout)   # per port
        self.tcp = TcpFrontEnd(self.service, self.metrics, max_frame_bytes, **limits)
        self.http = HttpFrontEnd(self.service, self.metrics, max_frame_bytes, **limits)
        self.catalog_refresh = catalog_refresh
        self._servers = []
        self._refresher = None

    async def start(self):
        catalog = self.service.catalog
        await catalog.reload()                  # so the first request is not the one to wait
        self._refresher = asyncio.ensure_future(catalog.refresh_every(self.catalog_refresh))
        tcp = await asyncio.get_running_loop().create_server(self.tcp.protocol, self.host,
                                                             self.port)
        self._servers.append(tcp)
        self.port = tcp.sockets[0].getsockname()[1]
        if self.http_port is not None:
            http = await asyncio.start_server(self.http.serve_connection, self.host,
                                              self.http_port, limit=MAX_HTTP_HEAD_BYTES)
            self._servers.append(http)
            self.http_port = http.sockets[0].getsockname()[1]
            self.tcp.http_port = self.http_port
        return self

    async def close(self):
        for server in self._servers:
            server.close()
        await self.tcp.connections.close_all()
        await self.http.connections.close_all()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self._refresher is not None:
            self._refresher.cancel()
        self.store.close()

    def describe(self):
        http = f", HTTP on http://{self.host}:{self.http_port}" if self.http_port else ""
        guard = "token required" if self.service.token else "no token"
        return (f"tally lookup-server: msgpack on {self.host}:{self.port}{http} "
                f"(store {self.store.path}, {len(self.service.catalog.schemas)} views, {guard})")


def new_event_loop():
    import uvloop
    return uvloop.new_event_loop()


def serve_lookups(store_path, host=DEFAULT_HOST, port=DEFAULT_PORT,
                  http_port=DEFAULT_HTTP_PORT, token=None,
                  max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, max_batch=DEFAULT_MAX_BATCH,
                  catalog_refresh=DEFAULT_CATALOG_REFRESH_SECONDS,
                  idle_timeout=DEFAULT_IDLE_TIMEOUT_SECONDS,
                  max_connections=DEFAULT_MAX_CONNECTIONS):
    """Serve until SIGINT or SIGTERM, on uvloop. Prints one line with the
    bound ports once it accepts connections. ``token=None`` reads
    ``$TALLY_TOKEN``; pass ``""`` to serve without one even if it is set."""
    token = os.environ.get("TALLY_TOKEN") if token is None else token
    server = LookupServer(store_path, host, port, http_port, token or None,
                          max_frame_bytes, max_batch, catalog_refresh, idle_timeout,
                          max_connections)
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve_until_signalled(server, "lookup-server",
                                                      server.service.token))
    finally:
        loop.close()
    return 0


async def serve_until_signalled(server, command, token):
    """Start ``server`` (anything with start, describe, close and a host),
    print its one line, and serve until SIGINT or SIGTERM; warn when it
    listens beyond loopback without a token."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        if not token and server.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"tally {command}: warning: serving {server.host} without a token",
                  file=sys.stderr, flush=True)
        print(server.describe(), flush=True)
        await stop.wait()
    finally:
        await server.close()


def serve_in_background(store, **options):
    """Run a LookupServer on its own uvloop thread, e.g. beside a writer in
    this process (pass its LmdbStore) or in tests; yields the started server."""
    return running_in_background(LookupServer(store, **options), "tally-lookup-server")


@contextlib.contextmanager
def running_in_background(server, name):
    """Run ``server`` (anything with async start and close) on an event loop
    thread of its own; yields it started, closes it on exit."""
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
