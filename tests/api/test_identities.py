from __future__ import annotations

import asyncio
from typing import cast
from urllib.parse import quote

import pytest
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient as Client
from tests.support.clock import FakeClock
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


async def test_no_key_embeds_the_external_id(api: Client, redis: Redis) -> None:
    made = await create(api, external_id="secret{slot}:id")
    keys = [k.decode() for k in cast(list[bytes], await redis.keys("*"))]
    assert not any("secret" in k for k in keys)
    own = [k for k in keys if made["_id"] in k]
    assert own and all("{" + made["_id"] + "}" in k for k in own)


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


async def test_delete_erases_record_indexes_and_usage(api: Client, redis: Redis) -> None:
    made = await create(api, external_id="gone", tags=["t"])
    keep = await create(api, external_id="kept")
    await redis.hset(f"sidecar:u:{{{made['_id']}}}:d", mapping={"20775:r": 3, "s:r": 3})
    await redis.hset(f"sidecar:u:{{{made['_id']}}}:h:498611", "r", 3)
    assert (await api.delete("/v2/identities/gone")).status_code == 204
    assert (await api.get("/v2/identities/gone")).status_code == 404
    assert (await api.delete("/v2/identities/gone")).status_code == 404
    keys = [k.decode() for k in cast(list[bytes], await redis.keys("*"))]
    assert not any(made["_id"] in k for k in keys)
    members = cast(list[bytes], await redis.zrange("sidecar:{idx}:order", 0, -1))
    assert [m[:26].decode() for m in members] == [keep["_id"]]
    assert len(await redis.hgetall("sidecar:{idx}:xid")) == 1
    listed = (await api.get("/v2/identities")).json()["data"]
    assert [i["_id"] for i in listed] == [keep["_id"]]
    again = await create(api, external_id="gone")
    assert again["_id"] != made["_id"]


async def test_list_newest_first_with_cursors(api: Client, clock: FakeClock) -> None:
    made = []
    for n in range(25):
        clock.advance(1)
        made.append(await create(api, external_id=f"user-{n:02}"))
    newest = [m["_id"] for m in reversed(made)]
    page1 = (await api.get("/v2/identities")).json()
    assert page1["object"] == "list" and page1["has_more"] is True
    assert [i["_id"] for i in page1["data"]] == newest[:10]
    page2 = (
        await api.get("/v2/identities", params={"starting_after": newest[9], "limit": 10})
    ).json()
    assert [i["_id"] for i in page2["data"]] == newest[10:20]
    page3 = (await api.get("/v2/identities", params={"starting_after": newest[19]})).json()
    assert [i["_id"] for i in page3["data"]] == newest[20:]
    assert page3["has_more"] is False
    back = (
        await api.get("/v2/identities", params={"ending_before": newest[20], "limit": 5})
    ).json()
    assert [i["_id"] for i in back["data"]] == newest[15:20]
    assert back["has_more"] is True
    top = (await api.get("/v2/identities", params={"ending_before": newest[3]})).json()
    assert [i["_id"] for i in top["data"]] == newest[:3]
    assert top["has_more"] is False
    everything = (await api.get("/v2/identities", params={"limit": 200})).json()
    assert len(everything["data"]) == 25 and everything["has_more"] is False


async def test_search_is_case_insensitive_over_three_fields(api: Client, clock: FakeClock) -> None:
    for external_id, name, email in [
        ("u1", "Ada Lovelace", "ada@math.org"),
        ("u2", "Grace Hopper", "grace@navy.mil"),
        ("ADA-ops", None, None),
        ("u4", None, "someone@ADA.example"),
    ]:
        clock.advance(1)
        await create(api, external_id=external_id, display_name=name, email=email)
    r = await api.get("/v2/identities", params={"search": "aDa"})
    assert [i["external_id"] for i in r.json()["data"]] == ["u4", "ADA-ops", "u1"]
    r = await api.get("/v2/identities", params={"search": "hopper"})
    assert [i["external_id"] for i in r.json()["data"]] == ["u2"]
    # Matches never span two fields.
    r = await api.get("/v2/identities", params={"search": "u1ada"})
    assert r.json()["data"] == []


async def test_search_pages_through_many(api: Client, clock: FakeClock) -> None:
    for n in range(30):
        clock.advance(1)
        await create(api, external_id=f"{'match' if n % 3 == 0 else 'other'}-{n}")
    first = (await api.get("/v2/identities", params={"search": "MATCH", "limit": 4})).json()
    assert [i["external_id"] for i in first["data"]] == [
        "match-27",
        "match-24",
        "match-21",
        "match-18",
    ]
    assert first["has_more"] is True
    rest = (
        await api.get(
            "/v2/identities",
            params={"search": "match", "limit": 10, "starting_after": first["data"][-1]["_id"]},
        )
    ).json()
    assert [i["external_id"] for i in rest["data"]] == [f"match-{n}" for n in (15, 12, 9, 6, 3, 0)]
    assert rest["has_more"] is False


