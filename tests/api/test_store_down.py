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
