from __future__ import annotations

from sidecar.testing.serving import ApiClient as Client


async def test_admin_token_is_required(api: Client) -> None:
    for headers in [
        {"Authorization": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dGVzdA=="},
    ]:
        r = await api.get("/v2/identities", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    r = await api.post("/v2/identities", json={"external_id": "x"}, headers={"Authorization": ""})
    assert r.status_code == 401
