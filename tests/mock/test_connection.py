from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import aiohttp

from sidecar.mock import MockServer


async def exchange(mock: MockServer, data: bytes) -> bytes:
    """Send raw bytes, return everything read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_keep_alive_reuses_one_connection(mock: MockServer) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(mock.url, connector=connector) as session:
        for _ in range(50):
            async with session.post("/v1/chat/completions", json={"model": "m"}) as resp:
                assert resp.status == 200
                await resp.read()
            async with session.post(
                "/v1/chat/completions", json={"model": "m", "stream": True}
            ) as resp:
                assert resp.headers["transfer-encoding"] == "chunked"
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert mock.connections == 1


async def test_chunked_request_body(http: aiohttp.ClientSession, mock: MockServer) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "chunked",'
        yield b' "input": "x"}'

    async with http.post("/v1/embeddings", data=body()) as resp:
        assert resp.status == 200
        assert (await resp.json())["model"] == "chunked"
    assert mock.requests[-1].header("transfer-encoding") == "chunked"
    assert mock.requests[-1].json() == {"model": "chunked", "input": "x"}


async def test_pipelined_requests_are_answered_in_order(mock: MockServer) -> None:
    slow = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-mock-latency-ms: 50\r\n\r\n"
    body = b'{"model": "second"}'
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )
    last = b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await exchange(mock, slow + post + last)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200", b"404"]
    assert answer.index(b'"object":"list"') < answer.index(b'"model":"second"')


async def test_http10_without_keep_alive_is_closed(mock: MockServer) -> None:
    answer = await exchange(mock, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in answer
    body = b'{"stream": true}'
    streamed = await exchange(
        mock,
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body),
    )
    # No chunked framing in HTTP/1.0: the body ends with the connection.
    assert b"transfer-encoding" not in streamed
    assert streamed.endswith(b"data: [DONE]\n\n")


async def test_malformed_request_gets_400_and_close(mock: MockServer) -> None:
    answer = await exchange(mock, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer
    answer = await exchange(mock, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 2
    assert answer.index(b"200 OK") < answer.index(b"400 Bad Request")


async def test_head_request_gets_no_body(mock: MockServer) -> None:
    answer = await exchange(
        mock,
        b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    head, rest = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 405 ") and b"content-length: 0" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")


async def test_expect_100_continue(mock: MockServer) -> None:
    body = b'{"model": "m"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200 OK")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_client_leaving_mid_stream_leaves_no_task(mock: MockServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    body = b'{"stream": true}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        b"x-mock-chunks: 50\r\nx-mock-chunk-delay-ms: 20\r\n\r\n%b" % (len(body), body)
    )
    await asyncio.wait_for(reader.readuntil(b'"content":"Hello"'), 5)
    assert mock.active_tasks == 1
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if mock.active_tasks == 0:
            break
        await asyncio.sleep(0.01)
    assert mock.active_tasks == 0
