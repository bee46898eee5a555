"""Merging identities through the API, with traffic from the real `openai` client: usage,
series, by-model counters, limit windows and budgets add up exactly in the survivor, and every
resolution source then names the survivor."""

from __future__ import annotations

import hashlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from sidecar.errors import StoreUnavailable
from sidecar.testing.serving import ApiClient
from tests.support.env import Env, MakeEnv
from tests.support.identities import create, snapshot
from tests.support.limits import policy_file
from tests.support.traffic import MESSAGES, tokens

KEY = "sk-merge-owner-key"


async def chat(env: Env, who: str, model: str, usage: tuple[int, int], **extra: Any) -> None:
    headers = {**tokens(*usage), **({"X-ORQ-IDENTITY-ID": who} if who else {})}
    async with openai.AsyncOpenAI(
        base_url=env.url + "/v1", api_key=extra.pop("key", "sk-x"), max_retries=0
    ) as oai:
        await oai.chat.completions.create(
            model=model, messages=MESSAGES, extra_headers=headers, **extra
        )


async def merge(api: ApiClient, into: str, source: str) -> dict[str, Any]:
    r = await api.post(f"/v2/identities/{into}/merge", json={"from": source})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def usage(env: Env, who: str) -> dict[str, Any]:
    """What the API shows of an identity's usage: totals, days, hours, models."""
    await env.settle()
    metrics = (await env.api.get(f"/v2/identities/{who}/metrics")).json()
    hours = (await env.api.get(f"/v2/identities/{who}/metrics?granularity=hour")).json()
    models = (await env.api.get(f"/v2/identities/{who}/metrics?group_by=model")).json()
    return {
        "totals": metrics["totals"],
        "days": [p for p in metrics["series"]["points"] if p["requests"]],
        "hours": [p for p in hours["series"]["points"] if p["requests"]],
        "by_source": metrics["series"]["by_source"],
        "models": {row["model"]: row for row in models["data"]},
    }


def summed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, int]:
    keys = ("requests", "input_tokens", "output_tokens", "total_tokens", "cost_nanos")
    return {k: a.get(k, 0) + b.get(k, 0) for k in keys}


def picked(point: dict[str, Any]) -> dict[str, int]:
    return summed(point, {})


async def test_merge_moves_usage_series_and_models_exactly(env: Env) -> None:
    await chat(env, "u_42", "gpt-4o", (10, 5))
    await chat(env, "u_42", "gpt-4o-mini", (20, 7))
    await chat(env, "42", "gpt-4o", (100, 50))
    old, new = await usage(env, "u_42"), await usage(env, "42")
    survivor = (await env.api.get("/v2/identities/42")).json()

    body = await merge(env.api, "42", "u_42")

    assert body["_id"] == survivor["_id"] and body["external_id"] == "42"
    assert body["merged_from"] == ["u_42"]
    after = await usage(env, "42")
    totals = after["totals"]
    assert totals["total_requests"] == 3
    assert (totals["input_tokens"], totals["output_tokens"]) == (130, 62)
    assert totals["total_cost"] == pytest.approx(
        old["totals"]["total_cost"] + new["totals"]["total_cost"]
    )
    (day,) = after["days"]
    assert picked(day) == summed(old["days"][0], new["days"][0])
    (hour,) = after["hours"]
    assert picked(hour) == summed(old["hours"][0], new["hours"][0])
    assert after["by_source"]["header"] == 3
    models = after["models"]
    assert set(models) == {"gpt-4o", "gpt-4o-mini"}
    assert (models["gpt-4o"]["requests"], models["gpt-4o"]["input_tokens"]) == (2, 110)
    assert Decimal(models["gpt-4o"]["cost_usd"]) == Decimal(
        old["models"]["gpt-4o"]["cost_usd"]
    ) + Decimal(new["models"]["gpt-4o"]["cost_usd"])
    assert models["gpt-4o-mini"]["output_tokens"] == 7
    # The alias answers with the survivor's record; the list shows one identity.
    assert (await env.api.get("/v2/identities/u_42")).json()["_id"] == survivor["_id"]
    listed = (await env.api.get("/v2/identities", params={"include_metrics": "true"})).json()
    assert [i["external_id"] for i in listed["data"]] == ["42"]
    assert listed["data"][0]["metrics"]["total_requests"] == 3
    ranked = (await env.api.get("/v2/identities", params={"sort": "cost"})).json()
    assert [i["external_id"] for i in ranked["data"]] == ["42"]
    found = (await env.api.get("/v2/identities", params={"search": "u_4"})).json()
    assert found["data"] == []


