"""The msgpack/TCP front end: reads frames, answers each in order (see
``tally.service.lookup.protocol`` for the frames, ops and error codes)."""
import asyncio
import logging
import time

import msgpack

from tally.service.lookup.client import FRAME_HEADER_BYTES
from tally.service.lookup.frontend import (DEFAULT_IDLE_TIMEOUT_SECONDS,
                                           DEFAULT_MAX_CONNECTIONS, Connections, count_request)
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

    async def serve_connection(self, reader, writer):
        if self.connections.full():
            reply = encode_frame_bytes(error_reply(None, "too_many_connections",
                                                   self.connections.refusal_message()))
            await self.connections.refuse(reader, writer, reply)
            return
        session = Session()
        async with self.connections.open(writer) as connection:
            while await self._serve_frame(reader, writer, session, connection):
                pass

    async def _serve_frame(self, reader, writer, session, connection):
        """Answer one frame; False when the connection is to close."""
        try:
            header = await reader.readexactly(FRAME_HEADER_BYTES)
        except asyncio.IncompleteReadError:
            return False                    # a clean close between frames
        started = connection.last_request = time.perf_counter()
        length = int.from_bytes(header, "big")
        if length > self.max_frame_bytes:
            keep_open = await self._refuse_oversized(reader, writer, length)
            count_request(self.metrics, "tcp", "invalid", "frame_too_big",
                          time.perf_counter() - started)
            return keep_open
        payload = await reader.readexactly(length)
        reply, op, status, n_keys = await self._answer(payload, session)
        writer.write(encode_frame_bytes(reply))
        await writer.drain()                # waits only if the client stops reading
        count_request(self.metrics, "tcp", op, status, time.perf_counter() - started, n_keys)
        return True

    async def _answer(self, payload, session):
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

    async def _refuse_oversized(self, reader, writer, length):
        """Discard a frame longer than allowed, then refuse it; close if its
        length is garbage (see tally.service.lookup.protocol)."""
        if length > self.garbage_bytes:
            hint = f" (HTTP is served on port {self.http_port})" if self.http_port else ""
            message = (f"frame length {length} is not plausible; closing. Is this an HTTP "
                       f"or other non-Tally client on the msgpack port?{hint}")
            writer.write(encode_frame_bytes(error_reply(None, "frame_too_big", message)))
            await writer.drain()
            return False
        remaining = length
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 16))
            if not chunk:
                return False
            remaining -= len(chunk)
        message = f"frame of {length} bytes exceeds max_frame_bytes={self.max_frame_bytes}"
        writer.write(encode_frame_bytes(error_reply(None, "frame_too_big", message)))
        await writer.drain()
        return True
