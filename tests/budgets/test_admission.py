"""Budgets as hard gates, through the inline proxy and the hooks: checked and consumed in the same
atomic step as the policies, the most restrictive wins, and the 429 names the budget."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from sidecar.identity.resolve import Resolved, Source
from tests.support.clock import FakeClock
from tests.support.env import Env, MakeEnv
from tests.support.traffic import MESSAGES, tokens

BODY = {"model": "in-house-7b", "messages": MESSAGES}  # no catalogue prices it
KEY = "sk-acme-0123456789"
OWNER = "tenant-acme"


def policies(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "policies.toml"
    path.write_text(text)
    return {"policies": {"paths": [str(path)]}}


async def budget(env: Env, kind: str, target: str, **fields: Any) -> dict[str, Any]:
    r = await env.api.post(
        "/v2/budgets", json={"scope": {"kind": kind, "target": target}, **fields}
    )
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made


async def send(
    client: httpx.AsyncClient, who: str | None, key: str | None = None, **headers: str
) -> httpx.Response:
    if who is not None:
        headers["X-ORQ-IDENTITY-ID"] = who
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return await client.post("/v1/chat/completions", json=BODY, headers=headers)


async def test_a_budget_gates_an_identity_without_any_policy(make_env: MakeEnv) -> None:
    env: Env = await make_env()
    made = await budget(env, "identity", "ann", requests_per_minute=3)
    async with httpx.AsyncClient(base_url=env.url) as client:
        replies = [await send(client, "ann") for _ in range(5)]
        other = await send(client, "bob")
    assert [r.status_code for r in replies] == [200, 200, 200, 429, 429]
    assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers
    assert replies[0].headers["x-ratelimit-limit-requests"] == "3"
    assert replies[2].headers["x-ratelimit-remaining-requests"] == "0"
    refused = replies[3]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json() == {
        "error": {
            "message": f"Rate limit exceeded: 3 requests per minute for identity ann "
            f"(budget {made['_id']})",
            "type": "rate_limit_error",
            "code": "requests_limit_exceeded",
            "param": None,
            "identity": "ann",
            "policy": None,
            "dimension": "requests",
            "limit": "3/minute",
            "budget": made["_id"],
        }
    }
    assert len(env.mock.requests) == 4
    metrics = await env.metrics("ann")
    assert (metrics["total_requests"], metrics["rate_limited_requests"]) == (3, 2)
    scraped = (await env.api.get("/metrics")).text
    assert 'decision="refused",dimension="requests",policy="budget"' in scraped
    assert made["_id"] not in scraped  # one label for all budgets


async def test_the_most_restrictive_wins_and_a_refusal_consumes_nothing(
    make_env: MakeEnv, tmp_path: Path, redis: Redis
) -> None:
    env: Env = await make_env(
        **policies(tmp_path, '[[policy]]\nname = "default"\nrequests = ["4/minute"]\n')
    )
    tight = await budget(env, "identity", "ann", requests_per_minute=2)
    await budget(env, "identity", "bob", requests_per_minute=10)
    async with httpx.AsyncClient(base_url=env.url) as client:
        ann = [await send(client, "ann") for _ in range(4)]
        bob = [await send(client, "bob") for _ in range(5)]
    assert [r.status_code for r in ann] == [200, 200, 429, 429]
    assert ann[2].json()["error"]["budget"] == tight["_id"]
    # The policy binds bob: the body names it, and no budget.
    assert [r.status_code for r in bob] == [200] * 4 + [429]
    error = bob[4].json()["error"]
    assert (error["policy"], error["limit"]) == ("default", "4/minute") and "budget" not in error
    # ann's two refusals took nothing from her policy's window; bob's one took nothing from
    # his budget's.
    ann_id = (await env.api.get("/v2/identities/ann")).json()["_id"]
    assert await redis.get(await one(redis, f"sidecar:rl:{{{ann_id}}}:r:60:*")) == b"2"
    bob_budget = (await env.api.get("/v2/budgets", params={"scope_target": "bob"})).json()
    bob_key = await one(redis, f"sidecar:rl:{{{bob_budget['data'][0]['_id']}}}:r:60:*")
    assert await redis.get(bob_key) == b"4"


async def one(redis: Redis, pattern: str) -> str:
    found = [k.decode() if isinstance(k, bytes) else k for k in await redis.keys(pattern)]
    assert len(found) == 1, found
    return found[0]


async def test_a_tag_budget_is_shared_by_every_identity_with_the_tag(make_env: MakeEnv) -> None:
    env: Env = await make_env()
    for who, tags in (("ann", ["team-a"]), ("bob", ["team-a", "x"]), ("cat", ["team-b"])):
        r = await env.api.post("/v2/identities", json={"external_id": who, "tags": tags})
        assert r.status_code == 201
    made = await budget(env, "tag", "team-a", requests_per_minute=3)
    async with httpx.AsyncClient(base_url=env.url) as client:
        replies = [await send(client, who) for who in ("ann", "bob", "ann", "bob", "ann")]
        others = [await send(client, "cat") for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429, 429]
    error = replies[3].json()["error"]
    assert (error["budget"], error["identity"]) == (made["_id"], "bob")
    assert [r.status_code for r in others] == [200] * 4
    # A body identity's tags count as it sends them, before they are stored.
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post(
            "/v1/chat/completions",
            json={**BODY, "identity": {"id": "dan", "tags": ["team-a"]}},
        )
    assert r.status_code == 429 and r.json()["error"]["budget"] == made["_id"]


def owner_config() -> dict[str, Any]:
    return {
        "identity": {"trust": "keys"},
        "api_keys": [
            {
                "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                "owner": OWNER,
                "may_assert": ["acme-*"],
            }
        ],
    }


async def test_a_key_owners_budget_holds_whatever_end_users_its_key_claims(
    make_env: MakeEnv,
) -> None:
    env: Env = await make_env(**owner_config())
    made = await budget(env, "api_key_owner", OWNER, requests_per_minute=4)
    async with httpx.AsyncClient(base_url=env.url) as client:
        own = await send(client, None, KEY)  # the key alone: the owner itself
        users = [await send(client, f"acme-{i}", KEY) for i in range(5)]
        unkeyed = await send(client, "acme-x")  # no key: not the owner's
    assert [r.status_code for r in [own, *users]] == [200] * 4 + [429] * 2
    error = users[3].json()["error"]
    assert (error["budget"], error["identity"], error["policy"]) == (made["_id"], OWNER, None)
    assert unkeyed.status_code == 403  # trust = keys: an unkeyed claim is refused anyway
    await env.settle()
    # The owner's VIA counters count its key's requests, as without budgets.
    r = await env.api.get(f"/v2/identities/{OWNER}", params={"include_metrics": "true"})
    assert r.status_code == 200


async def test_cost_and_tokens_at_the_amount_refuse_until_reset(
    make_env: MakeEnv, redis: Redis
) -> None:
    env: Env = await make_env()
    monthly = await budget(env, "identity", "ann", amount_usd=50, period="monthly")
    credit = await budget(env, "identity", "bob", token_limit=1000, period="one_time")
    services = env.app.services
    store, clock = services.budgets.store, services.clock
    now_ms = int(clock() * 1000)
    for made, amount in ((monthly, 50 * 10**9), (credit, 1000)):
        stored = await store.get(made["_id"])
        assert stored is not None
        (key,) = store.bucket_keys(stored, now_ms)
        await redis.incrby(key, amount)  # what the settlement charges
    async with httpx.AsyncClient(base_url=env.url) as client:
        ann, bob = await send(client, "ann"), await send(client, "bob")
        assert ann.status_code == bob.status_code == 429
        cost, tokens_error = ann.json()["error"], bob.json()["error"]
        assert (cost["dimension"], cost["limit"], cost["code"]) == (
            "cost", "50/month", "cost_limit_exceeded",
        )  # fmt: skip
        assert cost["message"].startswith("Rate limit exceeded: $50 per month for identity ann")
        assert (tokens_error["dimension"], tokens_error["limit"]) == ("tokens", "1000/one_time")
        assert "1000 tokens in total for identity bob" in tokens_error["message"]
        # A monthly budget frees at the next month; a one-time credit never: its retry-after
        # is as long as its window (ten years).
        assert 1 <= int(ann.headers["retry-after"]) <= 31 * 86_400
        assert int(bob.headers["retry-after"]) > 9 * 365 * 86_400
        got = (await env.api.get(f"/v2/budgets/{monthly['_id']}")).json()["consumption"]
        assert got["cost_usd"] == 50.0
        r = await env.api.post(f"/v2/budgets/{monthly['_id']}/reset")
        assert r.status_code == 200 and r.json()["consumption"]["cost_usd"] == 0.0
        assert (await send(client, "ann")).status_code == 200
        assert (await send(client, "bob")).status_code == 429


async def test_inactive_expired_and_deleted_budgets_do_not_gate(
    make_env: MakeEnv, clock: FakeClock
) -> None:
    env: Env = await make_env()
    inactive = await budget(env, "identity", "ann", requests_per_minute=1, is_active=False)
    soon = await budget(
        env, "identity", "bob", requests_per_minute=1, expires_at="2026-11-18T21:00:00Z"
    )
    gone = await budget(env, "identity", "cat", requests_per_minute=1)
    assert (await env.api.delete(f"/v2/budgets/{gone['_id']}")).status_code == 204
    async with httpx.AsyncClient(base_url=env.url) as client:
        assert [(await send(client, "ann")).status_code for _ in range(3)] == [200] * 3
        assert [(await send(client, "cat")).status_code for _ in range(3)] == [200] * 3
        assert [(await send(client, "bob")).status_code for _ in range(2)] == [200, 429]
        clock.advance(10 * 3600)  # past its expiry (the clock is 11:06)
        assert (await send(client, "bob")).status_code == 200
        r = await env.api.patch(f"/v2/budgets/{inactive['_id']}", json={"is_active": True})
        assert r.status_code == 200
        # Active again: requests made while it was not were not counted in it.
        assert [(await send(client, "ann")).status_code for _ in range(2)] == [200, 429]
    assert soon["expires_at"] == "2026-11-18T21:00:00Z"


async def test_hooks_authorize_refuses_by_budget(make_env: MakeEnv) -> None:
    env: Env = await make_env()
    made = await budget(env, "identity", "ann", requests_per_minute=1)
    headers = {"x-sidecar-token": "test-admin-token-0123456789", "X-ORQ-IDENTITY-ID": "ann"}
    async with httpx.AsyncClient(base_url=env.url) as client:
        first = await client.post("/hooks/authorize", json=BODY, headers=headers)
        second = await client.post("/hooks/authorize", json=BODY, headers=headers)
    assert first.status_code == 200
    assert second.status_code == 429 and second.json()["error"]["budget"] == made["_id"]


async def test_many_concurrent_requests_admit_exactly_the_budget(make_env: MakeEnv) -> None:
    env: Env = await make_env()
    await budget(env, "tag", "burst", requests_per_minute=15)
    for i in range(3):
        await env.api.post("/v2/identities", json={"external_id": f"b{i}", "tags": ["burst"]})
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        replies = await asyncio.gather(*(send(client, f"b{i % 3}") for i in range(60)))
    assert Counter(r.status_code for r in replies) == {200: 15, 429: 45}


async def test_the_decision_counts_the_budget_among_its_subjects(make_env: MakeEnv) -> None:
    """What the settlement charges: every subject of the decision, budgets included, in the
    buckets the budget is read and reset by."""
    env: Env = await make_env(**owner_config())
    mine = await budget(env, "identity", "acme-1", amount_usd=5, token_limit=100)
    theirs = await budget(env, "api_key_owner", OWNER, amount_usd=50)
    services = env.app.services
    resolved = Resolved("acme-1", Source.HEADER, owner=OWNER)
    identity_id = await services.identifier.identify(resolved)
    _, decision = await services.quota.admit(resolved, "01JDQ6ZK3N4X8V2B7C9D0E1F2G", identity_id)
    assert decision.admitted
    # The key's owner comes first (it has no policy: a subject without limits), then budgets.
    assert [s.budget for s in decision.subjects] == [None, mine["_id"], theirs["_id"]]
    assert decision.subjects[0].external_id == OWNER and not decision.subjects[0].policy.limited
    limiter, store = services.limiter, services.budgets.store
    await limiter.settle(decision.subjects, "01JDQ6ZK3N4X8V2B7C9D0E1F2G", 40, 2 * 10**9)
    budgets = [await store.get(made["_id"]) for made in (mine, theirs)]
    assert all(b is not None for b in budgets)
    now_ms = int(services.clock() * 1000)
    used = await store.consumption([b for b in budgets if b is not None], now_ms)
    assert [(u.cost_nanos, u.tokens) for u in used] == [(2 * 10**9, 40), (2 * 10**9, None)]


async def test_a_finished_requests_tokens_count_against_its_budget(make_env: MakeEnv) -> None:
    env: Env = await make_env()
    made = await budget(env, "identity", "ann", token_limit=500, amount_usd=1)
    async with httpx.AsyncClient(base_url=env.url) as client:
        first = await send(client, "ann", **tokens(300, 250), **{"x-mock-cost": "0.25"})
        assert first.status_code == 200
        over = await send(client, "ann")
    assert over.status_code == 429 and over.json()["error"]["budget"] == made["_id"]
    assert over.json()["error"]["dimension"] == "tokens"
    got = (await env.api.get(f"/v2/budgets/{made['_id']}")).json()["consumption"]
    assert (got["tokens"], got["cost_usd"]) == (550, 0.25)


async def test_a_hook_mode_reports_tokens_count_against_its_budget(make_env: MakeEnv) -> None:
    env: Env = await make_env()
    made = await budget(env, "identity", "ann", token_limit=500)
    hook = {"x-sidecar-token": "test-admin-token-0123456789"}
    async with httpx.AsyncClient(base_url=env.url, headers=hook) as client:
        r = await client.post("/hooks/authorize", json=BODY, headers={"X-ORQ-IDENTITY-ID": "ann"})
        assert r.status_code == 200, r.text
        report = {
            "request_id": r.json()["request_id"], "identity": "ann", "model": "in-house-7b",
            "status": 200, "usage": {"prompt_tokens": 300, "completion_tokens": 250},
        }  # fmt: skip
        assert (await client.post("/hooks/usage", json=report)).status_code == 202
    got = (await env.api.get(f"/v2/budgets/{made['_id']}")).json()["consumption"]
    assert got["tokens"] == 550


async def test_a_request_in_flight_across_a_reset_counts_what_it_used_after_it(
    make_env: MakeEnv, redis: Redis
) -> None:
    """Its reservation was counted in the buckets the reset empties: it goes with them, and the
    request is charged what it used, in full, when it ends (settled against the reservation, it
    would take what it reserved off what the requests after the reset were counted)."""
    env: Env = await make_env()
    made = await budget(env, "identity", "ann", token_limit=100_000, period="one_time")
    async with httpx.AsyncClient(base_url=env.url) as client:
        slow = asyncio.create_task(
            send(client, "ann", **tokens(20, 10), **{"x-mock-latency-ms": "400"})
        )
        reservations = f"sidecar:rv:{{{made['_id']}}}"
        while not await redis.hlen(reservations):  # noqa: ASYNC110 (until admitted, reserving)
            await asyncio.sleep(0.01)
        assert (await env.api.post(f"/v2/budgets/{made['_id']}/reset")).status_code == 200
        assert not await redis.exists(reservations)
        assert (await send(client, "ann", **tokens(20, 10))).status_code == 200
        assert (await slow).status_code == 200
    await env.settle()
    r = await env.api.get(f"/v2/budgets/{made['_id']}")
    assert r.json()["consumption"]["tokens"] == 2 * 30
