"""`[limits] opaque_input = "one_at_a_time"`: input a request's bytes do not carry (an image by
URL, earlier turns by previous_response_id) is no way to race past a token or cost limit. Such a
request's estimate can fall short by any amount, so, under a token or cost limit, one of them
per identity is in flight at a time: what concurrent requests go past the limit by stays one
request's error, as the SPEC bounds it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.auth import ADMIN_TOKEN
from tests.support.env import Env, MakeEnv
from tests.support.limits import policy_file
from tests.support.prometheus import parse
from tests.support.traffic import MESSAGES

POLICIES = """
[[policy]]
name = "metered"
match = { ids = ["tok-*"] }
tokens = ["100000/hour"]

[[policy]]
name = "counted"
requests = ["1000/minute"]
"""
ONE_AT_A_TIME = {"limits": {"opaque_input": "one_at_a_time"}}
IMAGE: Any = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "https://images.test/cat.png"}},
        ],
    }
]
SLOW = {"x-mock-latency-ms": "400"}  # in flight long enough to overlap


async def chat(env: Env, who: str, messages: Any, **headers: str) -> Any:
    async with openai.AsyncOpenAI(
        base_url=env.url + "/v1", api_key="sk-upstream", max_retries=0
    ) as oai:
        return await oai.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            max_tokens=10,
            extra_headers={"x-orq-identity-id": who, **headers},
        )


async def at_once(*calls: Any) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def later(call: Any) -> Any:
    await asyncio.sleep(0.1)  # while a slow one is in flight
    return await call


async def test_one_request_with_an_image_by_url_at_a_time_under_a_token_limit(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(**ONE_AT_A_TIME, **policy_file(tmp_path, POLICIES))
    first, second, text = await at_once(
        chat(env, "tok-1", IMAGE, **SLOW),
        later(chat(env, "tok-1", IMAGE)),
        later(chat(env, "tok-1", MESSAGES)),
    )
    assert not isinstance(first, BaseException), first
    assert not isinstance(text, BaseException), text  # text is estimated: not held back
    assert isinstance(second, openai.RateLimitError), second
    error = second.body
    assert isinstance(error, dict)
    assert (error["code"], error["dimension"], error["limit"]) == (
        "concurrency_limit_exceeded",
        "concurrency",
        "1",
    )
    assert error["policy"] == "opaque_input" and error["identity"] == "tok-1"
    assert "[limits] opaque_input" in error["message"]
    assert int(second.response.headers["retry-after"]) >= 1
    # Its slot is free once the first has ended: the next goes through, and so does another
    # identity's meanwhile.
    await chat(env, "tok-1", IMAGE)
    others = await at_once(chat(env, "tok-2", IMAGE), chat(env, "tok-3", IMAGE))
    assert not any(isinstance(r, BaseException) for r in others), others
    async with httpx.AsyncClient(base_url=env.url) as client:
        samples = parse((await client.get("/metrics")).text)
    decisions = 'sidecar_limit_decisions_total{policy="opaque_input",dimension="concurrency",%s}'
    assert samples[decisions % 'decision="admitted"'] == 4
    assert samples[decisions % 'decision="refused"'] == 1


async def test_by_default_and_without_a_token_or_cost_limit_they_run_at_once(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    by_default = await make_env(**policy_file(tmp_path, POLICIES))
    results = await at_once(*(chat(by_default, "tok-4", IMAGE, **SLOW) for _ in range(3)))
    assert not any(isinstance(r, BaseException) for r in results), results
    env = await make_env(**ONE_AT_A_TIME, **policy_file(tmp_path, POLICIES))
    # Policy "counted" limits requests only: nothing to under-estimate.
    results = await at_once(*(chat(env, "someone", IMAGE, **SLOW) for _ in range(3)))
    assert not any(isinstance(r, BaseException) for r in results), results


@pytest.mark.parametrize("prefetch", [0, 32])
async def test_a_busy_identity_s_quota_held_ahead_does_not_let_them_through_at_once(
    make_env: MakeEnv, tmp_path: Path, prefetch: int
) -> None:
    env = await make_env(
        limits={"opaque_input": "one_at_a_time", "prefetch": prefetch},
        **policy_file(tmp_path, POLICIES),
    )
    for _ in range(3):  # busy: with prefetch, quota is held ahead for it now
        await chat(env, "tok-5", MESSAGES)
    results = await at_once(*(chat(env, "tok-5", IMAGE, **SLOW) for _ in range(4)))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 3, results


async def test_hook_mode_holds_the_slot_until_the_usage_report(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(**ONE_AT_A_TIME, **policy_file(tmp_path, POLICIES))
    body = {
        "model": "gpt-4o",
        "input": "And what about the second one?",
        "previous_response_id": "resp_abc",
        "max_output_tokens": 10,
    }
    headers = {"x-sidecar-token": ADMIN_TOKEN, "x-orq-identity-id": "tok-hook"}
    async with httpx.AsyncClient(base_url=env.url, headers=headers) as hooks:
        first = await hooks.post("/hooks/authorize", json=body)
        assert first.status_code == 200, first.text
        again = await hooks.post("/hooks/authorize", json=body)
        assert again.status_code == 429, again.text
        assert again.json()["error"]["policy"] == "opaque_input"
        report = {
            "request_id": first.json()["request_id"],
            "identity": "tok-hook",
            "model": "gpt-4o",
            "usage": {"prompt_tokens": 900, "completion_tokens": 10, "total_tokens": 910},
        }
        r = await hooks.post("/hooks/usage", json=report)
        assert r.status_code == 202, r.text
        await env.settle()
        after = await hooks.post("/hooks/authorize", json=body)
        assert after.status_code == 200, after.text
