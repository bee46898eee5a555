"""One client connection to the mock: requests answered in order, pipelined ones queued, slow
and broken answers played out as the x-mock-* controls ask."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import NamedTuple, cast

import httptools

from sidecar.mock import wire
from sidecar.mock.handlers import Router
from sidecar.mock.model import RecordedRequest, Reply
from sidecar.mock.reader import RequestReader
from sidecar.mock.shapes import JSON_TYPE
from sidecar.mock.wire import status_line

_RECORDED = 1000
# Pipelined requests queued behind a slow response before the socket stops being read.
_MAX_PENDING = 32


class _Pending(NamedTuple):
    request: RecordedRequest | None  # None: the stream turned out malformed at this point
    keep_alive: bool
    http10: bool
    too_large: bool


class State:
    """What the server's connections share."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.requests: deque[RecordedRequest] = deque(maxlen=_RECORDED)
        self.conns: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.closing = False
        self.all_lost: asyncio.Future[None] | None = None


class Connection(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self._state = state
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = RequestReader(self)
        self._pending: deque[_Pending] = deque()
        self._busy = False  # a response is being written by a task; later requests wait
        self._closing = False  # no more requests are read or answered
        self._lost = False
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    # -- transport events ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Headers and body go out in one write, but a streamed response is many small
            # writes: with Nagle on, each waits for the client's delayed ACK (about 40 ms).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._state.conns.add(self)
        self._state.accepted += 1
        if self._state.closing:
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._closing = True
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        state = self._state
        state.conns.discard(self)
        if not state.conns and state.all_lost is not None and not state.all_lost.done():
            state.all_lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._reader.feed(data)
        except httptools.HttpParserError:
            self._malformed()
        except httptools.HttpParserUpgrade:
            # Upgrades (h2c, websocket) are not offered: the request was answered as plain
            # HTTP/1.1, and what follows it on the wire is not HTTP/1.1, so stop there.
            self._closing = self._eof = True
            if not self._busy:
                self._close()

    def eof_received(self) -> bool | None:
        # A half-closed client still gets the answers to what it sent.
        self._eof = True
        return self._busy or bool(self._pending)

    def shutdown(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._closing = True
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- requests, from the reader -------------------------------------------------------------

    def expects_continue(self) -> None:
        # Pipelined behind an unanswered request, the interim answer would come out of
        # order; the client then sends its body after a timeout anyway.
        if not self._busy and not self._pending and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def received(
        self, request: RecordedRequest, keep_alive: bool, http10: bool, too_large: bool
    ) -> None:
        self._state.requests.append(request)
        if not self._busy:
            self._serve(request, keep_alive, http10, too_large)
            return
        self._pending.append(_Pending(request, keep_alive, http10, too_large))
        if len(self._pending) >= _MAX_PENDING and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True

    # -- answering -----------------------------------------------------------------------------

    def _malformed(self) -> None:
        if self._busy:
            # Answer in order: the requests already queued come first.
            self._pending.append(_Pending(None, False, False, False))
            self._closing = True
        else:
            self._serve(None, False, False, False)

    def _serve(
        self, request: RecordedRequest | None, keep_alive: bool, http10: bool, too_large: bool
    ) -> None:
        if request is None:
            body = (
                b'{"error":{"message":"Malformed HTTP request.",'
                b'"type":"invalid_request_error","param":null,"code":null}}'
            )
            head = b"content-type: " + JSON_TYPE + b"\r\n"
            self._write_head_and_body(Reply(400, head, body), False)
            self._close()
            return
        reply = self._state.router.route(request, too_large)
        if (
            reply.stream is None
            and keep_alive
            and not http10
            and not reply.latency
            and reply.drop_after is None
            and self._transport is not None
        ):
            # The common case, kept to one formatting step and one write.
            self._transport.write(
                b"%b%bcontent-length: %d\r\n\r\n%b"
                % (status_line(reply.status), reply.headers, len(reply.body), reply.body)
            )
            return
        item = _Pending(request, keep_alive, http10, too_large)
        if reply.latency > 0 or (reply.stream is not None and reply.chunk_delay > 0):
            self._busy = True
            task = self._loop.create_task(self._serve_later(reply, item))
            self._task = task
            self._state.tasks.add(task)
            task.add_done_callback(self._state.tasks.discard)
        else:
            self._send(reply, item)

    async def _serve_later(self, reply: Reply, item: _Pending) -> None:
        try:
            if reply.latency > 0:
                await asyncio.sleep(reply.latency)
            if self._lost:
                return
            if reply.stream is None or reply.chunk_delay <= 0:
                self._send(reply, item)
            else:
                await self._stream_slowly(reply, item)
        finally:
            self._task = None
            self._busy = False
        self._next()

    def _next(self) -> None:
        while self._pending and not self._busy and not self._lost:
            self._serve(*self._pending.popleft())
        if self._eof and not self._busy:
            self._close()
        if (
            self._reading_paused
            and not self._closing
            and len(self._pending) < _MAX_PENDING
            and self._transport is not None
        ):
            self._reading_paused = False
            self._transport.resume_reading()

    def _write_head_and_body(self, reply: Reply, keep_alive: bool, http10: bool = False) -> None:
        if self._transport is not None and not self._lost:
            self._transport.write(
                wire.head(reply, len(reply.body), keep_alive, http10) + reply.body
            )

    def _send(self, reply: Reply, item: _Pending) -> None:
        transport = self._transport
        if transport is None or self._lost:
            return
        stream = reply.stream
        drop = reply.drop_after
        if stream is None:
            if drop is not None:  # the upstream "dies" before answering
                self._close()
                return
            self._write_head_and_body(reply, item.keep_alive, item.http10)
            if not item.keep_alive:
                self._close()
            return
        # HTTP/1.0 has no chunked encoding: the body then ends where the connection does.
        keep_alive = item.keep_alive and not item.http10 and drop is None
        frame = wire.identity if item.http10 else wire.chunk
        if drop is None:
            frames = stream.head + stream.content + stream.tail
            end = b"" if item.http10 else wire.LAST_CHUNK
        else:
            frames = stream.head + stream.content[:drop]
            end = b""
        transport.write(
            wire.head(reply, None, keep_alive, item.http10)
            + b"".join([frame(f) for f in frames])
            + end
        )
        if not keep_alive:
            self._close()

    async def _stream_slowly(self, reply: Reply, item: _Pending) -> None:
        transport = self._transport
        stream = reply.stream
        assert transport is not None and stream is not None
        drop = reply.drop_after
        keep_alive = item.keep_alive and not item.http10 and drop is None
        frame = wire.identity if item.http10 else wire.chunk
        transport.write(
            wire.head(reply, None, keep_alive, item.http10)
            + b"".join([frame(f) for f in stream.head])
        )
        for index, content in enumerate(stream.content):
            if index == drop:
                self._close()
                return
            await asyncio.sleep(reply.chunk_delay)
            if self._lost:
                return
            transport.write(frame(content))
            if self._writing_paused:
                await self._drained()
                if self._lost:
                    return
        if drop is not None:
            self._close()
            return
        transport.write(
            b"".join([frame(f) for f in stream.tail]) + (b"" if item.http10 else wire.LAST_CHUNK)
        )
        if not keep_alive:
            self._close()

    async def _drained(self) -> None:
        self._drain = self._loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def _close(self) -> None:
        self._closing = True
        self._pending.clear()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
