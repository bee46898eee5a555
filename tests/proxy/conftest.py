from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.app import create_app
from sidecar.dispatch import Sidecar
from sidecar.mock import MockServer, start_mock
from sidecar.settings import parse
from sidecar.testing.redis_server import RedisServer
from sidecar.testing.serving import ApiClient, serve
from tests.conftest import ADMIN_TOKEN, AUTH, FakeClock


async def settle(app: Sidecar) -> None:
    """Wait for the usage writes that run after each response."""
    services = app.services
    for _ in range(100):
        tasks = list(services.background.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await services.recorder.drain()
        if not services.background.tasks:
            return
    raise AssertionError("usage writes did not finish")


@dataclass
class Env:
    url: str  # the sidecar
    mock: MockServer
    app: Sidecar
    api: ApiClient
    redis: Redis

    async def settle(self) -> None:
        await settle(self.app)

    async def metrics(self, external_id: str) -> dict[str, Any]:
        await self.settle()
        r = await self.api.get(f"/v2/identities/{external_id}", params={"include_metrics": "true"})
        assert r.status_code == 200, r.text
        metrics: dict[str, Any] = r.json()["metrics"]
        return metrics


MakeEnv = Callable[..., Any]


@pytest.fixture
async def make_env(
    redis: Redis,
    redis_server: RedisServer,
    clock: FakeClock,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[MakeEnv]:
    opened: list[Any] = []

    async def make(
        upstream_url: str | None = None,
        real_clock: bool = False,
        redis_client: Redis | None = None,
        **config: Any,
    ) -> Env:
        mock = await start_mock()
        opened.append(mock)
        # Checks get time to answer on a busy test machine instead of failing open (the outage
        # tests set their own short timeout).
        raw: dict[str, Any] = {"redis": {"url": redis_server.url, "timeout_ms": 2000}}
        raw["server"] = {"data_dir": str(tmp_path_factory.mktemp("data"))}  # the spool
        raw["upstream"] = {"url": upstream_url or mock.url, "timeout_s": 5}
        for section, values in config.items():
            raw[section] = values if section == "api_keys" else {**raw.get(section, {}), **values}
        app = create_app(
            parse(raw),
            admin_token=ADMIN_TOKEN,
            redis=redis_client or redis,
            clock=time.time if real_clock else clock,
        )
        context = serve(app)
        url = await context.__aenter__()
        opened.append(context)
        api = ApiClient(base_url=url, headers=AUTH)
        opened.append(api)
        return Env(url=url, mock=mock, app=app, api=api, redis=redis)

    yield make
    for item in reversed(opened):
        if isinstance(item, ApiClient):
            await item.aclose()
        elif isinstance(item, MockServer):
            await item.close()
        else:
            await item.__aexit__(None, None, None)


@pytest.fixture
async def env(make_env: MakeEnv) -> Env:
    made: Env = await make_env()
    return made
