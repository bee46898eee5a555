from __future__ import annotations

from sidecar.testing.serving import ApiClient as Client


async def test_health_ready_and_schema(api: Client) -> None:
    health = (await api.get("/healthz", headers={"Authorization": ""})).json()
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
