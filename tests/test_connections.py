"""The header deadline, the connection cap and a response's head written with its body, from
outside: raw sockets against the sidecar served as `sidecar serve` serves it
(sidecar.testing.serving uses the same protocol); HeadWithBody alone, on a recording transport."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from sidecar.app import create_app
from sidecar.connections import MAX_HEADER_BYTES, HeadWithBody
from sidecar.mock import start_mock
from sidecar.settings import parse
from sidecar.testing.redis_server import RedisServer
from sidecar.testing.serving import serve
from tests.support.auth import ADMIN_TOKEN
from tests.support.rawupstream import RawUpstream

DEADLINE = 0.5
# How late a close may come on a busy 2-core machine shared with other test runs.
SLACK = 2.0
HEALTHZ = b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\n\r\n"
CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()

Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def start(
    redis: Redis, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Start]:
    """A sidecar in front of the mock upstream (or `upstream`), with these `[server]` settings;
    its URL."""
    async with contextlib.AsyncExitStack() as stack:

        async def started(upstream: str | None = None, **server: Any) -> str:
            if upstream is None:
                mock = await start_mock()
                stack.push_async_callback(mock.close)
                upstream = mock.url
            data_dir = str(tmp_path_factory.mktemp("data"))
            settings = parse(
                {
                    "redis": {"url": redis_server.url, "timeout_ms": 2000},
                    "server": {"data_dir": data_dir, **server},
                    "upstream": {"url": upstream, "timeout_s": 10},
                }
            )
            app = create_app(settings, admin_token=ADMIN_TOKEN, redis=redis)
            url: str = await stack.enter_async_context(serve(app))
            return url

        yield started


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = time.monotonic()

    async def send(self, data: bytes) -> bool:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def response(self, within: float = 10) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(within):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status.split()[1]), headers, body

    async def until_closed(self, within: float) -> tuple[bytes, float]:
        """What the server sent until it closed the connection, and when (seconds since
        connect); TimeoutError when it is still open after `within`."""
        data = b""
        async with asyncio.timeout(within):
            with contextlib.suppress(ConnectionError, OSError):
                while chunk := await self.reader.read(65536):
                    data += chunk
        return data, time.monotonic() - self.opened

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


Open = Callable[[str], Awaitable[Conn]]


@pytest.fixture
async def connect() -> AsyncIterator[Open]:
    """Opens raw connections; closes them all at the end of the test."""
    opened: list[Conn] = []

    async def open_(url: str) -> Conn:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        opened.append(Conn(reader, writer))
        return opened[-1]

    yield open_
    for conn in opened:
        await conn.close()


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def error_of(data: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])["error"]
    return error


@pytest.mark.slow
async def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline(
    start: Start, connect: Open
) -> None:
    url = await start(header_timeout_s=DEADLINE)
    conn = await connect(url)
    data, at = await conn.until_closed(DEADLINE + SLACK)
    assert data == b""  # nothing was asked: nothing is answered
    assert at >= DEADLINE - 0.05


@pytest.mark.slow
async def test_headers_sent_a_byte_at_a_time_are_cut_at_the_deadline_with_408(
    start: Start, connect: Open
) -> None:
    url = await start(header_timeout_s=DEADLINE)
    conn = await connect(url)
    request = b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\nx-slow: " + b"a" * 1000

    async def trickle() -> None:
        for byte in request:
            if not await conn.send(bytes([byte])):
                return
            await asyncio.sleep(0.02)

    task = asyncio.create_task(trickle())
    try:
        data, at = await conn.until_closed(DEADLINE + SLACK)
    finally:
        task.cancel()
    assert at >= DEADLINE - 0.05
    assert status_of(data) == 408
    error = error_of(data)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "header_timeout"
    assert b"connection: close" in data.lower()


@pytest.mark.slow
async def test_an_idle_kept_alive_connection_outlives_the_header_deadline(
    start: Start, connect: Open
) -> None:
    url = await start(header_timeout_s=DEADLINE)
    conn = await connect(url)
    await conn.send(HEALTHZ)
    assert (await conn.response())[0] == 200
    await asyncio.sleep(3 * DEADLINE)  # keepalive_s (75 s) governs the silence between requests
    await conn.send(HEALTHZ)
    assert (await conn.response())[0] == 200


@pytest.mark.slow
async def test_a_later_request_has_the_deadline_from_its_first_byte(
    start: Start, connect: Open
) -> None:
    url = await start(header_timeout_s=DEADLINE)
    conn = await connect(url)
    await conn.send(HEALTHZ)
    assert (await conn.response())[0] == 200
    await conn.send(b"GET /healthz HTTP/1.1\r\n")  # in two pieces, within the deadline
    await asyncio.sleep(DEADLINE / 3)
    await conn.send(b"host: sidecar\r\n\r\n")
    assert (await conn.response())[0] == 200
    await asyncio.sleep(DEADLINE / 2)
    await conn.send(b"GET /healthz HTTP/1.1\r\n")
    first_byte = time.monotonic()
    data, _ = await conn.until_closed(DEADLINE + SLACK)
    assert time.monotonic() - first_byte >= DEADLINE - 0.05
    assert status_of(data) == 408


@pytest.mark.slow
async def test_a_response_or_body_slower_than_the_deadline_is_not_cut(
    start: Start, connect: Open
) -> None:
    url = await start(header_timeout_s=DEADLINE)
    conn = await connect(url)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: sidecar\r\n"
        b"content-type: application/json\r\nx-mock-latency-ms: 1200\r\n"
        b"content-length: %d\r\n\r\n" % len(CHAT)
    )
    await conn.send(head)
    for i in range(0, len(CHAT), 16):  # the body takes longer than the header deadline
        await asyncio.sleep(0.1)
        await conn.send(CHAT[i : i + 16])
    status, _, body = await conn.response()
    assert status == 200, body
    assert json.loads(body)["usage"]["total_tokens"] > 0
    assert time.monotonic() - conn.opened > 3 * DEADLINE


async def test_pipelined_requests_are_all_answered(start: Start, connect: Open) -> None:
    url = await start(header_timeout_s=DEADLINE)
    conn = await connect(url)
    await conn.send(HEALTHZ * 3)
    for _ in range(3):
        assert (await conn.response())[0] == 200


async def test_headers_over_the_size_cap_get_431(start: Start, connect: Open) -> None:
    url = await start()
    big = b"x-big: " + b"a" * MAX_HEADER_BYTES + b"\r\n"
    # Sent in pieces, never complete: refused as soon as the cap is passed.
    conn = await connect(url)
    await conn.send(b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\n")
    for i in range(0, len(big), 8192):
        if not await conn.send(big[i : i + 8192]):
            break
        await asyncio.sleep(0.01)
    data, _ = await conn.until_closed(SLACK)
    assert status_of(data) == 431
    assert error_of(data)["code"] == "headers_too_large"
    # Sent whole, complete in one go, with a body: answered 431 as a request.
    conn = await connect(url)
    await conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: sidecar\r\n" + big)
    await conn.send(b"content-length: %d\r\n\r\n%s" % (len(CHAT), CHAT))
    data, _ = await conn.until_closed(SLACK)
    assert status_of(data) == 431
    # Just under the cap: served.
    conn = await connect(url)
    fits = b"x-big: " + b"a" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    await conn.send(b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\n" + fits + b"\r\n")
    assert (await conn.response())[0] == 200


async def test_at_the_cap_the_connection_idle_longest_makes_room(
    start: Start, connect: Open
) -> None:
    url = await start(max_connections=16)
    conns = []
    for _ in range(16):
        conn = await connect(url)
        await conn.send(HEALTHZ)
        assert (await conn.response())[0] == 200
        conns.append(conn)
    newcomer = await connect(url)
    await newcomer.send(HEALTHZ)
    assert (await newcomer.response())[0] == 200
    data, _ = await conns[0].until_closed(SLACK)  # the one idle the longest
    assert data == b""
    for conn in conns[1:]:  # the others are still served
        await conn.send(HEALTHZ)
        assert (await conn.response())[0] == 200


@pytest.mark.slow
async def test_at_the_cap_with_none_idle_new_connections_are_closed(
    start: Start, connect: Open
) -> None:
    deadline = 1.5
    url = await start(max_connections=16, header_timeout_s=deadline)
    busy = []
    for _ in range(16):  # mid-headers: not idle
        conn = await connect(url)
        await conn.send(b"GET /healthz HTTP/1.1\r\n")
        busy.append(conn)
    refused = await connect(url)  # the kernel accepts it; the server closes it at once
    await refused.send(HEALTHZ)
    data, at = await refused.until_closed(SLACK)
    assert data == b""
    assert at < deadline
    for conn in busy:  # cut at their deadline, which frees the room
        data, _ = await conn.until_closed(deadline + SLACK)
        assert status_of(data) == 408
    later = await connect(url)
    await later.send(HEALTHZ)
    assert (await later.response())[0] == 200


class Recorded(asyncio.Transport):
    """A transport that keeps what was written, one entry per system call it would make."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_a_responses_head_goes_out_with_its_body_in_one_write() -> None:
    sent = Recorded()
    transport = HeadWithBody(sent, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert sent.calls == []
    transport.write(b"{}")
    assert sent.calls == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"more")  # later writes go as they come
    assert sent.calls[1:] == [b"more"]
    await asyncio.sleep(0)  # the flush at the end of the turn finds nothing left to write
    assert len(sent.calls) == 2


