"""Reading one HTTP/1.1 message off a raw stream: for the servers and clients that tests and
benchmarks write by hand, to send what a library would refuse to."""

from __future__ import annotations

import asyncio


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The head (up to its blank line) and the body its Content-Length gives (none: empty)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length) if length else b""
