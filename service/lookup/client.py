"""Clients of the lookup server (``tally.service.lookup.server``): msgpack frames over TCP.

The wire format lives here, so that a client needs nothing but ``msgpack``:
every message, either way, is one frame::

    4 bytes   payload length N, unsigned big-endian
    N bytes   one msgpack map

Requests carry an integer ``id`` that the reply echoes; the server answers
the requests of one connection in the order they arrived, so a client may
send many before reading any reply (pipelining). The ops and the error
codes are in ``tally.service.lookup.protocol``.

Feature values come back as the stores return them (``LmdbStore.get``):
int, float, str, lists of items, and top_k values as lists of
``(value, count)`` tuples -- on the wire ``[[value, count], ...]``, turned
back into tuples by :func:`decode_reply` (a value that is an array of arrays
is a top_k: no other value is one).

``LookupClient`` blocks; ``AsyncLookupClient`` is for asyncio. Both raise
``LookupServerError`` (a ``LookupError``) with the server's error ``code``
when the server answers with an error frame, and ``ConnectionError`` when the
connection breaks.
"""
import asyncio
import collections
import itertools
import socket
import struct

import msgpack

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8255
FRAME_HEADER_BYTES = 4
DEFAULT_WINDOW = 32           # requests in flight per pipelined call
DEFAULT_BATCH_SIZE = 500      # keys per request when get_many splits its keys


