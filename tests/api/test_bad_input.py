from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient as Client
from tests.support.identities import create, snapshot


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


BAD_CREATES: list[tuple[Any, str | None]] = [
    ({"external_id": 5}, "external_id"),
    ({"external_id": ""}, "external_id"),
    ({"external_id": "   "}, "external_id"),
    ({"external_id": "x" * 256}, "external_id"),
    ({"external_id": "bad\nid"}, "external_id"),
    ({}, "external_id"),
    ({"external_id": "a", "display_name": "x" * 1_000_000}, "display_name"),
    ({"external_id": "a", "display_name": 3}, "display_name"),
    ({"external_id": "a", "tags": [f"t{i}" for i in range(10_000)]}, "tags"),
    ({"external_id": "a", "tags": "premium"}, "tags"),
    ({"external_id": "a", "tags": [""]}, "tags[0]"),
    ({"external_id": "a", "tags": ["x" * 65]}, "tags[0]"),
    ({"external_id": "a", "metadata": nested(100)}, "metadata.n"),
    ({"external_id": "a", "metadata": {f"k{i}": i for i in range(21)}}, "metadata"),
    (
        {
            "external_id": "a",
            "metadata": [{f"k{i}": i for i in range(15)}, {f"j{i}": i for i in range(6)}],
        },
        "metadata",
    ),
    ({"external_id": "a", "metadata": "plan=pro"}, "metadata"),
    ({"external_id": "a", "metadata": {"k": [1, 2]}}, "metadata.k"),
    ({"external_id": "a", "metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"external_id": "a", "email": "not-an-email"}, "email"),
    ({"external_id": "a", "logo_url": "javascript:alert(1)"}, "logo_url"),
    ({"external_id": "a", "avatar_url": "https://a/x", "logo_url": "https://b/y"}, "logo_url"),
    ({"external_id": "a", "favourite_colour": "blue"}, "favourite_colour"),
    ([{"external_id": "a"}], None),
]


@pytest.mark.parametrize(("body", "param"), BAD_CREATES)
async def test_bad_create_is_400_and_writes_nothing(
    api: Client, redis: Redis, body: Any, param: str | None
) -> None:
    await create(api, external_id="existing")
    before = await snapshot(redis)
    r = await api.post(
        "/v2/identities", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert await snapshot(redis) == before


@pytest.mark.parametrize(
    "content", [b"not json", b"{", b"", b"\xff\xfe", b'{"external_id": "a",}', b"null"]
)
async def test_non_json_body_is_400(api: Client, redis: Redis, content: bytes) -> None:
    r = await api.post(
        "/v2/identities", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert await redis.dbsize() == 0


async def test_bad_patch_changes_nothing(api: Client, redis: Redis) -> None:
    await create(api, external_id="p", display_name="keep", tags=["a"])
    before = await snapshot(redis)
    for body in [
        {"tags": ["ok", "x" * 100]},
        {"display_name": "ok", "email": "bad"},
        {"metadata": nested(5)},
        {"unknown": 1},
    ]:
        r = await api.patch("/v2/identities/p", json=body)
        assert r.status_code == 400, r.text
    assert await snapshot(redis) == before


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "abc"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"starting_after": "garbage"}, "starting_after"),
        ({"starting_after": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}, "starting_after"),
        ({"ending_before": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}, "ending_before"),
        ({"starting_after": "x" * 10_000}, "starting_after"),
        ({"include_metrics": "maybe"}, "include_metrics"),
        ({"search": "a\x00b"}, "search"),
    ],
)
async def test_bad_list_query_is_400(api: Client, params: dict[str, str], param: str) -> None:
    await create(api, external_id="someone")
    r = await api.get("/v2/identities", params=params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_both_cursors_is_400(api: Client) -> None:
    made = await create(api, external_id="c")
    r = await api.get(
        "/v2/identities", params={"starting_after": made["_id"], "ending_before": made["_id"]}
    )
    assert r.status_code == 400


async def test_huge_id_in_path_is_400(api: Client) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        r = await api.request(method, "/v2/identities/" + "x" * 10_240, json={})
        assert r.status_code == 400, (method, r.text)
        assert r.json()["error"]["param"] == "id"


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


async def test_unknown_route_and_method_are_json(api: Client) -> None:
    r = await api.get("/v2/identities/someone/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # Paths the sidecar does not own go upstream; with none configured that is a 502.
    r = await api.get("/v2/nothing")
    assert r.status_code == 502 and r.json()["error"]["code"] == "no_upstream"
    r = await api.put("/v2/identities", json={})
    assert r.status_code == 405 and "error" in r.json()


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


async def test_body_over_the_api_limit_is_413(api: Client, redis: Redis) -> None:
    r = await api.post(
        "/v2/identities",
        content=b'{"external_id": "big", "display_name": "' + b"x" * 3_000_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert await redis.dbsize() == 0
