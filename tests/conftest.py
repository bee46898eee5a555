from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from sidecar.app import create_app
from sidecar.settings import Settings
from sidecar.testing.redis_server import RedisServer
from sidecar.testing.serving import ApiClient, serve

if TYPE_CHECKING:
    from sidecar.testing.otlp import OtlpReceiver

ADMIN_TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class FakeClock:
    def __init__(self, now: float = 1_795_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from sidecar.settings import parse

    data_dir = str(tmp_path_factory.mktemp("data"))
    return parse({"redis": {"url": redis_server.url}, "server": {"data_dir": data_dir}})


@pytest.fixture
async def api(redis: Redis, settings: Settings, clock: FakeClock) -> AsyncIterator[ApiClient]:
    app = create_app(settings, admin_token=ADMIN_TOKEN, redis=redis, clock=clock)
    async with serve(app) as url, ApiClient(base_url=url, headers=AUTH) as client:
        client.app = app
        yield client


@pytest.fixture
async def otlp() -> AsyncIterator[OtlpReceiver]:
    """An OTLP/HTTP traces receiver on loopback (a collector, for the telemetry tests)."""
    from sidecar.testing.otlp import OtlpReceiver

    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.close()
