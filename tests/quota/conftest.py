"""A Redis server of a test's own, for the tests that pause, kill or restart it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sidecar.testing.redis_server import RedisServer


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def private_client(private_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    yield client  # closed after the app that uses it (fixtures end in reverse order)
    await client.aclose()
