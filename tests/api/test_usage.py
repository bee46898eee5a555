from __future__ import annotations

import csv
import io

import httpx
import pytest

from sidecar.api.usage import groups
from tests.support.clock import FakeClock
from tests.support.env import Env, MakeEnv
from tests.support.export import chat, day, export, nanos

COUNTS = (
    "requests", "errors", "input_tokens", "cached_input_tokens", "cache_write_tokens",
    "output_tokens", "reasoning_tokens", "unpriced_requests", "rate_limited_requests",
)  # fmt: skip


async def traffic(env: Env, clock: FakeClock) -> None:
    """Three identities: red+blue, red, untagged; errors, cached and reasoning tokens, an
    unpriced model."""
    for external_id, tags in (("ann", ["red", "blue"]), ("bob", ["red"]), ("cid", [])):
        fields = {"external_id": external_id, "display_name": external_id.upper(), "tags": tags}
        r = await env.api.post("/v2/identities", json=fields)
        assert r.status_code == 201, r.text
        clock.advance(0.01)  # ULIDs of one millisecond do not sort by creation
    await chat(env, "ann", **{"x-mock-input-tokens": "1200", "x-mock-cached-tokens": "400"})
    await chat(env, "ann", **{"x-mock-output-tokens": "333", "x-mock-reasoning-tokens": "100"})
    await chat(env, "ann", **{"x-mock-status": "500"})
    await chat(env, "bob", model="o3-mini", **{"x-mock-output-tokens": "77"})
    await chat(env, "cid", model="acme-unpriced", **{"x-mock-input-tokens": "9"})
    await env.settle()


async def test_identity_rows_equal_each_identitys_metrics(
    make_env: MakeEnv, clock: FakeClock
) -> None:
    env = await make_env()
    await traffic(env, clock)
    body = await export(env)
    assert (body["object"], body["group_by"], body["note"]) == ("usage_export", "identity", None)
    assert (body["from"], body["to"]) == (day(clock, -29), day(clock))
    rows = {row["external_id"]: row for row in body["data"]}
    assert list(rows) == ["ann", "bob", "cid"]  # creation order
    for external_id, row in rows.items():
        metrics = await env.metrics(external_id)
        assert row["display_name"] == external_id.upper()
        assert row["requests"] == metrics["total_requests"]
        assert row["input_tokens"] == metrics["input_tokens"]
        assert row["output_tokens"] == metrics["output_tokens"]
        assert row["errors"] == round(metrics["error_rate"] * metrics["total_requests"])
        assert row["rate_limited_requests"] == metrics["rate_limited_requests"]
        assert nanos(row["cost_usd"]) == round(metrics["total_cost"] * 10**9)
        # Day by day, the identity's own series says the same, to the nano-dollar.
        r = await env.api.get(f"/v2/identities/{external_id}/metrics")
        points = r.json()["series"]["points"]
        assert nanos(row["cost_usd"]) == sum(p["cost_nanos"] for p in points)
        for field in ("cached_input_tokens", "reasoning_tokens", "unpriced_requests"):
            assert row[field] == sum(p[field] for p in points)
    ann = rows["ann"]
    assert (ann["requests"], ann["errors"], ann["cached_input_tokens"]) == (3, 1, 400)
    assert ann["reasoning_tokens"] == 100
    assert nanos(ann["cost_usd"]) > 0
    assert rows["cid"]["unpriced_requests"] == 1
    assert rows["cid"]["cost_usd"] == "0.000000000"


async def test_tag_rows_count_an_identity_under_each_of_its_tags(
    make_env: MakeEnv, clock: FakeClock
) -> None:
    env = await make_env()
    await traffic(env, clock)
    by_identity = {row["external_id"]: row for row in (await export(env))["data"]}
    r = await env.api.get("/v2/usage", params={"group_by": "tag"})
    assert r.status_code == 200
    assert "several tags" in r.headers["x-sidecar-note"]
    body = r.json()
    assert "several tags" in body["note"]
    tags = {row["tag"]: row for row in body["data"]}
    assert list(tags) == ["(untagged)", "blue", "red"]
    expected = {"(untagged)": ["cid"], "blue": ["ann"], "red": ["ann", "bob"]}
    for tag, members in expected.items():
        assert tags[tag]["identities"] == len(members)
        for field in COUNTS:
            assert tags[tag][field] == sum(by_identity[m][field] for m in members), (tag, field)
        assert nanos(tags[tag]["cost_usd"]) == sum(
            nanos(by_identity[m]["cost_usd"]) for m in members
        )