async def test_filter_by_tags_any_of(api: Client, clock: FakeClock) -> None:
    for external_id, tags in [
        ("a", ["gold"]),
        ("b", ["silver"]),
        ("c", ["gold", "beta"]),
        ("d", []),
        ("e", ["Gold"]),
    ]:
        clock.advance(1)
        await create(api, external_id=external_id, tags=tags)
    r = await api.get("/v2/identities", params={"filter_by.tags": "gold"})
    assert [i["external_id"] for i in r.json()["data"]] == ["c", "a"]
    r = await api.get(
        "/v2/identities", params=[("filter_by.tags", "silver"), ("filter_by.tags", "beta")]
    )
    assert [i["external_id"] for i in r.json()["data"]] == ["c", "b"]
    r = await api.get("/v2/identities", params={"filter_by.tags": "gold", "search": "c"})
    assert [i["external_id"] for i in r.json()["data"]] == ["c"]
    await api.patch("/v2/identities/a", json={"tags": ["bronze"]})
    r = await api.get("/v2/identities", params={"filter_by.tags": "gold"})
    assert [i["external_id"] for i in r.json()["data"]] == ["c"]


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


async def seed_days(
    redis: Redis, identity_id: str, today: int, days: dict[int, dict[str, int]]
) -> str:
    """Day counters and their window sums as the recorder leaves them on `today`."""
    key = "sidecar:u:{" + identity_id + "}:d"
    sums: dict[str, int] = {}
    for day, counters in days.items():
        await redis.hset(key, mapping={f"{day}:{k}": v for k, v in counters.items()})
        if today - 30 < day <= today:
            for k, v in counters.items():
                sums[k] = sums.get(k, 0) + v
    await redis.hset(key, mapping={"s:day": today, **{f"s:{k}": v for k, v in sums.items()}})
    return key


async def test_metrics_sum_the_last_30_days(api: Client, redis: Redis, clock: FakeClock) -> None:
    made = await create(api, external_id="spender")
    # Day 20775 (2026-11-18) is today on the fake clock; 20746 is the 30th day back.
    key = await seed_days(redis, made["_id"], 20775, {
        20775: {"r": 2, "e": 1, "i": 600, "o": 300, "c": 4_500_000, "rl": 1},
        20746: {"r": 1, "i": 400, "o": 200, "c": 3_000_000, "ci": 77},
        20745: {"r": 50, "i": 1, "c": 99},
    })  # fmt: skip
    got = (await api.get("/v2/identities/spender?include_metrics=true")).json()["metrics"]
    assert got == {
        "total_cost": 0.0075,
        "total_tokens": 1500,
        "total_requests": 3,
        "error_rate": 0.3333,
        "input_tokens": 1000,
        "output_tokens": 500,
        "rate_limited_requests": 1,
    }
    # A day later, day 20746 has left the window.
    clock.advance(86_400)
    got = (await api.get("/v2/identities/spender?include_metrics=true")).json()["metrics"]
    assert (got["total_requests"], got["total_tokens"], got["total_cost"]) == (2, 900, 0.0045)
    assert await redis.hget(key, "20746:r") == b"1", "kept until the retention ends"
    # Forty days later nothing is left in the window, and days past retention are gone.
    clock.advance(40 * 86_400)
    got = (await api.get("/v2/identities", params={"include_metrics": "true"})).json()
    assert got["data"][0]["metrics"]["total_requests"] == 0
    assert got["data"][0]["metrics"]["total_cost"] == 0.0
    fields = cast(list[bytes], await redis.hkeys(key))
    assert [f for f in fields if not f.startswith(b"s:")] == []


async def test_cost_sums_stay_exact_beyond_float_precision(api: Client, redis: Redis) -> None:
    made = await create(api, external_id="whale")
    await seed_days(redis, made["_id"], 20775, {
        20775: {"c": 9_007_199_254_740_993, "r": 1},  # 2**53 + 1
        20774: {"c": 1_999_999_999, "r": 1},
        20745: {"c": 7, "r": 1},
    })  # fmt: skip
    from sidecar.store.keys import Keys
    from sidecar.usage.counters import UsageCounters

    day = [20775]
    counters = UsageCounters(redis, Keys("sidecar"), lambda: day[0] * 86_400.0)
    (sums,) = await counters.sums([made["_id"]])
    assert (sums["r"], sums["e"], sums["c"]) == (2, 0, 9_007_201_254_740_992)
    day[0] = 20804  # day 20774 leaves the window, exactly
    (sums,) = await counters.sums([made["_id"]])
    assert (sums["r"], sums["e"], sums["c"]) == (1, 0, 9_007_199_254_740_993)


@pytest.mark.parametrize("in_order", [True, False], ids=["single-server", "cluster-path"])
async def test_50_concurrent_upserts_create_one_identity(
    api: Client, redis: Redis, in_order: bool
) -> None:
    from sidecar.identity.model import Profile

    store = api.app.services.records
    store.in_order = in_order  # the path a cluster client takes, on this single server
    results = await asyncio.gather(
        *(store.upsert("racer", Profile(display_name=f"n{i}", tags=[f"t{i}"])) for i in range(50))
    )
    assert sum(created for _, created in results) == 1
    assert len({identity.id for identity, _ in results}) == 1
    assert await redis.zcard("sidecar:{idx}:order") == 1
    assert len(await redis.keys("sidecar:id:*")) == 1
    page = (await api.get("/v2/identities")).json()
    assert len(page["data"]) == 1 and page["data"][0]["external_id"] == "racer"


async def test_upsert_overwrites_given_fields_only(api: Client) -> None:
    from msgspec import UNSET

    from sidecar.identity.model import Profile

    store = api.app.services.records
    first, created = await store.upsert("u", Profile(display_name="A", email="a@x.io"))
    assert created
    second, created = await store.upsert("u", Profile(display_name="B", email=UNSET))
    assert not created and second.id == first.id
    assert (second.display_name, second.email) == ("B", "a@x.io")
    found = await api.get("/v2/identities", params={"search": "b"})
    assert [i["external_id"] for i in found.json()["data"]] == ["u"]
