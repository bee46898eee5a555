from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient as Client
from tests.support.clock import FakeClock
from tests.support.env import Env
from tests.support.identities import create, snapshot


async def test_create_returns_the_record(api: Client) -> None:
    body = await create(
        api,
        external_id="user_12345",
        display_name="John Smith",
        email="john@example.com",
        logo_url="https://example.com/a.jpg",
        tags=["premium"],
        metadata={"plan": "pro"},
    )
    assert len(body["_id"]) == 26
    assert body["external_id"] == "user_12345"
    assert body["display_name"] == "John Smith"
    assert body["email"] == "john@example.com"
    assert body["avatar_url"] == "https://example.com/a.jpg"
    assert body["tags"] == ["premium"]
    assert body["metadata"] == {"plan": "pro"}
    assert body["created"] == "2026-11-18T11:06:40Z"
    assert body["updated"] == body["created"]
    assert "logo_url" not in body and "metrics" not in body


async def test_create_twice_is_409(api: Client, redis: Redis) -> None:
    await create(api, external_id="dup")
    before = await snapshot(redis)
    r = await api.post("/v2/identities", json={"external_id": "dup", "display_name": "x"})
    assert r.status_code == 409
    assert r.json()["error"]["type"] == "conflict_error"
    assert await snapshot(redis) == before


async def test_get_by_id_and_external_id(api: Client) -> None:
    made = await create(api, external_id="alice")
    by_id = await api.get(f"/v2/identities/{made['_id']}")
    by_external = await api.get("/v2/identities/alice")
    assert by_id.json() == made == by_external.json()


async def test_unknown_identity_is_404_json(api: Client) -> None:
    r = await api.get("/v2/identities/nobody")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "no identity with _id or external_id 'nobody'",
        "type": "not_found_error",
        "code": "not_found",
        "param": "id",
    }


@pytest.mark.parametrize(
    "external_id",
    [
        "héllo wörld",
        "a/b/c",
        "{tag}:colon",
        "user with spaces",
        "emoji 🎉 ✓",
        "%2F",
        "?q=1#x",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "..",
        "a\\b",
    ],
)
async def test_any_external_id_round_trips(api: Client, external_id: str) -> None:
    made = await create(api, external_id=external_id, display_name="n")
    # Dots too: clients resolve "." and ".." segments before sending.
    path = "/v2/identities/" + quote(external_id, safe="").replace(".", "%2E")
    got = await api.get(path)
    assert got.status_code == 200, got.text
    assert got.json()["external_id"] == external_id
    patched = await api.patch(path, json={"display_name": "m"})
    assert patched.json()["display_name"] == "m"
    assert (await api.delete(path)).status_code == 204
    assert (await api.get(f"/v2/identities/{made['_id']}")).status_code == 404


async def test_patch_is_partial(api: Client, clock: FakeClock) -> None:
    await create(
        api, external_id="p", display_name="Old", email="a@b.co", tags=["x"], metadata={"a": 1}
    )
    clock.advance(61)
    r = await api.patch("/v2/identities/p", json={"display_name": "New", "tags": ["y", "z"]})
    assert r.status_code == 200
    body = r.json()
    assert body["display_name"] == "New"
    assert body["email"] == "a@b.co"
    assert body["tags"] == ["y", "z"]
    assert body["metadata"] == {"a": 1}
    assert body["updated"] > body["created"]
    cleared = await api.patch("/v2/identities/p", json={"email": None, "metadata": {"b": 2}})
    assert cleared.json()["email"] is None
    assert cleared.json()["metadata"] == {"b": 2}


async def test_patch_with_nothing_new_keeps_updated(api: Client, clock: FakeClock) -> None:
    made = await create(api, external_id="same", display_name="A")
    clock.advance(100)
    r = await api.patch("/v2/identities/same", json={"display_name": "A"})
    assert r.json()["updated"] == made["updated"]


async def test_patch_cannot_rename(api: Client) -> None:
    await create(api, external_id="fixed")
    r = await api.patch("/v2/identities/fixed", json={"external_id": "other"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "external_id"


async def test_include_metrics_gives_zeros_without_usage(api: Client) -> None:
    await create(api, external_id="m")
    zero = {
        "total_cost": 0.0,
        "total_tokens": 0,
        "total_requests": 0,
        "error_rate": 0.0,
        "input_tokens": 0,
        "output_tokens": 0,
        "rate_limited_requests": 0,
    }
    got = (await api.get("/v2/identities/m", params={"include_metrics": "true"})).json()
    assert got["metrics"] == zero
    listed = (await api.get("/v2/identities", params={"include_metrics": "true"})).json()
    assert listed["data"][0]["metrics"] == zero


async def test_series_errors(env: Env) -> None:
    await env.api.post("/v2/identities", json={"external_id": "x"})
    r = await env.api.get("/v2/identities/x/metrics?granularity=week")
    assert r.status_code == 400 and r.json()["error"]["param"] == "granularity"
    assert (await env.api.get("/v2/identities/nobody/metrics")).status_code == 404
    assert (await env.api.get("/v2/identities/x/other")).status_code == 404


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