async def test_every_source_naming_the_alias_counts_for_the_survivor(make_env: MakeEnv) -> None:
    env = await make_env(
        api_keys=[{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "owner": "old-owner"}]
    )
    await create(env.api, external_id="old-owner", email="old@example.com")
    await create(env.api, external_id="team", display_name="Team")
    await merge(env.api, "team", "old-owner")
    survivor = (await env.api.get("/v2/identities/team")).json()
    assert survivor["email"] == "old@example.com", "an empty field is filled from the merged one"

    await chat(env, "old-owner", "gpt-4o", (1, 1))  # the header
    assert env.mock.requests[-1].header("x-orq-identity-id") == "team"
    await chat(env, "", "gpt-4o", (2, 2), key=KEY)  # the key's owner
    body = {"identity": {"id": "old-owner", "display_name": "Renamed"}}
    await chat(env, "", "gpt-4o", (4, 4), extra_body=body)  # the body, which upserts
    assert env.mock.requests[-1].header("x-orq-identity-id") == "team"

    totals = (await usage(env, "team"))["totals"]
    assert (totals["total_requests"], totals["input_tokens"]) == (3, 7)
    record = (await env.api.get("/v2/identities/old-owner")).json()
    assert record["_id"] == survivor["_id"] and record["display_name"] == "Renamed"
    listed = (await env.api.get("/v2/identities")).json()["data"]
    assert [i["external_id"] for i in listed] == ["team"], "the merged one is never recreated"


