from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import anthropic
import openai
import pytest

from sidecar.mock import MockServer, start_mock


@pytest.fixture
async def mock(caplog: pytest.LogCaptureFixture) -> AsyncIterator[MockServer]:
    server = await start_mock()
    yield server
    await server.close()
    # Disconnects, drops and shutdown must not leave errors in the event loop's log.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


@pytest.fixture
async def oai(mock: MockServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def claude(mock: MockServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=mock.url, api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def http(mock: MockServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(mock.url) as session:
        yield session
