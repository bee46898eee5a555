"""`/v2/budgets` over HTTP against the real store: create, read, list with filters and
cursors, update, reset, delete; bad input is a 400 naming the field and writes nothing;
`include_budget` on the identity API."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient
from tests.support.clock import FakeClock


async def make(api: ApiClient, **fields: Any) -> dict[str, Any]:
    body = {"scope": {"kind": "identity", "target": "user_123"}, "amount_usd": 50.0, **fields}
    r = await api.post("/v2/budgets", json=body)
    assert r.status_code == 201, r.text
    api.app.services.clock.advance(0.01)  # ULIDs of one ms do not sort
    made: dict[str, Any] = r.json()
    return made


async def test_create_read_update_delete(api: ApiClient, clock: FakeClock) -> None:
    made = await make(
        api,
        period="monthly",
        token_limit=2_000_000,
        requests_per_minute=60,
        alerts=[{"threshold_percent": 80}, {"threshold_percent": 100}],
    )
    assert made["scope"] == {"kind": "identity", "target": "user_123"}
    assert (made["amount_usd"], made["token_limit"], made["requests_per_minute"]) == (
        50.0, 2_000_000, 60,
    )  # fmt: skip
    assert made["is_active"] is True and made["expires_at"] is None
    assert made["consumption"]["cost_usd"] == 0.0 and made["consumption"]["tokens"] == 0
    assert made["consumption"]["period_start"].endswith("-01T00:00:00Z")

    r = await api.get(f"/v2/budgets/{made['_id']}")
    assert r.status_code == 200 and r.json() == made

    r = await api.patch(
        f"/v2/budgets/{made['_id']}", json={"amount_usd": 75.5, "requests_per_minute": None}
    )
    assert r.status_code == 200, r.text
    patched = r.json()
    assert (patched["amount_usd"], patched["requests_per_minute"]) == (75.5, None)
    assert patched["token_limit"] == 2_000_000 and patched["created"] == made["created"]

    r = await api.delete(f"/v2/budgets/{made['_id']}")
    assert r.status_code == 204
    for method in ("get", "delete"):
        r = await getattr(api, method)(f"/v2/budgets/{made['_id']}")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = await api.patch(f"/v2/budgets/{made['_id']}", json={"amount_usd": 1})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"scope": {"kind": "identity", "target": "u"}}, "amount_usd"),
        ({"scope": {"kind": "team", "target": "u"}, "amount_usd": 1}, "scope.kind"),
        ({"scope": {"kind": "identity"}, "amount_usd": 1}, "scope.target"),
        ({"scope": {"kind": "tag", "target": ""}, "amount_usd": 1}, "scope.target"),
        ({"scope": {"kind": "identity", "target": "u"}, "amount_usd": "ten"}, "amount_usd"),
        ({"scope": {"kind": "identity", "target": "u"}, "amount_usd": True}, "amount_usd"),
        ({"scope": {"kind": "identity", "target": "u"}, "amount_usd": -1}, "amount_usd"),
        ({"scope": {"kind": "identity", "target": "u"}, "token_limit": 1.5}, "token_limit"),
        ({"scope": {"kind": "tag", "target": "u"}, "period": "hourly", "amount_usd": 1}, "period"),
        ({"scope": {"kind": "identity", "target": "u"}, "amount_usd": 1, "colour": 1}, "colour"),
        (
            {"scope": {"kind": "identity", "target": "u"}, "amount_usd": 1,
             "alerts": [{"threshold_percent": 150}]},
            "alerts[0].threshold_percent",
        ),
        (
            {"scope": {"kind": "identity", "target": "u"}, "amount_usd": 1,
             "expires_at": "2001-01-01T00:00:00Z"},
            "expires_at",
        ),
        ({"amount_usd": 1}, "scope"),
    ],
)  # fmt: skip
async def test_bad_input_is_a_400_naming_the_field_and_writes_nothing(
    api: ApiClient, redis: Redis, body: dict[str, Any], param: str
) -> None:
    before = await redis.dbsize()
    r = await api.post("/v2/budgets", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert await redis.dbsize() == before


async def test_a_bad_patch_changes_nothing(api: ApiClient) -> None:
    made = await make(api)
    for body, param in (
        ({"amount_usd": None}, "amount_usd"),
        ({"scope": {"kind": "tag", "target": "x"}}, "scope"),
        ({"alerts": [{"threshold_percent": 0}]}, "alerts[0].threshold_percent"),
        ({"period": 3}, "period"),
    ):
        r = await api.patch(f"/v2/budgets/{made['_id']}", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = await api.get(f"/v2/budgets/{made['_id']}")
    assert r.json() == made


async def test_unknown_and_malformed_ids_are_404(api: ApiClient) -> None:
    for path in (
        "/v2/budgets/01JDQ6ZK3N4X8V2B7C9D0E1F2G",
        "/v2/budgets/nope",
        "/v2/budgets/" + "x" * 300,
    ):
        for method, extra in (("get", ""), ("delete", ""), ("post", "/reset"), ("get", "/alerts")):
            r = await getattr(api, method)(path + extra)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["type"] == "not_found_error"


async def test_list_filters_and_cursors(api: ApiClient) -> None:
    a = await make(api, scope={"kind": "identity", "target": "ann"})
    b = await make(api, scope={"kind": "tag", "target": "team-a"})
    c = await make(api, scope={"kind": "api_key_owner", "target": "ann"}, is_active=False)
    d = await make(api, scope={"kind": "identity", "target": "bob"})

    async def ids(**params: Any) -> list[str]:
        r = await api.get("/v2/budgets", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list"
        return [x["_id"] for x in body["data"]]

    assert await ids() == [d["_id"], c["_id"], b["_id"], a["_id"]]  # newest first
    assert await ids(scope_kind="identity") == [d["_id"], a["_id"]]
    assert await ids(scope_kind="identity", scope_target="ann") == [a["_id"]]
    assert await ids(scope_target="ann") == [c["_id"], a["_id"]]
    assert await ids(is_active="false") == [c["_id"]]
    assert await ids(is_active="true", scope_target="ann") == [a["_id"]]

    r = await api.get("/v2/budgets", params={"limit": 2})
    assert [x["_id"] for x in r.json()["data"]] == [d["_id"], c["_id"]] and r.json()["has_more"]
    assert await ids(limit=2, starting_after=c["_id"]) == [b["_id"], a["_id"]]
    r = await api.get("/v2/budgets", params={"limit": 2, "starting_after": b["_id"]})
    assert [x["_id"] for x in r.json()["data"]] == [a["_id"]] and not r.json()["has_more"]
    assert await ids(limit=2, ending_before=a["_id"]) == [c["_id"], b["_id"]]
    assert all(
        x["consumption"]["cost_usd"] == 0.0 for x in (await api.get("/v2/budgets")).json()["data"]
    )

    for params, param in (
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"scope_kind": "team"}, "scope_kind"),
        ({"starting_after": "01JDQ6ZK3N4X8V2B7C9D0E1F2G"}, "starting_after"),
        ({"ending_before": "nope"}, "ending_before"),
        ({"starting_after": a["_id"], "ending_before": b["_id"]}, "ending_before"),
    ):
        r = await api.get("/v2/budgets", params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["param"] == param


async def test_include_budget_lists_what_applies_to_the_identity(api: ApiClient) -> None:
    r = await api.post("/v2/identities", json={"external_id": "ann", "tags": ["team-a", "vip"]})
    assert r.status_code == 201
    await api.post("/v2/identities", json={"external_id": "bob"})
    own = await make(api, scope={"kind": "identity", "target": "ann"}, token_limit=10)
    team = await make(api, scope={"kind": "tag", "target": "team-a"}, period="weekly")
    owner = await make(api, scope={"kind": "api_key_owner", "target": "ann"}, period="one_time")
    await make(api, scope={"kind": "tag", "target": "team-b"})
    await make(api, scope={"kind": "identity", "target": "ann"}, is_active=False)
    await make(api, scope={"kind": "identity", "target": "ann"}, expires_at="2099-01-01T00:00:00Z")
    api.app.services.clock.advance(100 * 365 * 86_400)  # the last one has expired

    r = await api.get("/v2/identities/ann", params={"include_budget": "true"})
    assert r.status_code == 200, r.text
    found = {b["_id"]: b for b in r.json()["budgets"]}
    assert set(found) == {own["_id"], team["_id"], owner["_id"]}
    assert found[own["_id"]]["consumption"]["tokens"] == 0
    assert found[owner["_id"]]["consumption"]["resets_at"] is None
    assert "budgets" not in (await api.get("/v2/identities/ann")).json()

    r = await api.get("/v2/identities", params={"include_budget": "true"})
    rows = {i["external_id"]: i for i in r.json()["data"]}
    assert {b["_id"] for b in rows["ann"]["budgets"]} == set(found)
    assert rows["bob"]["budgets"] == []
