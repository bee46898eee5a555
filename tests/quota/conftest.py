"""A Redis server of a test's own, for the tests that pause, kill or restart it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sidecar.testing.redis_server import RedisServer
from tests.support.redis import own_redis, quick_client


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with own_redis(tmp_path) as server:
        yield server


@pytest.fixture
async def private_client(private_redis: RedisServer) -> AsyncIterator[Redis]:
    # Closed after the app that uses it (fixtures end in reverse order).
    async with quick_client(private_redis, 0.2) as client:
        yield client
