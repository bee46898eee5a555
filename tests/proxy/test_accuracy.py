from __future__ import annotations

import asyncio
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from tests.support.env import MakeEnv
from tests.support.traffic import MESSAGES

KINDS = ["chat", "chat_stream", "chat_stream_usage", "responses", "responses_stream",
         "embeddings", "messages", "messages_stream"]  # fmt: skip
KEYS = {"sk-acc-key-0": "key-owner-0", "sk-acc-key-1": "key-owner-1"}
# The override for "acc-model", in nano-dollars per token (USD per million tokens * 1000).
PRICE = {"input": 2000, "cached": 500, "write": 2500, "output": 8000}


@dataclass
class Expected:
    requests: int = 0
    errors: int = 0
    input: int = 0
    cached: int = 0
    write: int = 0
    output: int = 0
    reasoning: int = 0
    cost: int = 0
    sources: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class Call:
    kind: str
    source: str
    who: str
    fail: bool
    input: int
    cached: int
    write: int
    output: int
    reasoning: int
    cost_mode: str  # "body": usage.cost, "header": x-litellm-response-cost, "override"
    usd: Decimal


def plan(rng: random.Random, n: int) -> list[Call]:
    calls = []
    for _ in range(n):
        kind = rng.choice(KINDS)
        source = rng.choice(["body", "body", "header", "header", "api_key", "anonymous"])
        who = {
            "body": f"body-{rng.randrange(5)}",
            "header": f"header-{rng.randrange(5)}",
            "api_key": rng.choice(sorted(KEYS)),
            "anonymous": "anonymous",
        }[source]
        input_tokens = rng.randrange(1, 5000)
        embeddings = kind == "embeddings"
        anthropic_kind = kind.startswith("messages")
        output = 0 if embeddings else rng.randrange(1, 2000)
        cached = 0 if embeddings else rng.randrange(0, input_tokens // 2 + 1)
        write = rng.randrange(0, (input_tokens - cached) // 2 + 1) if anthropic_kind else 0
        reasoning = 0 if embeddings or anthropic_kind else rng.randrange(0, output + 1)
        cost_mode = rng.choice(["body", "header", "override"])
        usd = Decimal(rng.randrange(1, 10**7)) / Decimal(10**9)  # whole nano-dollars
        calls.append(Call(kind, source, who, rng.random() < 0.1, input_tokens, cached, write,
                          output, reasoning, cost_mode, usd))  # fmt: skip
    return calls


def expected_cost(call: Call) -> int:
    if call.cost_mode in ("body", "header"):
        return int(call.usd * 10**9)
    uncached = call.input - call.cached - call.write
    return (uncached * PRICE["input"] + call.cached * PRICE["cached"] + call.write * PRICE["write"]
            + call.output * PRICE["output"])  # fmt: skip


def control_headers(call: Call) -> dict[str, str]:
    headers = {
        "x-mock-input-tokens": str(call.input),
        "x-mock-output-tokens": str(call.output),
        "x-mock-cached-tokens": str(call.cached),
        "x-mock-cache-write-tokens": str(call.write),
        "x-mock-reasoning-tokens": str(call.reasoning),
    }
    if call.cost_mode == "body":
        headers["x-mock-cost"] = str(call.usd)
    elif call.cost_mode == "header":
        headers["x-mock-response-cost"] = str(call.usd)
    if call.fail:
        headers["x-mock-status"] = "500"
    if call.source == "header":
        headers["X-ORQ-IDENTITY-ID"] = call.who
    return headers


@dataclass
class Clients:
    openai: dict[str, openai.AsyncOpenAI]
    anthropic: dict[str, anthropic.AsyncAnthropic]


async def send(clients: Clients, call: Call) -> None:
    headers = control_headers(call)
    body: dict[str, Any] = {"identity": {"id": call.who}} if call.source == "body" else {}
    key = call.who if call.source == "api_key" else "sk-anonymous"
    model = "acc-model"
    if call.kind.startswith("messages"):
        claude = clients.anthropic[key]
        if call.kind == "messages":
            await claude.messages.create(model=model, max_tokens=2000, messages=MESSAGES,
                                         extra_headers=headers, extra_body=body)  # fmt: skip
        else:
            async with claude.messages.stream(
                model=model, max_tokens=2000, messages=MESSAGES,
                extra_headers=headers, extra_body=body,
            ) as stream:  # fmt: skip
                await stream.get_final_message()
        return
    oai = clients.openai[key]
    common: dict[str, Any] = {"extra_headers": headers, "extra_body": body}
    if call.kind == "chat":
        await oai.chat.completions.create(model=model, messages=MESSAGES, **common)
    elif call.kind.startswith("chat_stream"):
        options: Any = {"include_usage": True} if call.kind == "chat_stream_usage" else None
        stream = await oai.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, stream_options=options, **common
        )
        async for _ in stream:
            pass
    elif call.kind == "responses":
        await oai.responses.create(model=model, input="hi", **common)
    elif call.kind == "responses_stream":
        events = await oai.responses.create(model=model, input="hi", stream=True, **common)
        async for _ in events:
            pass
    else:
        await oai.embeddings.create(model=model, input="hi", **common)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_thousand_mixed_requests_are_counted_exactly(make_env: MakeEnv) -> None:
    env = await make_env(
        api_keys=[{"sha256": hashlib.sha256(k.encode()).hexdigest(), "owner": o}
                  for k, o in KEYS.items()],
        pricing={"models": {"acc-model": {"input_per_mtok": 2.0, "output_per_mtok": 8.0,
                                          "cached_input_per_mtok": 0.5,
                                          "cache_write_per_mtok": 2.5}}},
    )  # fmt: skip
    calls = plan(random.Random(20261124), 1000)
    expected: dict[str, Expected] = defaultdict(Expected)
    for call in calls:
        e = expected[KEYS.get(call.who, call.who)]
        e.requests += 1
        e.sources[call.source] += 1
        if call.fail:
            e.errors += 1
            continue
        e.input += call.input
        e.cached += call.cached
        e.write += call.write
        e.output += call.output
        e.reasoning += call.reasoning
        e.cost += expected_cost(call)
    gate = asyncio.Semaphore(16)
    keys = [*KEYS, "sk-anonymous"]
    clients = Clients(
        {k: openai.AsyncOpenAI(base_url=env.url + "/v1", api_key=k, max_retries=0) for k in keys},
        {k: anthropic.AsyncAnthropic(base_url=env.url, api_key=k, max_retries=0) for k in keys},
    )

    async def one(call: Call) -> None:
        async with gate:
            try:
                await send(clients, call)
            except (openai.InternalServerError, anthropic.InternalServerError):
                assert call.fail
            else:
                assert not call.fail

    try:
        await asyncio.gather(*(one(call) for call in calls))
    finally:
        for oai in clients.openai.values():
            await oai.close()
        for claude in clients.anthropic.values():
            await claude.close()
    await env.settle()
    assert len(env.mock.requests) == 1000
    for who, e in sorted(expected.items()):
        r = await env.api.get(f"/v2/identities/{who}/metrics")
        assert r.status_code == 200, (who, r.text)
        body = r.json()
        today = body["series"]["points"][-1]
        got = (today["requests"], today["errors"], today["input_tokens"],
               today["cached_input_tokens"], today["cache_write_tokens"], today["output_tokens"],
               today["reasoning_tokens"], today["cost_nanos"])  # fmt: skip
        want = (e.requests, e.errors, e.input, e.cached, e.write, e.output, e.reasoning, e.cost)
        assert got == want, who
        totals = body["totals"]
        assert (totals["total_requests"], totals["input_tokens"], totals["output_tokens"]) == (
            e.requests, e.input, e.output)  # fmt: skip
        assert totals["error_rate"] == round(e.errors / e.requests, 4)
        by_source = {k: v for k, v in body["series"]["by_source"].items() if v}
        assert by_source == dict(e.sources), who