async def test_merge_sums_limit_windows_so_no_quota_is_freed(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    policy = '[[policy]]\nname = "default"\nrequests = ["5/minute"]\ntokens = ["100000/hour"]\n'
    env = await make_env(**policy_file(tmp_path, policy))
    for _ in range(3):
        await chat(env, "old", "gpt-4o", (100, 50))
    for _ in range(2):
        await chat(env, "new", "gpt-4o", (10, 10))
    await env.settle()
    await merge(env.api, "new", "old")
    services = env.app.services
    survivor = (await env.api.get("/v2/identities/new")).json()["_id"]
    (policy_in_force,) = services.live.policies
    used = await services.limiter.usage(survivor, policy_in_force)
    assert [limit.used for limit in used.limits] == [5, 3 * 150 + 2 * 20]
    with pytest.raises(openai.RateLimitError):
        await chat(env, "old", "gpt-4o", (1, 1))


async def test_budgets_of_the_merged_identity_follow_the_survivor(env: Env) -> None:
    await create(env.api, external_id="a")
    await create(env.api, external_id="b")
    r = await env.api.post(
        "/v2/budgets", json={"scope": {"kind": "identity", "target": "a"}, "amount_usd": 5}
    )
    assert r.status_code == 201, r.text
    await merge(env.api, "b", "a")
    budget = (await env.api.get(f"/v2/budgets/{r.json()['_id']}")).json()
    assert budget["scope"] == {"kind": "identity", "target": "b"}
    applying = (await env.api.get("/v2/identities/b", params={"include_budget": "true"})).json()
    assert [b["_id"] for b in applying["budgets"]] == [r.json()["_id"]]


async def test_a_repeated_merge_answers_the_same_and_moves_nothing(env: Env) -> None:
    await chat(env, "x1", "gpt-4o", (10, 10))
    await chat(env, "x2", "gpt-4o", (5, 5))
    merged_id = (await env.api.get("/v2/identities/x1")).json()["_id"]
    first = await merge(env.api, "x2", "x1")
    before = await usage(env, "x2")
    again = await merge(env.api, "x2", "x1")
    by_id = await merge(env.api, "x2", merged_id)
    assert again == first == by_id
    assert await usage(env, "x2") == before
    assert before["totals"]["input_tokens"] == 15


@pytest.mark.parametrize("step", ["erase", "limits"])
async def test_an_interrupted_merge_is_finished_by_its_retry(
    env: Env, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    await chat(env, "p", "gpt-4o", (10, 10))
    await chat(env, "q", "gpt-4o", (1, 1))
    await env.settle()
    merger = env.app.services.merger
    usage_mover, limits_mover = merger.movers[0], merger.movers[1]

    async def store_gone(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("the store went away")

    if step == "erase":  # after the usage was added to the survivor, before it was deleted
        monkeypatch.setattr(usage_mover.counters, "erase", store_gone)  # type: ignore[attr-defined]
    else:  # after the usage moved, before the limit windows did
        monkeypatch.setattr(limits_mover, "move", store_gone)
    r = await env.api.post("/v2/identities/q/merge", json={"from": "p"})
    assert r.status_code == 503, r.text
    monkeypatch.undo()

    body = await merge(env.api, "q", "p")
    assert body["merged_from"] == ["p"]
    totals = (await usage(env, "q"))["totals"]
    assert (totals["total_requests"], totals["input_tokens"]) == (2, 11)


async def test_a_chain_leaves_every_alias_at_the_last_survivor(env: Env) -> None:
    await chat(env, "A", "gpt-4o", (1, 0))
    await chat(env, "B", "gpt-4o", (10, 0))
    await chat(env, "C", "gpt-4o", (100, 0))
    a = (await env.api.get("/v2/identities/A")).json()["_id"]
    await merge(env.api, "B", "A")
    body = await merge(env.api, "C", "B")
    assert body["merged_from"] == ["A", "B"]
    for ref in ("A", "B", a):
        assert (await env.api.get(f"/v2/identities/{ref}")).json()["external_id"] == "C"
    await chat(env, "A", "gpt-4o", (1000, 0))
    assert env.mock.requests[-1].header("x-orq-identity-id") == "C"
    assert (await usage(env, "C"))["totals"]["input_tokens"] == 1111
    # Merging into an alias merges into its survivor.
    await create(env.api, external_id="D")
    assert (await merge(env.api, "A", "D"))["external_id"] == "C"


async def test_bad_merges_are_refused_and_change_nothing(env: Env) -> None:
    await create(env.api, external_id="one")
    await create(env.api, external_id="two")
    await create(env.api, external_id="three")
    await merge(env.api, "two", "three")
    before = await snapshot(env.redis)
    cases = [
        ("nobody", {"from": "one"}, 404, "id"),
        ("one", {"from": "nobody"}, 404, "from"),
        ("one", {"from": "one"}, 409, "from"),
        ("three", {"from": "two"}, 409, "from"),  # three is two now
        ("one", {"from": "three"}, 409, "from"),  # three was merged into two
        ("one", {}, 400, "from"),
        ("one", {"from": 7}, 400, "from"),
        ("one", {"from": " "}, 400, "from"),
        ("one", {"from": "two", "into": "x"}, 400, "into"),
    ]
    for into, body, status, param in cases:
        r = await env.api.post(f"/v2/identities/{into}/merge", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (into, body)
    r = await env.api.post(
        "/v2/identities/one/merge", content=b"{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert await snapshot(env.redis) == before


async def test_erasing_a_survivor_erases_its_aliases(env: Env) -> None:
    await chat(env, "keep", "gpt-4o", (1, 1))
    await chat(env, "gone", "gpt-4o", (1, 1))
    await env.settle()  # else a late usage write recreates an identity erased under it
    await merge(env.api, "keep", "gone")
    assert (await env.api.delete("/v2/identities/keep")).status_code == 204
    for ref in ("keep", "gone"):
        assert (await env.api.get(f"/v2/identities/{ref}")).status_code == 404
    assert await env.redis.keys("*alias*") in ([], [b"sidecar:{idx}:alias:gen"])
    listed = (await env.api.get("/v2/identities")).json()
    assert listed["data"] == []