class LookupServerError(LookupError):
    """The server refused a request: ``code`` is one of the server's error
    codes (``unknown_view``, ``batch_too_big``, ``unauthorized``, ...)."""

    def __init__(self, code, message, request_id=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def encode_frame(message):
    """One msgpack map -> one length-prefixed frame."""
    payload = msgpack.packb(message, use_bin_type=True)
    return len(payload).to_bytes(FRAME_HEADER_BYTES, "big") + payload


def decode_reply(payload):
    """A reply frame's map, its top_k values' pairs made tuples. The hook
    runs in msgpack's C loop on every array: one whose first item is an
    array is a top_k value in a record or a row's vector. A columns reply
    also holds arrays of arrays -- a column of lists -- which the hook
    makes tuples too; those come back as lists here."""
    reply = msgpack.unpackb(payload, raw=False, list_hook=_top_k_pairs)
    if "columns" in reply:
        columns = reply["columns"]
        for name, column in columns.items():
            if type(next((value for value in column if value is not None), None)) is tuple:
                columns[name] = [value if value is None else list(value) for value in column]
    return reply


def _top_k_pairs(items):
    """A top_k value's [[value, count], ...] -> [(value, count), ...]."""
    if items and type(items[0]) is list:
        return [item if item is None else tuple(item) for item in items]
    return items


def check_reply(reply, expected_id):
    """The reply's body, or LookupServerError for an error frame. An error
    frame may carry id None (the server could not read the request's id)."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise LookupServerError(error.get("code", "unknown"), error.get("message", ""),
                                reply.get("id"))
    if reply.get("id") != expected_id:
        raise ConnectionError(f"reply id {reply.get('id')!r} does not answer request "
                              f"{expected_id!r}: the connection is out of step")
    return reply


def get_request(request_id, view, keys, features=None):
    request = {"id": request_id, "op": "get", "view": view, "keys": keys}
    if features is not None:
        request["features"] = list(features)
    return request


def service_request(name, rows):
    """A feature-service request answered in columns (fewer objects to send
    and decode than a map per row)."""
    rows = [rows] if isinstance(rows, dict) else list(rows)
    return {"op": "service", "service": name, "rows": rows, "layout": "columns"}


def vectors_of(columns):
    """A columns reply as one dict per row."""
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def split(keys, batch_size):
    keys = list(keys)
    return [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]


class _FrameSocket:
    """A blocking socket that reads whole frames. Its timeout is the
    kernel's (SO_RCVTIMEO, SO_SNDTIMEO), not Python's: a socket with a
    Python timeout polls before every send and receive, two more system
    calls per request."""

    def __init__(self, sock, timeout):
        sock.settimeout(None)
        if timeout is not None:
            if not timeout > 0:             # 0 would mean "never" to the kernel
                raise ValueError(f"timeout must be above 0 seconds or None, not {timeout!r}")
            seconds = int(timeout)
            interval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)
        self.sock = sock
        self.timeout = timeout
        self.buffer = b""

    def send(self, data):
        try:
            self.sock.sendall(data)
        except BlockingIOError:             # SO_SNDTIMEO expired
            raise TimeoutError(f"the lookup server took no data for {self.timeout} s") \
                from None

    def read_frame(self):
        buffer = self.buffer
        while True:
            if len(buffer) >= FRAME_HEADER_BYTES:
                end = FRAME_HEADER_BYTES + int.from_bytes(buffer[:FRAME_HEADER_BYTES], "big")
                if len(buffer) >= end:
                    self.buffer = buffer[end:]
                    return buffer[FRAME_HEADER_BYTES:end]
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:         # SO_RCVTIMEO expired
                self.buffer = buffer
                raise TimeoutError(f"no reply from the lookup server in {self.timeout} s") \
                    from None
            if not chunk:
                raise ConnectionError("the lookup server closed the connection")
            buffer = buffer + chunk if buffer else chunk   # a reply is mostly one chunk


class LookupClient:
    """A blocking client on one connection. Not thread-safe: use one per
    thread (connections are cheap; the server serves each on its own)."""

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, token=None, timeout=10.0):
        sock = socket.create_connection((host, port), timeout=timeout)
        # A request is one small write: without TCP_NODELAY, Nagle's algorithm
        # and delayed ACKs can hold it back for tens of milliseconds.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = _FrameSocket(sock, timeout)
        self._ids = itertools.count(1)
        if token is not None:
            self.request({"op": "auth", "token": token})

    def close(self):
        self._conn.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, message):
        """Send one request (a map with "op"; the id is added) and return the
        reply map. (``pipeline`` of one request, without its bookkeeping:
        this is the call of a request-time lookup.)"""
        request_id = next(self._ids)
        self._conn.send(encode_frame(dict(message, id=request_id)))
        return check_reply(decode_reply(self._conn.read_frame()), request_id)

    def pipeline(self, messages, window=DEFAULT_WINDOW):
        """Send requests with up to ``window`` in flight and return their
        replies in order. Every reply is read before an error is raised, so
        the connection stays usable."""
        messages = [dict(m, id=next(self._ids)) for m in messages]
        replies, first_error, sent = [], None, 0
        while len(replies) < len(messages):
            ahead = min(len(messages), len(replies) + window)
            if sent < ahead:
                self._conn.send(b"".join(encode_frame(m) for m in messages[sent:ahead]))
                sent = ahead
            reply = decode_reply(self._conn.read_frame())
            try:
                replies.append(check_reply(reply, messages[len(replies)]["id"]))
            except LookupServerError as error:
                first_error = first_error or error
                replies.append(None)
        if first_error is not None:
            raise first_error
        return replies

    def ping(self):
        self.request({"op": "ping"})

    def views(self):
        """{view: {"key_type", "version", "features": {name: type}}}."""
        return self.request({"op": "views"})["views"]

    def get(self, view, key, features=None):
        """The record of one entity (a dict of feature values and ``_event_time``,
        ``_write_time``, ``_valid_until``, ``_view_version``), or None."""
        return self.request(get_request(None, view, [key], features))["records"][0]

    def get_batch(self, view, keys, features=None):
        """The records of ``keys`` in one request (None where an entity has none)."""
        return self.request(get_request(None, view, list(keys), features))["records"]

    def get_many(self, view, keys, features=None, batch_size=DEFAULT_BATCH_SIZE,
                 window=DEFAULT_WINDOW):
        """The records of any number of keys: split into requests of
        ``batch_size`` keys, pipelined ``window`` at a time."""
        batches = split(keys, batch_size)
        replies = self.pipeline([get_request(None, view, b, features) for b in batches], window)
        return [record for reply in replies for record in reply["records"]]

    def service(self, name, rows):
        """The feature vector of each row (a dict of entity keys, e.g.
        ``{"user": 42, "article": 7}``) from feature service ``name``: one
        request, one dict of the service's columns per row."""
        return vectors_of(self.service_columns(name, rows))

    def service_columns(self, name, rows):
        """The same vectors as ``{column: [value of each row]}``: a ranker's
        feature matrix for its candidates."""
        return self.request(service_request(name, rows))["columns"]


class AsyncLookupClient:
    """An asyncio client on one connection; any number of coroutines may use
    it at once, and their requests are pipelined on the connection.

        async with AsyncLookupClient(host, port) as client:
            record = await client.get("user_reading", 42)
    """

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, token=None):
        self.host, self.port, self.token = host, port, token
        self._ids = itertools.count(1)
        self._pending = collections.deque()     # (id, future), in the order sent
        self._writer = None
        self._reader_task = None

    @classmethod
    async def connect(cls, host=DEFAULT_HOST, port=DEFAULT_PORT, token=None):
        client = cls(host, port, token)
        await client.open()
        return client

    async def open(self):
        reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies(reader))
        if self.token is not None:
            await self.request({"op": "auth", "token": self.token})

    async def close(self):
        if self._writer is None:
            return
        self._writer.close()
        self._reader_task.cancel()
        try:
            await self._reader_task
        except (asyncio.CancelledError, ConnectionError):
            pass
        self._fail_pending(ConnectionError("the client was closed"))
        self._writer = None

    async def __aenter__(self):
        await self.open()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _read_replies(self, reader):
        """Hand each reply to the oldest pending request: the server answers
        in order, which also places error frames whose id is None."""
        try:
            while True:
                header = await reader.readexactly(FRAME_HEADER_BYTES)
                payload = await reader.readexactly(int.from_bytes(header, "big"))
                request_id, future = self._pending.popleft()
                if future.done():               # its caller was cancelled
                    continue
                try:
                    future.set_result(check_reply(decode_reply(payload), request_id))
                except (LookupServerError, ConnectionError) as error:
                    future.set_exception(error)
        except (asyncio.IncompleteReadError, ConnectionError, IndexError) as error:
            self._fail_pending(ConnectionError(f"lookup server connection lost: {error!r}"))

    def _fail_pending(self, error):
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)

    async def request(self, message):
        """Send one request and await its reply map."""
        if self._writer is None:
            raise ConnectionError("the client is not connected; use open() or connect()")
        if self._reader_task.done():
            raise ConnectionError("the lookup server connection is closed")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((request_id, future))
        self._writer.write(encode_frame(dict(message, id=request_id)))
        await self._writer.drain()
        return await future

    async def ping(self):
        await self.request({"op": "ping"})

    async def views(self):
        return (await self.request({"op": "views"}))["views"]

    async def get(self, view, key, features=None):
        return (await self.request(get_request(None, view, [key], features)))["records"][0]

    async def get_batch(self, view, keys, features=None):
        return (await self.request(get_request(None, view, list(keys), features)))["records"]

    async def get_many(self, view, keys, features=None, batch_size=DEFAULT_BATCH_SIZE):
        """The records of any number of keys, as concurrent (pipelined) requests
        of ``batch_size`` keys."""
        batches = split(keys, batch_size)
        replies = await asyncio.gather(*(self.get_batch(view, b, features) for b in batches))
        return [record for records in replies for record in records]

    async def service(self, name, rows):
        """As :meth:`LookupClient.service`."""
        return vectors_of(await self.service_columns(name, rows))

    async def service_columns(self, name, rows):
        """The same vectors as ``{column: [value of each row]}``."""
        return (await self.request(service_request(name, rows)))["columns"]
