"""Client connections: a deadline for request headers and a cap on open connections.

uvicorn bounds neither. Its keep-alive timer stops at a connection's first byte and is not
armed again until a response is sent, so a client that sends a byte now and then (slowloris),
or connects and sends nothing, holds a connection and its file descriptor for as long as it
likes. Its `limit_concurrency` is no connection cap either: it answers 503 to *requests* once
that many connections are open, so connections that send nothing would turn every real request
away. So the HTTP protocol (httptools, as `serve` runs it) is subclassed here:

- A request's headers must be in within `header_timeout_s`: from connect for a connection's
  first request; for a later one, from its first byte (the silence before it is the keep-alive
  timeout's). A request cut mid-headers is answered 408; a connection that sent nothing is just
  closed. Headers larger than MAX_HEADER_BYTES are answered 431.
- At most `max_connections` are open. Beyond that the connection idle the longest (kept alive,
  between requests) is closed to make room; when none is idle the new one is closed at once.

And a response's head is written with its first body bytes, in one system call (HeadWithBody).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from sidecar.errors import error_json

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

log = logging.getLogger("sidecar.server")

# Request line and headers of one request: what h11 would call its largest incomplete event;
# httptools sets no bound of its own. Reads that end with the headers incomplete count whole (it
# is what the parser holds); once they and the read that completes the headers pass the cap,
# the headers themselves are measured.
MAX_HEADER_BYTES = 65_536
REFUSED_LOG_EVERY_S = 10.0  # at the cap, one log line per this long, however many are refused


def _error(status: int, message: str, code: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = error_json(status, message, code=code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    return body, headers


async def _headers_too_large(scope: Any, receive: Any, send: Any) -> None:
    """The app a request whose headers are over the cap is given instead of the sidecar."""
    body, headers = _error(
        431, f"request headers larger than {MAX_HEADER_BYTES} bytes", "headers_too_large"
    )
    await send({"type": "http.response.start", "status": 431, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ConnectionGuard:
    """One server's header deadline and connection cap: a protocol factory for
    `uvicorn.Config(http=...)`. It is pickled into each worker process, where every worker
    counts its own connections."""

    def __init__(self, header_timeout_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.admitted: set[GuardedProtocol] = set()
        self.idle: dict[GuardedProtocol, None] = {}  # oldest idle first
        self.refused = 0
        self.evicted = 0
        self._logged_at = 0.0

    def __reduce__(self) -> tuple[type[ConnectionGuard], tuple[float, int]]:
        return ConnectionGuard, (self.header_timeout_s, self.max_connections)  # counts start anew

    def __call__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> GuardedProtocol:
        return GuardedProtocol(config, server_state, app_state, _loop, guard=self)

    @property
    def protocol(self) -> type[asyncio.Protocol]:
        """What uvicorn's Config takes as `http`: a class, or (as here) any callable making
        protocols with the class's arguments."""
        return cast("type[asyncio.Protocol]", self)

    def admit(self, conn: GuardedProtocol) -> bool:
        """Room for one more: an idle connection is closed for it if need be."""
        if len(self.admitted) >= self.max_connections:
            if not self.idle:
                self.refused += 1
                now = time.monotonic()
                if now - self._logged_at >= REFUSED_LOG_EVERY_S:
                    self._logged_at = now
                    log.warning(
                        "connection cap reached ([server] max_connections = %d), none idle: "
                        "new connections closed (%d so far)",
                        self.max_connections,
                        self.refused,
                    )
                return False
            oldest = next(iter(self.idle))
            self.evicted += 1
            oldest.evict()
        self.admitted.add(conn)
        return True

    def release(self, conn: GuardedProtocol) -> None:
        self.admitted.discard(conn)
        self.idle.pop(conn, None)


