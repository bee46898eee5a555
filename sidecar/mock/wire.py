"""HTTP/1.1 framing of the mock's answers: status lines, header blocks, chunks."""

from __future__ import annotations

import http
from functools import lru_cache

from sidecar.mock.model import Reply

LAST_CHUNK = b"0\r\n\r\n"


@lru_cache(maxsize=1024)
def status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Overloaded" if status == 529 else "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


def chunk(frame: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(frame), frame)


def identity(frame: bytes) -> bytes:
    return frame


def head(reply: Reply, length: int | None, keep_alive: bool, http10: bool) -> bytes:
    """The status line and headers; `length` None: a body whose end the framing marks."""
    if length is not None:
        framing = b"content-length: %d\r\n" % length
    else:
        framing = b"" if http10 else b"transfer-encoding: chunked\r\n"
    if not keep_alive:
        framing += b"connection: close\r\n"
    elif http10:
        framing += b"connection: keep-alive\r\n"
    return status_line(reply.status) + reply.headers + framing + b"\r\n"