async def test_a_head_without_its_body_goes_out_at_the_end_of_the_event_loops_turn() -> None:
    sent = Recorded()
    transport = HeadWithBody(sent, asyncio.get_running_loop())
    transport.write(b"HEAD")
    await asyncio.sleep(0)
    assert sent.calls == [b"HEAD"]
    transport.write(b"event 1")
    assert sent.calls == [b"HEAD", b"event 1"]
    # Closed with its head held: the head is written first.
    sent = Recorded()
    transport = HeadWithBody(sent, asyncio.get_running_loop())
    transport.write(b"HEAD")
    transport.close()
    assert sent.calls == [b"HEAD"]
    assert sent.closed
    await asyncio.sleep(0)
    assert sent.calls == [b"HEAD"]


class SlowFirstEvent(RawUpstream):
    """A stream whose head comes at once and whose first event comes FIRST_EVENT_S later."""

    def parts_to(self, head: bytes, body: dict[str, Any]) -> list[tuple[float, bytes]]:
        start = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        event = b'data: {"id":"c","object":"chat.completion.chunk","choices":[]}\n\n'
        last = b"data: [DONE]\n\n"
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in (event, last)) + b"0\r\n\r\n"
        return [(0.0, start), (FIRST_EVENT_S, chunks)]


FIRST_EVENT_S = 1.0


