"""What the composition root does at start-up, before the server listens."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis

from sidecar.app import create_app
from sidecar.settings import RedisSettings, parse
from sidecar.testing.redis_server import RedisServer
from sidecar.testing.serving import serve
from tests.support.auth import ADMIN_TOKEN

WARM = RedisSettings().warm_connections


def connections_received(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_connections_received"])


@pytest.mark.slow
async def test_the_server_listens_with_store_connections_open_and_scripts_loaded(
    redis_server: RedisServer,
) -> None:
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.script_flush()
        # No client handed in: the app connects from the URL, as `sidecar serve` does.
        app = create_app(parse({"redis": {"url": redis_server.url}}), admin_token=ADMIN_TOKEN)
        before = connections_received(admin)
        async with serve(app) as url:
            opened = connections_received(admin) - before
            assert opened >= WARM
            shas = [script.sha for script in app.services.scripts]
            assert all(shas)
            assert admin.script_exists(*shas) == [True] * len(shas)
            # A first burst of store calls (a PING each) finds its connections open.
            limits = httpx.Limits(max_connections=WARM)
            async with httpx.AsyncClient(base_url=url, limits=limits) as client:
                burst = [client.get("/readyz") for _ in range(WARM)]
                answers = await asyncio.gather(*burst)
            assert [r.status_code for r in answers] == [200] * WARM
            assert connections_received(admin) - before == opened


async def test_with_one_warm_connection_the_scripts_load_over_it(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.script_flush()
        settings = parse({"redis": {"url": redis_server.url, "warm_connections": 1}})
        services = create_app(settings, admin_token=ADMIN_TOKEN).services
        before = connections_received(admin)
        await services.open()
        try:
            # Counted before the loops open() started first run (the admin client blocks):
            # the warmed one, and the limiter's hot line (a connection of its own).
            assert connections_received(admin) - before == 2
            shas = [script.sha for script in services.scripts]
            assert len(shas) > 1
            assert all(shas)
            assert admin.script_exists(*shas) == [True] * len(shas)
        finally:
            await services.close()
            await services.redis.aclose()
