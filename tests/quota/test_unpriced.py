"""`[limits] unpriced = "deny"`: a model the sidecar cannot price is no way around a cost limit.
Its cost would count as 0 (SPEC: an unknown model costs 0) unless the upstream reported one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.env import Env, MakeEnv
from tests.support.limits import policy_file
from tests.support.traffic import MESSAGES

COSTLY = """
[[policy]]
name = "costly"
match = { ids = ["cost-*"] }
requests = ["1/minute"]
cost_usd = ["1/day"]

[[policy]]
name = "counted"
tokens = ["100000/day"]
"""
UNPRICED = "acme-inhouse-llm-7"  # no override, not in the catalogue


def client(env: Env) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-upstream", max_retries=0)


async def chat(env: Env, who: str, model: str) -> Any:
    async with client(env) as oai:
        return await oai.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=10, extra_headers={"x-orq-identity-id": who}
        )


async def test_an_unpriced_model_is_refused_where_a_cost_limit_applies_and_counts_nothing(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(limits={"unpriced": "deny"}, **policy_file(tmp_path, COSTLY))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await chat(env, "cost-1", UNPRICED)
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("model_unpriced", "model")
    assert "policy costly" in error["message"] and "cost-1" in error["message"]
    assert not env.mock.requests  # never forwarded
    # The refusal took nothing: the one request a minute is still there for a priced model.
    await chat(env, "cost-1", "gpt-4o")
    with pytest.raises(openai.RateLimitError):
        await chat(env, "cost-1", "gpt-4o")


async def test_without_a_cost_limit_or_with_a_price_an_unknown_model_goes_through(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(
        limits={"unpriced": "deny"},
        pricing={"models": {UNPRICED: {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}},
        **policy_file(tmp_path, COSTLY),
    )
    await chat(env, "someone", "another-inhouse-model")  # policy "counted": tokens only
    await chat(env, "cost-2", UNPRICED)  # priced by an override


async def test_by_default_an_unpriced_model_counts_as_zero(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(**policy_file(tmp_path, COSTLY))
    await chat(env, "cost-3", UNPRICED)
    await env.settle()
    metrics = await env.metrics("cost-3")
    assert (metrics["total_requests"], metrics["total_cost"]) == (1, 0)


async def test_an_identity_budget_in_dollars_is_a_cost_limit_too(make_env: MakeEnv) -> None:
    env = await make_env(limits={"unpriced": "deny"})
    r = await env.api.post(
        "/v2/budgets",
        json={"scope": {"kind": "identity", "target": "budgeted"}, "amount_usd": 5},
    )
    assert r.status_code == 201, r.text
    budget_id = r.json()["_id"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await chat(env, "budgeted", UNPRICED)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_unpriced" and f"budget {budget_id}" in error["message"]
    await chat(env, "budgeted", "gpt-4o")


async def test_hook_mode_refuses_it_at_authorize(make_env: MakeEnv, tmp_path: Path) -> None:
    env = await make_env(limits={"unpriced": "deny"}, **policy_file(tmp_path, COSTLY))
    token = env.api.headers["authorization"].split(" ", 1)[1]
    async with httpx.AsyncClient(base_url=env.url, headers={"x-sidecar-token": token}) as hooks:
        for model, status in ((UNPRICED, 403), ("gpt-4o", 200)):
            r = await hooks.post(
                "/hooks/authorize",
                json={"model": model, "messages": MESSAGES, "max_tokens": 10},
                headers={"x-orq-identity-id": "cost-hook"},
            )
            assert r.status_code == status, r.text
    assert r.status_code == 200
    assert r.json()["policy"] == "costly"
