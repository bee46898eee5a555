"""A Redis server of a test's own (for tests that pause, kill or restart it), and a client
that gives up fast."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from redis.asyncio import Redis

from sidecar.testing.redis_server import RedisServer


@asynccontextmanager
async def own_redis(tmp_path: Path, *extra: str) -> AsyncIterator[RedisServer]:
    """A redis-server in `tmp_path/redis` (`extra`: its arguments), killed at the end."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", *extra)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@asynccontextmanager
async def quick_client(server: RedisServer, timeout_s: float) -> AsyncIterator[Redis]:
    """A client whose socket waits `timeout_s` at most, closed at the end."""
    client = Redis.from_url(server.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        yield client
    finally:
        await client.aclose()
