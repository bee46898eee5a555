"""Usage by model through the inline proxy and the hooks, with the OpenAI and Anthropic
clients, read back from `/v2/identities/{id}/metrics?group_by=model`."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.auth import ADMIN_TOKEN
from tests.support.clock import FakeClock
from tests.support.env import Env
from tests.support.traffic import MESSAGES, client, tokens

COUNTS = (
    "requests", "errors", "input_tokens", "cached_input_tokens", "cache_write_tokens",
    "output_tokens", "reasoning_tokens", "unpriced_requests",
)  # fmt: skip


def nanos(cost_usd: str) -> int:
    return int(Decimal(cost_usd) * 10**9)


async def by_model(env: Env, external_id: str, **params: str) -> dict[str, Any]:
    await env.settle()
    r = await env.api.get(
        f"/v2/identities/{external_id}/metrics", params={"group_by": "model", **params}
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["object"] == "identity.metrics_by_model"
    assert body["identity"]["external_id"] == external_id
    return body


async def test_openai_and_anthropic_clients_counted_per_model(env: Env) -> None:
    who = {"X-ORQ-IDENTITY-ID": "mixed"}
    async with client(env) as oai:
        await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers={**who, **tokens(700, 300, cached_tokens=200, reasoning_tokens=120)},
        )
        stream = await oai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={**who, **tokens(5, 6)}
        )
        _ = [chunk async for chunk in stream]
        await oai.responses.create(
            model="gpt-4o-mini", input="Hello", extra_headers={**who, **tokens(40, 2)}
        )
        await oai.embeddings.create(
            model="text-embedding-3-small", input=["a"], extra_headers={**who, **tokens(12, 0)}
        )
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_headers={**who, "x-mock-status": "500"},
            )
    async with anthropic.AsyncAnthropic(
        base_url=env.url, api_key="sk-ant", max_retries=0, default_headers=who
    ) as claude:
        await claude.messages.create(
            model="claude-sonnet-4-20250514",
            max_tokens=64,
            messages=MESSAGES,
            extra_headers=tokens(100, 50, cached_tokens=30, cache_write_tokens=20),
        )
        async with claude.messages.stream(
            model="claude-sonnet-4-20250514",
            max_tokens=64,
            messages=MESSAGES,
            extra_headers=tokens(10, 7),
        ) as streamed:
            await streamed.get_final_message()
    body = await by_model(env, "mixed")
    rows = {row["model"]: row for row in body["data"]}
    assert set(rows) == {
        "gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "claude-sonnet-4-20250514",
    }  # fmt: skip
    gpt = rows["gpt-4o"]
    assert (gpt["requests"], gpt["input_tokens"], gpt["output_tokens"]) == (2, 705, 306)
    assert (gpt["cached_input_tokens"], gpt["reasoning_tokens"]) == (200, 120)
    mini = rows["gpt-4o-mini"]
    assert (mini["requests"], mini["errors"], mini["input_tokens"]) == (2, 1, 40)
    claude_row = rows["claude-sonnet-4-20250514"]
    assert (claude_row["requests"], claude_row["input_tokens"]) == (2, 110)
    assert (claude_row["cached_input_tokens"], claude_row["cache_write_tokens"]) == (30, 20)
    assert claude_row["output_tokens"] == 57
    assert rows["text-embedding-3-small"]["input_tokens"] == 12
    # The most expensive first, and together they are the identity's metrics.
    costs = [nanos(row["cost_usd"]) for row in body["data"]]
    assert costs == sorted(costs, reverse=True) and costs[0] > 0
    metrics = await env.metrics("mixed")
    assert sum(row["requests"] for row in rows.values()) == metrics["total_requests"] == 7
    assert sum(row["errors"] for row in rows.values()) == 1
    assert sum(row["input_tokens"] for row in rows.values()) == metrics["input_tokens"]
    assert sum(row["output_tokens"] for row in rows.values()) == metrics["output_tokens"]
    assert sum(costs) == round(Decimal(str(metrics["total_cost"])) * 10**9)


async def test_the_answers_model_wins_and_no_model_is_unknown(env: Env) -> None:
    async with httpx.AsyncClient(base_url=env.url) as http:
        # No model in the request, and a failed answer: counted, under (unknown).
        r = await http.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES},
            headers={"X-ORQ-IDENTITY-ID": "vague", "x-mock-status": "503"},
        )
        assert r.status_code == 503
        # A long name with control characters: bounded, printable.
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "m\u0007" + "x" * 300, "messages": MESSAGES},
            headers={"X-ORQ-IDENTITY-ID": "vague", "x-mock-status": "500"},
        )
        assert r.status_code == 500
    rows = {row["model"]: row for row in (await by_model(env, "vague"))["data"]}
    assert set(rows) == {"(unknown)", "m" + "x" * 127}
    assert all((row["requests"], row["errors"]) == (1, 1) for row in rows.values())


async def test_hook_reports_counted_per_model_once(env: Env) -> None:
    report = {
        "request_id": "hook-1",
        "identity": "hooked",
        "model": "gpt-4o",
        "status": 200,
        "usage": {"prompt_tokens": 11, "completion_tokens": 4},
    }
    for _ in range(2):  # a retried report counts once
        r = await env.api.post(
            "/hooks/usage", json=report, headers={"x-sidecar-token": ADMIN_TOKEN}
        )
        assert r.status_code == 202, r.text
    (row,) = (await by_model(env, "hooked"))["data"]
    assert (row["model"], row["requests"], row["input_tokens"], row["output_tokens"]) == (
        "gpt-4o", 1, 11, 4,
    )  # fmt: skip


async def test_the_range_and_bad_parameters(env: Env, clock: FakeClock) -> None:
    async with client(env) as oai:
        await oai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "ranged"}
        )
        await env.settle()
        clock.advance(86_400)
        await oai.chat.completions.create(
            model="o3-mini", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "ranged"}
        )
    body = await by_model(env, "ranged")
    assert {row["model"] for row in body["data"]} == {"gpt-4o", "o3-mini"}
    today = body["to"]
    body = await by_model(env, "ranged", **{"from": today})
    assert [row["model"] for row in body["data"]] == ["o3-mini"]
    assert (body["from"], body["to"]) == (today, today)
    for params, param in (
        ({"group_by": "tag"}, "group_by"),
        ({"group_by": "model", "from": "yesterday"}, "from"),
        ({"group_by": "model", "to": "2999-01-01"}, "to"),
        ({"from": today}, "from"),  # a range is for group_by=model
    ):
        r = await env.api.get("/v2/identities/ranged/metrics", params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["param"] == param
    r = await env.api.get("/v2/identities/ranged", params={"group_by": "model"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "group_by")
    r = await env.api.get("/v2/identities/nobody/metrics", params={"group_by": "model"})
    assert r.status_code == 404
