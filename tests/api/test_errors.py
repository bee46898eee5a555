from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sidecar.app import create_app
from sidecar.settings import parse
from sidecar.testing.redis_server import free_port
from sidecar.testing.serving import ApiClient, serve
from tests.support.auth import ADMIN_TOKEN, AUTH


@pytest.fixture
async def api_without_store() -> AsyncIterator[ApiClient]:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    redis = Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.2)
    app = create_app(parse({"redis": {"url": url}}), admin_token=ADMIN_TOKEN, redis=redis)
    async with serve(app) as base, ApiClient(base_url=base, headers=AUTH) as client:
        yield client
    await redis.aclose()


async def test_unreachable_store_is_a_503_json_error(api_without_store: ApiClient) -> None:
    assert (await api_without_store.get("/healthz")).status_code == 200
    ready = await api_without_store.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "store_unavailable"
    for method, path, body in [
        ("GET", "/v2/identities/someone", None),
        ("GET", "/v2/identities?search=x", None),
        ("POST", "/v2/identities", {"external_id": "x"}),
    ]:
        r = await api_without_store.request(method, path, json=body)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable_error"


async def test_unknown_route_and_method_are_json(api: ApiClient) -> None:
    r = await api.get("/v2/identities/someone/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # Paths the sidecar does not own go upstream; with none configured that is a 502.
    r = await api.get("/v2/nothing")
    assert r.status_code == 502 and r.json()["error"]["code"] == "no_upstream"
    r = await api.put("/v2/identities", json={})
    assert r.status_code == 405 and "error" in r.json()


async def test_body_over_the_api_limit_is_413(api: ApiClient, redis: Redis) -> None:
    r = await api.post(
        "/v2/identities",
        content=b'{"external_id": "big", "display_name": "' + b"x" * 3_000_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert await redis.dbsize() == 0
