"""The msgpack/TCP front end: reads frames, answers each in order (see
``tally.service.lookup.protocol`` for the frames, ops and error codes).

It is an asyncio Protocol, not a streams handler: a frame is answered in
``data_received`` itself when the store's reads do not block (libtally, the
writer's LmdbStore: microseconds, see ``tally.service.lookup.service``), so
a request costs no task wake-up and no stream buffer between the socket and
the answer -- about 10 us a request, a fifth of a 1-row lookup's time in
the server. Over a store whose reads block (Aerospike) each frame is
answered by a task, and the frames after it wait for it (replies keep the
order of requests). While the client does not read its replies (the
transport's buffer is full) the connection's input is paused.
"""
import asyncio
import logging
import socket
import time

import msgpack

from tally.service.lookup.client import FRAME_HEADER_BYTES
from tally.service.lookup.frontend import (DEFAULT_IDLE_TIMEOUT_SECONDS,
                                           DEFAULT_MAX_CONNECTIONS, REFUSAL_LINGER_SECONDS,
                                           Connections, count_request)
from tally.service.lookup.protocol import (DEFAULT_MAX_FRAME_BYTES, GARBAGE_FRAME_BYTES, OPS,
                                           RequestError, decode_request, encode_frame_bytes,
                                           error_reply, request_id_of)
from tally.service.lookup.service import Session

log = logging.getLogger("tally.server")


class TcpFrontEnd:
    def __init__(self, service, metrics, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
                 http_port=None, max_connections=DEFAULT_MAX_CONNECTIONS,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT_SECONDS):
        self.service = service
        self.metrics = metrics
        self.connections = Connections("tcp", metrics, max_connections, idle_timeout)
        self.max_frame_bytes = max_frame_bytes
        self.garbage_bytes = max(GARBAGE_FRAME_BYTES, 4 * max_frame_bytes)
        self.http_port = http_port
        self.inline = not service.store.blocking

    def protocol(self):
        """A protocol for one connection (``loop.create_server``'s factory)."""
        return _FrameProtocol(self)

    async def answer(self, payload, session):
        """-> (reply payload, op label, status label, keys looked up)."""
        request_id, op = None, "invalid"
        try:
            request = decode_request(payload)
            request_id = request_id_of(request)
            op = request.get("op") if request.get("op") in OPS else "invalid"
            body = await self.service.handle(request, session)
        except RequestError as error:
            return error_reply(request_id, error.code, error.message), op, error.code, 0
        except Exception:
            log.exception("internal error answering a %s request", op)
            return error_reply(request_id, "internal", "internal server error; see its log"), \
                op, "internal", 0
        reply = {"id": request_id, "ok": True}
        reply.update(body)
        n_keys = len(body["records"]) if op == "get" else 0
        return msgpack.packb(reply), op, "ok", n_keys

    def answer_now(self, payload, session):
        """``answer`` run to its end at once: over a store whose reads do not
        block it never suspends (nothing in it awaits anything else)."""
        coroutine = self.answer(payload, session)
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        coroutine.close()
        raise RuntimeError("a lookup over a non-blocking store suspended")

    def oversized_message(self, length):
        return f"frame of {length} bytes exceeds max_frame_bytes={self.max_frame_bytes}"

    def garbage_message(self, length):
        hint = f" (HTTP is served on port {self.http_port})" if self.http_port else ""
        return (f"frame length {length} is not plausible; closing. Is this an HTTP "
                f"or other non-Tally client on the msgpack port?{hint}")


class _FrameProtocol(asyncio.Protocol):
    """One connection: splits its input into frames and answers them in order."""

    def __init__(self, front):
        self.front = front
        self.session = Session()
        self.buffer = bytearray()
        self.transport = None
        self.connection = None          # its Connection while registered
        self.gone = None                # a future set when the connection is lost
        self.task = None                # answering a frame over a blocking store
        self.paused = False             # the client does not read its replies
        self.discarding = 0             # bytes left of an oversized frame
        self.oversized = 0              # that frame's length

    def connection_made(self, transport):
        self.transport = transport
        self.gone = asyncio.get_running_loop().create_future()
        sock = transport.get_extra_info("socket")
        if sock is not None:            # replies are single small writes, as requests
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connections = self.front.connections
        if connections.full():
            self._refuse(connections)
            return
        self.connection = connections.register(self.gone, transport)

    def _refuse(self, connections):
        """Answer ``too_many_connections`` and close once the client has
        gone or REFUSAL_LINGER_SECONDS have passed, reading (and dropping)
        what it sends meanwhile (see tally.service.lookup.frontend)."""
        connections.count_refusal()
        self.transport.write(encode_frame_bytes(error_reply(
            None, "too_many_connections", connections.refusal_message())))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, self.transport.close)

    def connection_lost(self, exc):
        if self.connection is not None:
            self.connection = None
            self.front.connections.unregister(self.gone)
        if self.task is not None:
            self.task.cancel()
        if not self.gone.done():
            self.gone.set_result(None)

    def eof_received(self):
        return False                    # close: between frames or mid-frame alike

    def pause_writing(self):
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self):
        self.paused = False
        self.transport.resume_reading()
        self._serve_frames()

    def data_received(self, data):
        if self.connection is None:     # refused: dropped
            return
        self.buffer += data
        self._serve_frames()

    def _serve_frames(self):
        """Answer the buffered frames, until one is incomplete, one is
        answered by a task, or the client stops reading replies."""
        buffer = self.buffer
        while self.task is None and not self.paused and self.connection is not None:
            if self.discarding:
                dropped = min(self.discarding, len(buffer))
                del buffer[:dropped]
                self.discarding -= dropped
                if self.discarding:
                    return
                self._refuse_frame(self.front.oversized_message(self.oversized))
                continue
            if len(buffer) < FRAME_HEADER_BYTES:
                return
            length = int.from_bytes(buffer[:FRAME_HEADER_BYTES], "big")
            if length > self.front.max_frame_bytes:
                del buffer[:FRAME_HEADER_BYTES]
                self._oversized(length)
                continue
            end = FRAME_HEADER_BYTES + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[FRAME_HEADER_BYTES:end])
            del buffer[:end]
            self._answer(payload)

    def _answer(self, payload):
        started = self.connection.last_request = time.perf_counter()
        if self.front.inline:
            self._reply(started, *self.front.answer_now(payload, self.session))
            return
        self.task = asyncio.get_running_loop().create_task(
            self.front.answer(payload, self.session))
        self.task.add_done_callback(lambda task: self._answered(task, started))

    def _answered(self, task, started):
        self.task = None
        if task.cancelled():            # the connection was lost meanwhile
            return
        self._reply(started, *task.result())
        self._serve_frames()

    def _reply(self, started, reply, op, status, n_keys):
        self.transport.write(encode_frame_bytes(reply))
        count_request(self.front.metrics, "tcp", op, status, time.perf_counter() - started,
                      n_keys)

    def _oversized(self, length):
        """A frame longer than allowed: discarded, then refused; a length
        that is garbage closes the connection (see tally.service.lookup.protocol)."""
        self.connection.last_request = time.perf_counter()
        if length > self.front.garbage_bytes:
            self._refuse_frame(self.front.garbage_message(length))
            self.connection = None      # nothing after it can be trusted to be in step
            self.front.connections.unregister(self.gone)
            return
        self.discarding = self.oversized = length

    def _refuse_frame(self, message):
        started = time.perf_counter()
        self.transport.write(encode_frame_bytes(error_reply(None, "frame_too_big", message)))
        count_request(self.front.metrics, "tcp", "invalid", "frame_too_big",
                      time.perf_counter() - started)