async def test_a_streams_head_does_not_wait_for_its_first_event(
    start: Start, connect: Open
) -> None:
    async with SlowFirstEvent() as upstream:
        url = await start(upstream=upstream.url)
        conn = await connect(url)
        payload = json.dumps(json.loads(CHAT) | {"stream": True}).encode()
        await conn.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: sidecar\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(payload), payload)
        )
        sent = time.monotonic()
        async with asyncio.timeout(10):
            head = await conn.reader.readuntil(b"\r\n\r\n")
        got_head = time.monotonic()
        assert head.startswith(b"HTTP/1.1 200")
        assert b"text/event-stream" in head
        async with asyncio.timeout(10):
            rest = await conn.reader.readuntil(b"0\r\n\r\n")
        assert b"[DONE]" in rest
        # The head came when the upstream's did, not with the event a second later.
        assert got_head - sent < FIRST_EVENT_S / 2
        assert time.monotonic() - sent >= FIRST_EVENT_S


async def test_head_requests_and_a_request_after_them_are_answered_in_order(
    start: Start, connect: Open
) -> None:
    url = await start()
    conn = await connect(url)
    head_request = b"HEAD /healthz HTTP/1.1\r\nhost: sidecar\r\n\r\n"
    await conn.send(head_request + HEALTHZ)
    async with asyncio.timeout(10):
        first = await conn.reader.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 ")  # the HEAD answer's head, no body after it
    status, _, body = await conn.response()
    assert status == 200
    assert json.loads(body)
