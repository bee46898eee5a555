from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.support.auth import ADMIN_TOKEN
from tests.support.env import Env, MakeEnv
from tests.support.limits import policy_file

HOOK = {"x-sidecar-token": ADMIN_TOKEN}


async def authorize(env: Env, body: Any = None, **headers: str) -> Any:
    return await env.api.post("/hooks/authorize", json=body, headers={**HOOK, **headers})


async def report(env: Env, **fields: Any) -> Any:
    return await env.api.post("/hooks/usage", json=fields, headers=HOOK)


async def test_authorize_resolves_and_upserts_a_body_identity(env: Env) -> None:
    r = await authorize(env, {"model": "gpt-4o", "identity": {"id": "hooked", "tags": ["gold"]}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["identity"] == {"external_id": "hooked", "source": "body"}
    assert len(body["request_id"]) == 26
    assert r.headers["x-orq-identity-id"] == "hooked"
    assert r.headers["x-sidecar-request-id"] == body["request_id"]
    # Envoy's ext_authz appends the original path to the service's path prefix.
    suffixed = await env.api.post(
        "/hooks/authorize/v1/chat/completions", json={"identity": {"id": "hooked"}}, headers=HOOK
    )
    assert suffixed.status_code == 200
    assert suffixed.json()["identity"] == {"external_id": "hooked", "source": "body"}
    record = (await env.api.get("/v2/identities/hooked")).json()
    assert record["tags"] == ["gold"]


async def test_authorize_header_and_key_sources(make_env: MakeEnv) -> None:
    key = "sk-proxy-client"
    env = await make_env(
        api_keys=[{"sha256": hashlib.sha256(key.encode()).hexdigest(), "owner": "key-holder"}]
    )
    by_header = await authorize(env, None, **{"X-ORQ-IDENTITY-ID": "hdr"})
    assert by_header.json()["identity"] == {"external_id": "hdr", "source": "header"}
    by_key = await authorize(env, {"model": "m"}, authorization=f"Bearer {key}")
    assert by_key.json()["identity"] == {"external_id": "key-holder", "source": "api_key"}
    nobody = await authorize(env, {"model": "m"})
    assert nobody.json()["identity"] == {"external_id": "anonymous", "source": "anonymous"}


async def test_hooks_need_the_hook_token(make_env: MakeEnv) -> None:
    env = await make_env(admin={"hook_token": "hook-token-0123456789"})
    wrong = await env.api.post("/hooks/authorize", json={}, headers=HOOK)
    assert wrong.status_code == 401
    # The admin Authorization header does not open the hooks: it is the client's there.
    assert (await env.api.post("/hooks/usage", json={})).status_code == 401
    right = await env.api.post(
        "/hooks/authorize", json={}, headers={"x-sidecar-token": "hook-token-0123456789"}
    )
    assert right.status_code == 200


async def test_invalid_identity_is_400_and_writes_nothing(env: Env, redis: Redis) -> None:
    r = await authorize(env, {"identity": {"id": "x", "tags": "gold"}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "identity.tags"
    assert await redis.dbsize() == 0


async def test_a_body_naming_a_cap_twice_is_400_and_writes_nothing(env: Env, redis: Redis) -> None:
    """The proxy that asks forwards the body as it came: an upstream that keeps the first of two
    names would keep to a cap the decision did not reserve."""
    r = await env.api.post(
        "/hooks/authorize",
        content=b'{"model": "gpt-4o", "max_tokens": 100000, "max_tokens": 1}',
        headers={**HOOK, "content-type": "application/json", "x-orq-identity-id": "twice"},
    )
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
        "field_repeated",
        "max_tokens",
    )
    assert await redis.dbsize() == 0


async def test_usage_counts_once_per_request_id(env: Env) -> None:
    auth = (await authorize(env, {"identity": {"id": "reporter"}})).json()
    usage = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}
    fields = {
        "request_id": auth["request_id"],
        "identity": "reporter",
        "model": "gpt-4o",
        "status": 200,
        "usage": usage,
        "source": "body",
    }
    replies = await asyncio.gather(*(report(env, **fields) for _ in range(5)))
    assert [r.status_code for r in replies] == [202] * 5
    assert sum(r.json()["counted"] for r in replies) == 1
    metrics = await env.metrics("reporter")
    assert (metrics["total_requests"], metrics["input_tokens"], metrics["output_tokens"]) == (
        1,
        120,
        30,
    )
    # Once per request id, not per identity it names: a report of it under another identity
    # (or the same id in another case, another identity) is refused and counts nothing.
    for other in ("someone-else", "REPORTER"):
        r = await report(env, **{**fields, "identity": other})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "conflict_error",
            "reported_for_another_identity",
            "identity",
        )
    again = await report(env, **fields)
    assert again.status_code == 202 and again.json()["duplicate"] is True
    listed = (await env.api.get("/v2/identities?limit=10")).json()["data"]
    assert [i["external_id"] for i in listed] == ["reporter"]


async def test_usage_with_the_proxy_cost_and_anthropic_shape(env: Env) -> None:
    await report(
        env,
        request_id="r1",
        identity="mixed",
        model="claude-sonnet-4-20250514",
        usage={"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 4},
        path="/v1/messages",
    )
    await report(
        env,
        request_id="r2",
        identity="mixed",
        model="whatever",
        usage={"prompt_tokens": 1, "completion_tokens": 1},
        cost_usd="0.25",
    )
    await report(env, request_id="r3", identity="mixed", status=500)
    metrics = await env.metrics("mixed")
    assert metrics["total_requests"] == 3
    assert metrics["input_tokens"] == 14 + 1
    assert metrics["error_rate"] == pytest.approx(0.3333)
    assert metrics["total_cost"] > 0.25


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"request_id": "x"},
        {"request_id": "", "identity": "a"},
        {"request_id": "x", "identity": "a", "status": 42},
        {"request_id": "x", "identity": "a", "cost_usd": "-1"},
        {"request_id": "x", "identity": "a", "cost_usd": "lots"},
        {"request_id": "x", "identity": "a", "usage": [1, 2]},
        {"request_id": "x", "identity": "", "status": 200},
        {"request_id": "x", "identity": "a", "extra": True},
        # Counts and costs in the usage object that are not whole numbers of at least 0.
        *(
            {"request_id": "x", "identity": "a", "usage": {"prompt_tokens": 10, name: value}}
            for name, value in (
                ("completion_tokens", -5000),
                ("completion_tokens", 10**30),
                ("completion_tokens", 2**53),
                ("completion_tokens", "1500"),
                ("completion_tokens", 1500.5),
                ("completion_tokens", True),
                ("output_tokens", [1]),
                ("prompt_tokens_details", {"cached_tokens": -1}),
                ("prompt_tokens_details", 3),
                ("cache_creation", {"ephemeral_5m_input_tokens": "7"}),
                ("cost", -0.5),
                ("cost", "0.5"),
                ("total_cost", 10**400),
            )
        ),
    ],
)
async def test_bad_usage_reports_are_400(env: Env, redis: Redis, fields: dict[str, Any]) -> None:
    r = await report(env, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert await redis.dbsize() == 0


async def test_a_garbled_report_counts_nothing_and_leaves_the_reservation(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    """A report of a negative or unreadable count was read as 0 tokens: its request's
    reservation was given back as if it had used nothing."""
    policy = '[[policy]]\nname = "t"\ntokens = ["10000/minute"]\n'
    env = await make_env(**policy_file(tmp_path, policy))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}
    auth = await authorize(env, body, **{"x-orq-identity-id": "garbled"})
    assert auth.status_code == 200, auth.text
    held = 10000 - int(auth.headers["x-ratelimit-remaining-tokens"])
    assert held > 500
    fields = {"request_id": auth.json()["request_id"], "identity": "garbled", "model": "gpt-4o"}
    bad = await report(env, **fields, usage={"prompt_tokens": 10, "completion_tokens": -5000})
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "usage.completion_tokens"
    again = await authorize(env, body, **{"x-orq-identity-id": "garbled"})
    assert 10000 - int(again.headers["x-ratelimit-remaining-tokens"]) == 2 * held  # still held
    good = await report(env, **fields, usage={"prompt_tokens": 10, "completion_tokens": 40})
    assert good.status_code == 202 and good.json()["counted"], good.text
    metrics = await env.metrics("garbled")
    assert (metrics["input_tokens"], metrics["output_tokens"]) == (10, 40)


async def test_hook_authorize_refuses_with_429(make_env: MakeEnv, tmp_path: Path) -> None:
    env = await make_env(**policy_file(tmp_path, '[[policy]]\nname = "h"\nrequests = ["1/hour"]\n'))
    hook = {"x-sidecar-token": ADMIN_TOKEN, "X-ORQ-IDENTITY-ID": "hooked"}
    first = await env.api.post("/hooks/authorize", json={}, headers=hook)
    assert first.status_code == 200 and first.json()["policy"] == "h"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    second = await env.api.post("/hooks/authorize", json={}, headers=hook)
    assert second.status_code == 429
    assert second.json()["error"]["policy"] == "h"
    assert int(second.headers["retry-after"]) >= 1
