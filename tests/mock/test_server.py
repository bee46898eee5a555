from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from sidecar.mock import MockServer, start_mock


async def test_requests_are_recorded(oai: openai.AsyncOpenAI, mock: MockServer) -> None:
    await oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"X-ORQ-IDENTITY-ID": "user_1"},
        extra_query={"trace": "1"},
    )
    recorded = mock.requests[-1]
    assert recorded.method == "POST"
    assert recorded.path == "/v1/chat/completions"
    assert recorded.query == "trace=1"
    assert recorded.header("x-orq-identity-id") == "user_1"
    assert ("authorization", "Bearer x") in recorded.headers
    body: dict[str, Any] = recorded.json()
    assert body["model"] == "gpt-4o"
    assert "identity" not in body


async def test_recording_keeps_the_last_thousand(
    http: aiohttp.ClientSession, mock: MockServer
) -> None:
    for index in range(1005):
        async with http.get(f"/v1/models?n={index}") as resp:
            await resp.read()
    assert len(mock.requests) == 1000
    assert mock.requests[0].query == "n=5"
    assert mock.requests[-1].query == "n=1004"


async def test_close_stops_accepting_and_closes_connections() -> None:
    server = await start_mock()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"x-mock-latency-ms: 10000\r\n\r\n{}"
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        await server.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await writer.wait_closed()
    assert server.active_tasks == 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)