async def test_csv_parses_and_says_the_same_as_json(make_env: MakeEnv, clock: FakeClock) -> None:
    env = await make_env()
    await traffic(env, clock)
    for group_by in ("identity", "tag"):
        r = await env.api.get("/v2/usage", params={"group_by": group_by, "format": "csv"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/csv")
        disposition = r.headers["content-disposition"]
        assert disposition.startswith(f'attachment; filename="usage-by-{group_by}-')
        table = list(csv.DictReader(io.StringIO(r.text)))
        data = (await export(env, group_by=group_by))["data"]
        assert len(table) == len(data) == 3
        assert list(table[0]) == list(data[0])  # the header names the JSON fields, in order
        for row, expected in zip(table, data, strict=True):
            assert row == {k: "" if v is None else str(v) for k, v in expected.items()}


async def test_the_range_picks_whole_utc_days(make_env: MakeEnv, clock: FakeClock) -> None:
    env = await make_env()
    first = day(clock)
    await chat(env, "dora", **{"x-mock-output-tokens": "10"})
    await env.settle()
    clock.advance(2 * 86_400)
    await chat(env, "dora", **{"x-mock-output-tokens": "20"})
    await chat(env, "dora", **{"x-mock-output-tokens": "20"})
    await env.settle()
    third = day(clock)

    async def requests(**params: str) -> int:
        data = (await export(env, **params))["data"]
        return sum(row["requests"] for row in data)

    assert await requests() == 3
    assert await requests(**{"from": first, "to": first}) == 1
    assert await requests(**{"from": day(clock, -1), "to": day(clock, -1)}) == 0
    assert await requests(**{"from": third}) == 2
    assert await requests(**{"from": first, "to": third}) == 3
    assert (await export(env, **{"from": day(clock, -1), "to": day(clock, -1)}))["data"] == []


@pytest.mark.parametrize(
    ("params", "param", "says"),
    [
        ({"from": "2026-13-01"}, "from", "not a calendar date"),
        ({"to": "20261101"}, "to", "YYYY-MM-DD"),
        ({"from": "+1"}, "from", "YYYY-MM-DD"),
        ({"from": "TODAY", "to": "YESTERDAY"}, "from", "after to"),
        ({"from": "OLDEST-1"}, "from", "older than the 32 days"),
        ({"from": "OLDEST-1", "to": "OLDEST-1"}, "from", "older than"),
        ({"to": "TOMORROW"}, "to", "after today"),
        ({"group_by": "team"}, "group_by", ""),
        ({"format": "xlsx"}, "format", ""),
        ({"limit": "10"}, "limit", "unknown parameter"),
    ],
)
async def test_bad_parameters_are_400s_naming_the_parameter(
    make_env: MakeEnv, clock: FakeClock, params: dict[str, str], param: str, says: str
) -> None:
    env = await make_env()
    dates = {
        "TODAY": day(clock),
        "YESTERDAY": day(clock, -1),
        "TOMORROW": day(clock, 1),
        "OLDEST-1": day(clock, -32),
    }
    params = {k: dates.get(v, v) for k, v in params.items()}
    r = await env.api.get("/v2/usage", params=params)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert says in error["message"]


async def test_the_oldest_kept_day_is_accepted(make_env: MakeEnv, clock: FakeClock) -> None:
    env = await make_env()
    body = await export(env, **{"from": day(clock, -31)})
    assert (body["from"], body["to"], body["data"]) == (day(clock, -31), day(clock), [])
    body = await export(env, to=day(clock, -10))  # 30 days up to `to`, as far as kept
    assert (body["from"], body["to"]) == (day(clock, -31), day(clock, -10))
    body = await export(env, to=day(clock, -1))
    assert (body["from"], body["to"]) == (day(clock, -30), day(clock, -1))


async def test_the_admin_token_is_required(make_env: MakeEnv) -> None:
    env = await make_env()
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.get("/v2/usage")
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"


async def test_identities_are_read_page_by_page(
    make_env: MakeEnv, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groups, "PAGE", 2)
    env = await make_env()
    names = [f"u{n}" for n in range(7)]
    for name in names:
        await chat(env, name)
        await env.settle()
        clock.advance(0.01)
    r = await env.api.post("/v2/identities", json={"external_id": "idle"})  # no usage: left out
    assert r.status_code == 201
    await env.settle()
    r = await env.api.get("/v2/usage", params={"format": "csv"})
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["external_id"] for row in table] == names
    body = await export(env, group_by="tag")
    assert [(row["tag"], row["identities"], row["requests"]) for row in body["data"]] == [
        ("(untagged)", 7, 7)
    ]


async def test_a_store_that_is_down_is_a_503(make_env: MakeEnv) -> None:
    from redis.asyncio import Redis

    from sidecar.testing.redis_server import free_port

    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        env = await make_env(redis_client=dead)
        r = await env.api.get("/v2/usage", params={"format": "csv"})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable_error"
    finally:
        await dead.aclose()
