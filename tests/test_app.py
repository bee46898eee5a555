from __future__ import annotations

import asyncio

from sidecar.testing.serving import ApiClient as Client
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
