"""`/v2/usage` by model, by identity and model, and by metadata value (a cohort)."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from sidecar.api.usage import groups, rows
from sidecar.usage import buckets
from tests.support.clock import FakeClock
from tests.support.env import Env, MakeEnv
from tests.support.export import chat, day, export, nanos

COUNTS = (
    "requests", "errors", "input_tokens", "cached_input_tokens", "cache_write_tokens",
    "output_tokens", "reasoning_tokens", "unpriced_requests",
)  # fmt: skip


async def traffic(env: Env, clock: FakeClock) -> None:
    """Four identities, three plans (one a boolean) and one without; four models."""
    plans: dict[str, Any] = {"ann": "pro", "bob": "free", "cid": None, "dan": True}
    for external_id, plan in plans.items():
        fields: dict[str, Any] = {"external_id": external_id, "display_name": external_id.upper()}
        if plan is not None:
            fields["metadata"] = {"plan": plan, "region": "eu"}
        r = await env.api.post("/v2/identities", json=fields)
        assert r.status_code == 201, r.text
        clock.advance(0.01)
    await chat(env, "ann", **{"x-mock-input-tokens": "1200", "x-mock-cached-tokens": "400"})
    await chat(env, "ann", **{"x-mock-status": "500"})
    await chat(env, "ann", model="o3-mini", **{"x-mock-reasoning-tokens": "100"})
    await chat(env, "bob", model="o3-mini", **{"x-mock-output-tokens": "77"})
    await chat(env, "cid", model="acme-unpriced", **{"x-mock-input-tokens": "9"})
    await chat(env, "dan", **{"x-mock-output-tokens": "5"})
    await env.settle()


def add_up(items: list[dict[str, Any]]) -> dict[str, int]:
    out = {field: sum(row[field] for row in items) for field in COUNTS}
    out["cost"] = sum(nanos(row["cost_usd"]) for row in items)
    return out


async def test_by_model_sums_every_identitys_models(make_env: MakeEnv, clock: FakeClock) -> None:
    env = await make_env()
    await traffic(env, clock)
    body = await export(env, group_by="model")
    assert (body["group_by"], body["note"]) == ("model", None)
    by_model = {row["model"]: row for row in body["data"]}
    assert list(by_model) == ["acme-unpriced", "gpt-4o", "o3-mini"]  # by name
    assert "rate_limited_requests" not in by_model["gpt-4o"]
    assert [by_model[m]["identities"] for m in by_model] == [1, 2, 2]
    assert (by_model["gpt-4o"]["requests"], by_model["gpt-4o"]["errors"]) == (3, 1)
    assert by_model["o3-mini"]["reasoning_tokens"] == 100
    assert by_model["acme-unpriced"]["unpriced_requests"] == 1
    # Each model's row is the sum of its identities' own by-model metrics.
    per_identity: dict[str, list[dict[str, Any]]] = {}
    for who in ("ann", "bob", "cid", "dan"):
        r = await env.api.get(f"/v2/identities/{who}/metrics", params={"group_by": "model"})
        for row in r.json()["data"]:
            per_identity.setdefault(row["model"], []).append(row)
    for model, row in by_model.items():
        expected = add_up(per_identity[model])
        assert {**{f: row[f] for f in COUNTS}, "cost": nanos(row["cost_usd"])} == expected
    # And all models together are all identities' usage.
    everyone = add_up((await export(env))["data"])
    assert add_up(list(by_model.values())) == everyone


async def test_by_identity_and_model(make_env: MakeEnv, clock: FakeClock) -> None:
    env = await make_env()
    await traffic(env, clock)
    body = await export(env, group_by="identity,model")
    assert body["group_by"] == "identity,model"
    pairs = [(row["external_id"], row["model"]) for row in body["data"]]
    assert pairs == [  # identities in creation order, each one's models by name
        ("ann", "gpt-4o"), ("ann", "o3-mini"), ("bob", "o3-mini"), ("cid", "acme-unpriced"),
        ("dan", "gpt-4o"),
    ]  # fmt: skip
    ann = body["data"][0]
    r = await env.api.get("/v2/identities/ann")
    assert (ann["_id"], ann["display_name"]) == (r.json()["_id"], "ANN")
    assert (ann["requests"], ann["errors"]) == (2, 1)
    assert ann["cached_input_tokens"] == 400
    by_identity = {row["external_id"]: row for row in (await export(env))["data"]}
    for who, identity_row in by_identity.items():
        mine = [row for row in body["data"] if row["external_id"] == who]
        assert add_up(mine) == add_up([identity_row]), who


async def test_by_metadata_value(make_env: MakeEnv, clock: FakeClock) -> None:
    env = await make_env()
    await traffic(env, clock)
    r = await env.api.get("/v2/usage", params={"group_by": "metadata.plan"})
    assert r.status_code == 200, r.text
    assert "x-sidecar-note" not in r.headers
    body = r.json()
    assert body["group_by"] == "metadata.plan"
    cohorts = {row["value"]: row for row in body["data"]}
    assert list(cohorts) == ["(none)", "free", "pro", "true"]
    by_identity = {row["external_id"]: row for row in (await export(env))["data"]}
    members_of = {"(none)": ["cid"], "free": ["bob"], "pro": ["ann"], "true": ["dan"]}
    for value, members in members_of.items():
        assert cohorts[value]["identities"] == len(members)
        expected = add_up([by_identity[m] for m in members])
        assert add_up([cohorts[value]]) == expected, value
        assert cohorts[value]["rate_limited_requests"] == 0
    # Every identity has one value: the cohorts add up to everyone.
    assert add_up(list(cohorts.values())) == add_up(list(by_identity.values()))
    region = (await export(env, group_by="metadata.region"))["data"]
    assert [(row["value"], row["identities"]) for row in region] == [("(none)", 1), ("eu", 3)]
    nobody = (await export(env, group_by="metadata.none of them"))["data"]
    assert [(row["value"], row["identities"]) for row in nobody] == [("(none)", 4)]


@pytest.mark.parametrize("group_by", ["model", "identity,model", "metadata.plan"])
async def test_csv_says_the_same_as_json(
    make_env: MakeEnv, clock: FakeClock, group_by: str
) -> None:
    env = await make_env()
    await traffic(env, clock)
    r = await env.api.get("/v2/usage", params={"group_by": group_by, "format": "csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    name = group_by.replace(",", "-")
    assert r.headers["content-disposition"] == (
        f'attachment; filename="usage-by-{name}-{day(clock, -29)}-{day(clock)}.csv"'
    )
    table = list(csv.DictReader(io.StringIO(r.text)))
    data = (await export(env, group_by=group_by))["data"]
    assert len(table) == len(data) > 0
    assert list(table[0]) == list(data[0])  # the header names the JSON fields, in order
    for row, expected in zip(table, data, strict=True):
        assert row == {k: "" if v is None else str(v) for k, v in expected.items()}


async def test_the_range_applies_to_models(make_env: MakeEnv, clock: FakeClock) -> None:
    env = await make_env()
    await chat(env, "eve", model="gpt-4o")
    await env.settle()
    clock.advance(86_400)
    await chat(env, "eve", model="o3-mini")
    await chat(env, "eve", model="o3-mini")
    await env.settle()
    today, yesterday = day(clock), day(clock, -1)

    async def models(**params: str) -> list[tuple[str, int]]:
        data = (await export(env, group_by="model", **params))["data"]
        return [(row["model"], row["requests"]) for row in data]

    assert await models() == [("gpt-4o", 1), ("o3-mini", 2)]
    assert await models(**{"from": today}) == [("o3-mini", 2)]
    assert await models(to=yesterday) == [("gpt-4o", 1)]
    assert await models(**{"from": day(clock, -5), "to": day(clock, -2)}) == []


async def test_models_are_read_page_by_page(
    make_env: MakeEnv, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groups, "PAGE", 2)
    env = await make_env()
    names = [f"p{n}" for n in range(5)]
    for n, name in enumerate(names):
        await chat(env, name, model=f"m{n % 2}")
        await env.settle()
        clock.advance(0.01)
    data = (await export(env, group_by="identity,model"))["data"]
    assert [(row["external_id"], row["model"]) for row in data] == [
        (name, f"m{n % 2}") for n, name in enumerate(names)
    ]
    data = (await export(env, group_by="model"))["data"]
    assert [(row["model"], row["identities"]) for row in data] == [("m0", 3), ("m1", 2)]
    data = (await export(env, group_by="metadata.plan"))["data"]
    assert [(row["value"], row["identities"], row["requests"]) for row in data] == [
        ("(none)", 5, 5)
    ]


@pytest.mark.parametrize(
    ("group_by", "says"),
    [
        ("models", "one of identity, tag, api_key_owner, model, identity,model or metadata"),
        ("model,identity", "one of"),
        ("identity,tag", "one of"),
        ("metadata.", "metadata key is 1-64 printable characters"),
        ("metadata." + "k" * 65, "1-64"),
        ("metadata.a\tb", "printable"),
        ("metadata", "one of"),
        ("", "one of"),
    ],
)
async def test_bad_group_by_is_a_400_naming_it(make_env: MakeEnv, group_by: str, says: str) -> None:
    env = await make_env()
    r = await env.api.get("/v2/usage", params={"group_by": group_by})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "group_by")
    assert says in error["message"]


def test_model_rows_sum_the_counters_the_store_keeps_per_model() -> None:
    assert rows.COUNTERS[:-1] == buckets.MODEL_COUNTERS
    assert rows.COUNTERS[-1] == buckets.RATE_LIMITED


async def test_csv_model_names_and_metadata_values_are_never_formulas(
    make_env: MakeEnv, clock: FakeClock
) -> None:
    env = await make_env()
    r = await env.api.post(
        "/v2/identities", json={"external_id": "mallory", "metadata": {"plan": "+1+1"}}
    )
    assert r.status_code == 201, r.text
    await chat(env, "mallory", model='=HYPERLINK("http://evil.example")')
    await chat(env, "mallory", model="@SUM(A1)")
    await env.settle()

    async def table(group_by: str) -> list[dict[str, str]]:
        r = await env.api.get("/v2/usage", params={"group_by": group_by, "format": "csv"})
        assert r.status_code == 200, r.text
        return list(csv.DictReader(io.StringIO(r.text)))

    models = sorted(row["model"] for row in await table("model"))
    assert models == ['\'=HYPERLINK("http://evil.example")', "'@SUM(A1)"]
    pairs = await table("identity,model")
    assert sorted(row["model"] for row in pairs) == models
    assert all(row["requests"] == "1" for row in pairs)
    (cohort,) = await table("metadata.plan")
    assert (cohort["value"], cohort["requests"]) == ("'+1+1", "2")
    # JSON says what the clients sent.
    data = (await export(env, group_by="model"))["data"]
    assert sorted(row["model"] for row in data) == ['=HYPERLINK("http://evil.example")', "@SUM(A1)"]