class GuardedProtocol(HttpToolsProtocol):
    """The deadline is a timer only while headers are incomplete: from connect until the first
    request's headers are in, and for a later request only when a read ends with its headers
    incomplete. A request that arrives whole in one read, as nearly all do, costs no timer."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.header_timer: asyncio.TimerHandle | None = None
        self.in_message = False  # the parser is inside a request (its headers or its body)
        self.in_headers = False  # ... and its headers are not complete
        self.header_bytes = 0  # read in earlier reads that ended with the headers incomplete
        self.last_read = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.abort()  # a reset: nothing of it lingers in TIME_WAIT here
            return
        self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self)
        self._disarm()
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed by the cap, to make room for a new connection."""
        self.guard.release(self)
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _between_requests(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def data_received(self, data: bytes) -> None:
        self.guard.idle.pop(self, None)
        self.last_read = len(data)
        super().data_received(data)
        between = self._between_requests()
        if not (self.in_headers or between) or self.transport.is_closing():
            return
        # This read ended with a request's headers incomplete, or with the connection between
        # requests (blank lines, or the rest of a body the answer did not wait for).
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self._timed_out)
        if self.in_message and not self.in_headers:
            return
        self.header_bytes += len(data)
        if self.header_bytes > MAX_HEADER_BYTES:  # no more of them is read
            if between:
                message = f"request headers larger than {MAX_HEADER_BYTES} bytes"
                self._refuse(431, message, "headers_too_large")
            else:  # pipelined behind a request in progress: no answer can be put in
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_message = self.in_headers = True

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self._disarm()
        # Only when the reads they came in (counted whole) pass the cap are the headers measured.
        oversized = (
            self.header_bytes + self.last_read > MAX_HEADER_BYTES
            and self._header_size() > MAX_HEADER_BYTES
        )
        self.header_bytes = 0
        if oversized:
            # Answered in turn, as uvicorn answers any request, by an app of its own.
            app, self.app = self.app, _headers_too_large
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope["method"] != "HEAD":  # a HEAD answer is a head only
            cycle.transport = HeadWithBody(self.transport, self.loop)  # type: ignore[assignment]

    def _flush_held(self) -> None:
        """Write the head a response holds (HeadWithBody) before the protocol writes itself."""
        cycle = self.cycle
        if cycle is not None and isinstance(cycle.transport, HeadWithBody):
            cycle.transport.flush()

    def send_400_response(self, msg: str) -> None:
        self._flush_held()
        super().send_400_response(msg)

    def _header_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_message_complete(self) -> None:
        self.in_message = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # kept alive, waiting for a request
            self.guard.idle[self] = None

    def _timed_out(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if not self._between_requests():
            # A pipelined request stalls behind one in progress: close after that response.
            if self.cycle is not None:
                self.cycle.keep_alive = False
            return
        if self.in_headers:
            seconds = f"{self.guard.header_timeout_s:g}"
            self._refuse(408, f"request headers not received within {seconds} s", "header_timeout")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """An answer written before any request could be parsed, then the connection closed."""
        self._flush_held()
        body, headers = _error(status, message, code)
        head = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            head += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()


class HeadWithBody:
    """The transport a response is written to: its first write (the head) is held until its next
    (the body, or a stream's first event), and both go out in one system call. Held no longer
    than the event loop's turn, so a stream's head does not wait for a first event that comes
    later. A JSON answer was two writes, each a system call (8 us here to a busy reader, 28 when
    it wakes one); a stream's head and first event in one write wake its client once
    (`bench.paired_bench --streams 60`: a stream's first byte 0.91-0.93 what it took; the JSON
    answers' p50 and the CPU per request unchanged, docs/benchmarks.md). A response holds
    nothing once complete (the protocol writes between responses); until then the protocol
    flushes it before writing itself (GuardedProtocol._flush_held)."""

    __slots__ = ("_first", "_flush_handle", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._first = True
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._flush_handle = self._loop.call_soon(self.flush)
            return
        held = self._held
        if held is None:
            self._transport.write(data)
            return
        self._held = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._transport.writelines((held, data))

    def flush(self) -> None:
        held, self._held = self._held, None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()
