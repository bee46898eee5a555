"""The raw-ASGI edge: what the proxy, the raw authorize route and the dispatcher share.

JSON answers (the one error shape among them), the request body read within a size and a
deadline, header lookups. No framework here: these run on every proxied request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sidecar.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, SidecarError

if TYPE_CHECKING:
    from litestar.types import HTTPScope, Receive, Send

Headers = list[tuple[bytes, bytes]]


class ClientGone(Exception):
    """The client left before its request body was in."""


# How often the body deadlines are checked: a body given up on is given up on this much late,
# at most.
TICK_S = 0.05


class BodyDeadlines:
    """Deadlines for reading request bodies, one timer per event loop for all of them.

    `asyncio.timeout` per request arms and cancels a timer of its own: about 7% of the
    proxy's CPU at saturation (py-spy, bench.proxy_bench), for a deadline that almost never
    fires. Here a request costs a dict entry; one timer, running while any body is being read,
    cancels the reads that are overdue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[asyncio.Task[object], float] = {}
        self.expired: set[asyncio.Task[object]] = set()
        self.handle: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[object], seconds: float) -> None:
        self.pending[task] = self.loop.time() + seconds
        if self.handle is None:
            self.handle = self.loop.call_at(self.loop.time() + TICK_S, self._tick)

    def done(self, task: asyncio.Task[object]) -> bool:
        """The read is over; True when it was its deadline that ended it."""
        self.pending.pop(task, None)
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    def _tick(self) -> None:
        now = self.loop.time()
        for task, deadline in list(self.pending.items()):
            if deadline <= now:
                del self.pending[task]
                self.expired.add(task)
                task.cancel()
        self.handle = self.loop.call_at(now + TICK_S, self._tick) if self.pending else None


_deadlines: dict[asyncio.AbstractEventLoop, BodyDeadlines] = {}


def body_deadlines() -> BodyDeadlines:
    """This event loop's (a process runs one; tests may run several in turn)."""
    loop = asyncio.get_running_loop()
    found = _deadlines.get(loop)
    if found is None:
        for old in [old for old in _deadlines if old.is_closed()]:
            del _deadlines[old]
        found = _deadlines[loop] = BodyDeadlines(loop)
    return found


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    content_type: bytes = b"application/json",
    head: bool = False,
) -> None:
    """A whole answer; `head`: its headers only (a HEAD request)."""
    out = [(b"content-type", content_type), (b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


async def send_error(send: Send, error: SidecarError, *, close: bool = False) -> None:
    """The error as JSON; `close`: the rest of the request body is never read, so the
    connection is closed rather than reused with a half-read request on it."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send_json(send, error.status, error.json(), headers)


def content_length(scope: HTTPScope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def lowered(scope: HTTPScope, single: frozenset[str] = frozenset()) -> dict[str, str]:
    """The request's headers by lower-case name (the last of repeated ones). InvalidRequest
    (400, `ambiguous_header`) when one named in `single` comes more than once with different
    values, or spelled with underscores for its dashes: the sidecar would read one and a server
    after it perhaps the other."""
    raw = scope["headers"]
    if not isinstance(raw, list):  # uvicorn's is; ASGI asks for an iterable
        raw = list(raw)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
    if single and "_" in "".join(headers):  # rare
        for name in headers:
            dashed = name.replace("_", "-")
            if dashed != name and dashed in single:
                message = (
                    f"the {name} header is {dashed} to a server that maps headers to variables "
                    f"(CGI, WSGI: both are HTTP_{dashed.upper().replace('-', '_')}), which the "
                    f"sidecar does not read as {dashed}: send it as {dashed}"
                )
                raise InvalidRequest(message, param=name, code="ambiguous_header")
    if len(headers) < len(raw):  # a name repeated: rare
        for name in single.intersection(headers):
            wanted = name.encode("latin-1")
            if len({value for key, value in raw if key.lower() == wanted}) > 1:
                message = f"the {name} header is sent more than once, with different values"
                raise InvalidRequest(message, param=name, code="ambiguous_header")
    return headers


async def read_body(scope: HTTPScope, receive: Receive, limit: int, deadline_s: float) -> bytes:
    """The whole body, refused before reading when its declared length is over `limit`
    (PayloadTooLarge), and given up after `deadline_s` for all of it (RequestTimeout): a client
    trickling a byte at a time must not hold a request open for as long as it likes.
    Raises ClientGone when the client disconnects first."""
    declared = content_length(scope)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    first = await receive() if _ready(receive) else None
    if first is not None and first["type"] == "http.request" and not first.get("more_body"):
        # All of it was in when the request started (most are): nothing to wait for.
        whole: bytes = first.get("body", b"")
        if len(whole) > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        return whole
    chunks: list[bytes] = []
    size = 0
    task = asyncio.current_task()
    assert task is not None
    deadlines = body_deadlines()
    deadlines.add(task, deadline_s)
    try:
        while True:
            message = first or await receive()
            first = None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")  # type: ignore[assignment]
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except asyncio.CancelledError:
        if deadlines.done(task) and task.uncancel() == 0:
            raise RequestTimeout(f"request body not received within {deadline_s:g} s") from None
        raise
    finally:
        deadlines.done(task)


def _ready(receive: Receive) -> bool:
    """Whether the server already holds the request's next message, so that `receive` returns
    it at once: uvicorn's request cycle says so (its `message_event`). Any other server's
    receive is taken to wait."""
    event = getattr(getattr(receive, "__self__", None), "message_event", None)
    return isinstance(event, asyncio.Event) and event.is_set()


def with_body_deadline(receive: Receive, seconds: float) -> Receive:
    """`receive`, giving up on the request body `seconds` after the request began (raising
    RequestTimeout, which the routes' error handler answers with a 408); once the body is
    in, it waits as long as the server does."""
    deadline = asyncio.get_running_loop().time() + seconds
    done = False

    async def bounded() -> object:
        nonlocal done
        if done:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(f"request body not received within {seconds:g} s") from None
        done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return bounded  # type: ignore[return-value]
