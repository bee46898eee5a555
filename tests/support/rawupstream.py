"""An upstream on loopback that writes its answers byte for byte: for answers the mock upstream
will not give (a header no HTTP server writes, an answer without usage, any status)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Self

import msgspec

from sidecar.testing.rawhttp import read_message


class RawUpstream:
    """Reads each request (one per connection), then writes what `answer` makes of its JSON
    body, and closes. `requests`: how many it read."""

    def __init__(self) -> None:
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    def answer(self, body: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def answer_to(self, head: bytes, body: dict[str, Any]) -> bytes:
        """The answer to a request with this head (request line and headers, as sent) and
        JSON body: `answer`'s, unless a test needs the head."""
        return self.answer(body)

    def parts_to(self, head: bytes, body: dict[str, Any]) -> list[tuple[float, bytes]]:
        """The answer in parts, each written after a pause (seconds): `answer_to`'s at once,
        unless a test needs it to come in pieces."""
        return [(0.0, self.answer_to(head, body))]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head, raw = await read_message(reader)
            body = msgspec.json.decode(raw) if raw else {}
            self.requests += 1
            for pause, part in self.parts_to(head, body):
                if pause:
                    await asyncio.sleep(pause)
                writer.write(part)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def response(status: int, kind: bytes, body: bytes, *header_lines: bytes) -> bytes:
    """An HTTP/1.1 answer that closes its connection."""
    extra = b"".join(line + b"\r\n" for line in header_lines)
    return (
        b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n"
        % (status, kind, len(body), extra)
    ) + body
