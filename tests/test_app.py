from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

from redis.asyncio import Redis

from sidecar.app import create_app
from sidecar.settings import parse
from sidecar.testing.redis_server import RedisServer
from sidecar.testing.serving import ApiClient as Client
from sidecar.testing.serving import serve
from tests.support.identities import create


async def test_health_ready_and_schema(api: Client) -> None:
    health = (await api.get("/healthz", headers={"Authorization": ""})).json()
    health.pop("search_index", None)  # once checked: test_healthz_shows_the_search_index
    assert health == {
        "status": "ok",
        "policies": 0,
        "policy_reloads": 0,
        "policy_reload_errors": 0,
        "usage_waiting": 0,
        "spool_bytes": 0,
        "usage_dropped": 0,
    }
    assert (await api.get("/readyz", headers={"Authorization": ""})).status_code == 200
    schema = (await api.get("/schema/openapi.json")).json()
    assert "/v2/identities" in schema["paths"]


async def test_healthz_shows_the_search_index(api: Client) -> None:
    await create(api, external_id="first")
    for _ in range(100):
        health = (await api.get("/healthz")).json()
        if "search_index" in health:
            break
        await asyncio.sleep(0.02)
    # Checked at start, before the first identity; then once a minute.
    assert health["search_index"]["state"] in ("absent", "ready")
    assert set(health["search_index"]) == {"state", "identities", "indexed", "late", "late_ms"}


async def test_apps_in_one_process_share_the_routes_and_keep_their_services_and_tokens(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The routes are built once per process; each app's requests reach its own services
    (here: its own key prefix) and are let in by its own tokens only."""
    names = ("first", "second")
    apps = [
        create_app(
            parse(
                {
                    "redis": {"url": redis_server.url, "key_prefix": name, "warm_connections": 1},
                    "server": {"data_dir": str(tmp_path / name)},
                    "admin": {"hook_token": f"{name}-hook-token-0123456789"},
                }
            ),
            admin_token=f"{name}-admin-token-0123456789",
            redis=redis,
        )
        for name in names
    ]
    assert apps[0].api is apps[1].api
    async with AsyncExitStack() as stack:
        clients = []
        for app in apps:
            url = await stack.enter_async_context(serve(app))
            clients.append(await stack.enter_async_context(Client(base_url=url)))
        for name, client in zip(names, clients, strict=True):
            admin = {"Authorization": f"Bearer {name}-admin-token-0123456789"}
            r = await client.post("/v2/identities", json={"external_id": name}, headers=admin)
            assert r.status_code == 201, r.text
        for name, other, client in zip(names, names[::-1], clients, strict=True):
            admin = {"Authorization": f"Bearer {name}-admin-token-0123456789"}
            assert (await client.get(f"/v2/identities/{name}", headers=admin)).status_code == 200
            assert (await client.get(f"/v2/identities/{other}", headers=admin)).status_code == 404
            others = {"Authorization": f"Bearer {other}-admin-token-0123456789"}
            assert (await client.get(f"/v2/identities/{name}", headers=others)).status_code == 401
            usage = {"request_id": f"{name}-r1", "identity": name, "status": 500}
            for token, status in ((name, 202), (other, 401)):
                hook = {"x-sidecar-token": f"{token}-hook-token-0123456789"}
                r = await client.post("/hooks/usage", json=usage, headers=hook)
                assert r.status_code == status, r.text
        # Concurrent requests to both apps each reach their own.
        answers = await asyncio.gather(
            *(
                client.get(f"/v2/identities/{name}", headers=admin)
                for _ in range(10)
                for name, client in zip(names, clients, strict=True)
                for admin in [{"Authorization": f"Bearer {name}-admin-token-0123456789"}]
            )
        )
        assert [r.json()["external_id"] for r in answers] == list(names) * 10
        assert await redis.keys("first:*")
        assert await redis.keys("second:*")


async def test_started_runs_once_the_services_are_open(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    seen: list[bool] = []
    settings = parse(
        {"redis": {"url": redis_server.url}, "server": {"data_dir": str(tmp_path / "data")}}
    )
    app = create_app(
        settings,
        admin_token="admin-token-0123456789",
        redis=redis,
        started=lambda: seen.append(app.services.upstream.session is not None),
    )
    assert seen == []
    async with serve(app):
        assert seen == [True]
    assert seen == [True]
