"""The raw-ASGI edge: what the proxy, the raw authorize route and the dispatcher share.

JSON answers (the one error shape among them), the request body read within a size and a
deadline, header lookups. No framework here: these run on every proxied request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sidecar.errors import PayloadTooLarge, RequestTimeout, SidecarError

if TYPE_CHECKING:
    from litestar.types import HTTPScope, Receive, Send

Headers = list[tuple[bytes, bytes]]


class ClientGone(Exception):
    """The client left before its request body was in."""


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


def lowered(scope: HTTPScope) -> dict[str, str]:
    """The request's headers by lower-case name (the last of repeated ones)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(scope: HTTPScope, receive: Receive, limit: int, deadline_s: float) -> bytes:
    """The whole body, refused before reading when its declared length is over `limit`
    (PayloadTooLarge), and given up after `deadline_s` for all of it (RequestTimeout): a client
    trickling a byte at a time must not hold a request open for as long as it likes.
    Raises ClientGone when the client disconnects first."""
    declared = content_length(scope)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk: bytes = message.get("body", b"")  # type: ignore[assignment]
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body over {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {deadline_s:g} s") from None


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
