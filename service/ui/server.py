"""The UI's HTTP server: the lookup server's asyncio HTTP/1.1 parsing
(``tally.service.lookup.http``) and connection limits, answering HTML.

Routes: ``/`` (search), ``/view/{name}``, ``/service/{name}``,
``/source/{name}``, ``/entity/{name}``, ``/lineage[?node=kind:name]``,
``/static/ui.css``, ``/favicon.svg`` and ``/health``. Everything is GET, and
nothing changes the registry or the store.

**Token.** As for the lookup server (``--token`` or ``$TALLY_TOKEN``):
requests need ``Authorization: Bearer <token>``, or the ``tally_token``
cookie, which a browser gets by opening any page once with ``?token=...``
(answered by a redirect to the same page without it, so the token leaves
the address bar and the history). ``/health`` stays open.

The registry is read on the event loop: its reads are single SQLite queries
on a local file (milliseconds), and SQLite connections belong to the thread
that opened them.
"""
import asyncio
import hmac
import logging
import os
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import quote, unquote, urlencode

from tally.service.lookup.frontend import Connections
from tally.service.lookup.http import (HTTP_STATUS, MAX_HTTP_HEAD_BYTES, HttpError,
                                       bearer_token, http_response, read_http_request)
from tally.service.lookup.protocol import RequestError
from tally.service.metrics import Metrics
from tally.service.registry import NotFound, Registry, RegistryError
from tally.service.ui import html, pages
from tally.service.ui.metrics import MetricsHistory
from tally.service.ui.online import Online

DEFAULT_UI_PORT = 8257
COOKIE = "tally_token"
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
    "Cache-Control: no-store\r\n")
STATIC = {"/static/ui.css": ("ui.css", "text/css; charset=utf-8"),
          "/favicon.svg": ("favicon.svg", "image/svg+xml"),
          "/favicon.ico": ("favicon.svg", "image/svg+xml")}
PAGES = {"view": pages.view, "service": pages.service, "source": pages.source,
         "entity": pages.entity}

log = logging.getLogger("tally.ui")


class Context:
    """What pages read: the registry, online lookups, the metrics history."""

    def __init__(self, registry, online, history):
        self.registry, self.online, self.history = registry, online, history


class UiServer:
    """``await start()``, then ``port`` holds the bound port (0: any free one)."""

    def __init__(self, registry_path=None, store=None, history=None, host="127.0.0.1",
                 port=DEFAULT_UI_PORT, token=None, max_connections=256, idle_timeout=60.0):
        """``history``: a MetricsHistory, which the server keeps scraping, or None."""
        self.registry_path, self.store, self.history = registry_path, store, history
        self.host, self.port, self.token = host, port, token or None
        self.connections = Connections("http", Metrics(), max_connections, idle_timeout)
        self.static = {path: ((Path(__file__).parent / name).read_bytes(), kind)
                       for path, (name, kind) in STATIC.items()}
        self.ctx, self._server, self._tasks = None, None, []

    async def start(self):
        registry = Registry(self.registry_path)      # opened on the loop's thread
        online = Online(self.store)
        await online.start()
        self.ctx = Context(registry, online, self.history)
        if self.history is not None:
            self._tasks.append(asyncio.ensure_future(self.history.run()))
        self._server = await asyncio.start_server(self.serve_connection, self.host, self.port,
                                                  limit=MAX_HTTP_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self):
        self._server.close()
        await self.connections.close_all()
        await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        self.ctx.online.close()
        self.ctx.registry.close()

    @property
    def url(self):
        return f"http://{self.host}:{self.port}/"

    def describe(self):
        guard = "token required" if self.token else "no token"
        metrics = self.history.address if self.history else "no metrics"
        return (f"tally ui: {self.url} (registry {self.ctx.registry.path}, store "
                f"{self.store}, {metrics}, {guard})")

    # ---- requests --------------------------------------------------------------

    async def serve_connection(self, reader, writer):
        await self.connections.serve(
            reader, writer, lambda: http_response(503, b"too many connections", False,
                                                  "text/plain"), self._serve_request)

    async def _serve_request(self, reader, writer, connection):
        try:
            request = await read_http_request(reader, writer, max_body=0)
        except HttpError as error:
            if not writer.is_closing():
                writer.write(http_response(HTTP_STATUS[error.code], error.message.encode(),
                                           False, "text/plain; charset=utf-8"))
            return False
        if request is None:
            return False
        status, body, kind, extra = await self._respond(request)
        writer.write(http_response(status, body, request.keep_alive, kind,
                                   SECURITY_HEADERS + extra))
        await writer.drain()
        return request.keep_alive

    async def _respond(self, request):
        """-> (status, body, content type, extra header lines)."""
        query = {k: v[0] for k, v in request.query.items()}
        if request.method != "GET":
            return _error_page(405, "the UI is read-only: use GET")
        if request.path == "/health":
            return 200, b'{"status":"serving"}', "application/json", ""
        if self.token and "token" in query:
            return self._sign_in(request, query)
        if not self._authorized(request):
            return _error_page(401, "open this page with ?token=... (the token of tally ui "
                               "--token or $TALLY_TOKEN), or send Authorization: Bearer")
        if request.path in self.static:
            body, kind = self.static[request.path]
            return 200, body, kind, "Cache-Control: max-age=3600\r\n"
        try:
            title, body = await self._page(request.path, query)
        except NotFound as error:
            return _error_page(404, str(error))
        except RequestError as error:
            return _error_page(HTTP_STATUS.get(error.code, 400), error.message)
        except RegistryError as error:
            return _error_page(400, str(error))
        except Exception:
            log.exception("internal error answering %s", request.path)
            return _error_page(500, "internal error; see the log of tally ui")
        return 200, html.page(title, body).encode(), "text/html; charset=utf-8", ""

    async def _page(self, path, query):
        if path == "/":
            return pages.search(self.ctx, query)
        if path == "/lineage":
            return pages.lineage_page(self.ctx, query)
        kind, _, name = path.strip("/").partition("/")
        if kind in PAGES and name and "/" not in name:
            answer = PAGES[kind](self.ctx, unquote(name), query)
            return await answer if asyncio.iscoroutine(answer) else answer
        raise RequestError("not_found", f"no page {path!r}; start at /")

    def _authorized(self, request):
        if self.token is None:
            return True
        cookie = SimpleCookie(request.headers.get("cookie", ""))
        given = bearer_token(request.headers) or (unquote(cookie[COOKIE].value)
                                                  if COOKIE in cookie else None)
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def _sign_in(self, request, query):
        """``?token=``: a right one becomes a cookie, and the page is
        reloaded without it."""
        if not hmac.compare_digest(query["token"].encode(), self.token.encode()):
            return _error_page(401, "wrong token")
        rest = {k: v for k, v in query.items() if k != "token"}
        location = request.path + ("?" + urlencode(rest) if rest else "")
        return (303, b"", "text/plain", f"Location: {location}\r\nSet-Cookie: {COOKIE}="
                f"{quote(self.token, safe='')}; HttpOnly; SameSite=Strict; Path=/\r\n")


def _error_page(status, message):
    body = html.page(f"{status}", html.notice(message, "error")).encode()
    return status, body, "text/html; charset=utf-8", ""


# ---- running it ---------------------------------------------------------------------

def serve_ui(registry_path, store, metrics=None, host="127.0.0.1", port=DEFAULT_UI_PORT,
             token=None, scrape_interval=10.0):
    """Serve until SIGINT or SIGTERM. ``token=None`` reads ``$TALLY_TOKEN``."""
    from tally.service.lookup.server import new_event_loop, serve_until_signalled
    token = os.environ.get("TALLY_TOKEN") if token is None else token
    history = MetricsHistory(metrics, scrape_interval) if metrics else None
    server = UiServer(registry_path, store, history, host, port, token)
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve_until_signalled(server, "ui", server.token))
    finally:
        loop.close()
    return 0


def ui_in_background(server):
    """Run ``server`` (a UiServer) on its own event loop thread (tests,
    screenshots); yields it started."""
    from tally.service.lookup.server import running_in_background
    return running_in_background(server, "tally-ui")
