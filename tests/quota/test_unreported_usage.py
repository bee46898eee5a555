"""An answer that does not say what it used is charged what its request reserved: the upstream
did the work (and bills it), so a request whose answer hides its usage (a server that does not
report it, or leaves it out of a stream the sidecar asked it of, a response left to run in the
background) does not count as free against token and cost limits. A failed call, or none, is
charged nothing. Such answers are counted apart: in /metrics, and in the identity's counters
(`unreported_requests`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.support.env import Env, MakeEnv
from tests.support.limits import limit_usage
from tests.support.prometheus import parse
from tests.support.rawupstream import RawUpstream, response
from tests.support.ui import sign_in

CHAT = "/v1/chat/completions"
LIMIT = 100_000
NO_USAGE = msgspec.json.encode(
    {"id": "c1", "object": "chat.completion", "model": "gpt-4o", "choices": []}
)
WITH_USAGE = msgspec.json.encode(
    {
        "id": "c1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }
)
# Usage objects that say nothing that can be read as what was used.
UNREADABLE = [
    {},
    {"total_tokens": 310},
    {"prompt_tokens": 10, "total_tokens": 310},  # a chat's output untold (an embedding's has none)
    {"prompt_tokens": "10", "completion_tokens": "300"},
    {"prompt_tokens": 10.5, "completion_tokens": 299.5},
    {"prompt_tokens": 10, "completion_tokens": 10**16},
    {"prompt_tokens": 10, "completion_tokens": -300},
    {"prompt_tokens": 10, "completion_tokens": 300, "prompt_tokens_details": {"cached_tokens": -1}},
]


def with_usage(usage: Any) -> bytes:
    return msgspec.json.encode(
        {"id": "c1", "object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": usage}
    )


def sse_with_usage(usage: Any) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage}
    return SSE_NO_USAGE.replace(
        b"data: [DONE]", b"data: " + msgspec.json.encode(chunk) + b"\n\ndata: [DONE]"
    )


SSE_NO_USAGE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
)


class Upstream(RawUpstream):
    """Answers every request with the status, content type and body it is given (and header
    lines, when given)."""

    def __init__(self) -> None:
        super().__init__()
        self.reply: tuple[Any, ...] = (200, b"application/json", NO_USAGE)

    def answer(self, body: dict[str, Any]) -> bytes:
        return response(*self.reply)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream() as made:
        yield made


async def limited(make_env: MakeEnv, tmp_path: Path, upstream: Upstream) -> Env:
    path = tmp_path / "policies.toml"
    path.write_text(f'[[policy]]\nname = "p"\ntokens = ["{LIMIT}/minute"]\n')
    env: Env = await make_env(upstream_url=upstream.url, policies={"paths": [str(path)]})
    return env


async def ask(env: Env, who: str, stream: bool = False) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
    }
    if stream:
        body["stream"] = True
    async with httpx.AsyncClient(base_url=env.url) as client:
        return await client.post(CHAT, json=body, headers={"X-ORQ-IDENTITY-ID": who})


async def used(env: Env, who: str) -> int:
    await env.settle()
    (limit,) = (await limit_usage(env, who)).limits
    return int(limit.used)


@pytest.mark.parametrize(
    ("status", "kind", "body", "stream"),
    [
        (200, b"application/json", NO_USAGE, False),
        (200, b"text/event-stream", SSE_NO_USAGE, True),
    ],
    ids=["json", "sse"],
)
async def test_an_answer_without_usage_is_charged_what_was_reserved(
    make_env: MakeEnv,
    tmp_path: Path,
    upstream: Upstream,
    status: int,
    kind: bytes,
    body: bytes,
    stream: bool,
) -> None:
    env = await limited(make_env, tmp_path, upstream)
    upstream.reply = (status, kind, body)
    r = await ask(env, "hidden", stream)
    assert r.status_code == 200, r.text
    reserved = LIMIT - int(r.headers["x-ratelimit-remaining-tokens"])  # its reservation
    assert reserved > 100  # its input estimate and max_tokens
    assert await used(env, "hidden") == reserved


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("usage", UNREADABLE, ids=range(len(UNREADABLE)))
async def test_an_answer_whose_usage_cannot_be_read_is_charged_what_was_reserved(
    make_env: MakeEnv, tmp_path: Path, upstream: Upstream, usage: Any, stream: bool
) -> None:
    """A usage object whose counts are strings, fractions, negatives or past 2**53, or that has
    no input or output count (`{}`, a total alone), was read as 0 tokens: a free request."""
    env = await limited(make_env, tmp_path, upstream)
    body = sse_with_usage(usage) if stream else with_usage(usage)
    kind = b"text/event-stream" if stream else b"application/json"
    upstream.reply = (200, kind, body)
    r = await ask(env, "garbled", stream)
    assert r.status_code == 200, r.text
    reserved = LIMIT - int(r.headers["x-ratelimit-remaining-tokens"])
    assert reserved > 100
    assert await used(env, "garbled") == reserved
    r = await env.api.get("/v2/usage")
    (row,) = r.json()["data"]
    assert (row["requests"], row["unreported_requests"], row["output_tokens"]) == (1, 1, 0)


async def test_an_answer_that_tells_its_cost_only_is_charged_the_tokens_it_reserved(
    make_env: MakeEnv, tmp_path: Path, upstream: Upstream
) -> None:
    """A cost header without usage tells the cost, not the tokens: the tokens it reserved are
    charged (not none), and the cost it told."""
    path = tmp_path / "policies.toml"
    path.write_text(
        f'[[policy]]\nname = "p"\ntokens = ["{LIMIT}/minute"]\ncost_usd = ["100/day"]\n'
    )
    env: Env = await make_env(upstream_url=upstream.url, policies={"paths": [str(path)]})
    upstream.reply = (200, b"application/json", NO_USAGE, b"x-litellm-response-cost: 0.25")
    r = await ask(env, "costed")
    assert r.status_code == 200, r.text
    reserved = LIMIT - int(r.headers["x-ratelimit-remaining-tokens"])
    await env.settle()
    tokens, cost = (await limit_usage(env, "costed")).limits
    assert (int(tokens.used), int(cost.used)) == (reserved, 250_000_000)  # nano-dollars


async def test_an_answer_with_usage_is_charged_what_it_used(
    make_env: MakeEnv, tmp_path: Path, upstream: Upstream
) -> None:
    env = await limited(make_env, tmp_path, upstream)
    upstream.reply = (200, b"application/json", WITH_USAGE)
    assert (await ask(env, "told")).status_code == 200
    assert await used(env, "told") == 18


@pytest.mark.parametrize(
    ("status", "body"), [(500, b'{"error": {"message": "down"}}'), (307, b"")], ids=["500", "307"]
)
async def test_a_failed_or_redirected_call_is_charged_nothing(
    make_env: MakeEnv, tmp_path: Path, upstream: Upstream, status: int, body: bytes
) -> None:
    env = await limited(make_env, tmp_path, upstream)
    upstream.reply = (status, b"application/json", body)
    assert (await ask(env, "failed")).status_code == status
    assert await used(env, "failed") == 0


async def unread(env: Env) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=env.url) as client:
        samples = parse((await client.get("/metrics")).text)
    return {k: v for k, v in samples.items() if k.startswith("sidecar_usage_unread_requests")}


async def test_answers_whose_usage_could_not_be_read_are_counted_apart(
    make_env: MakeEnv, upstream: Upstream
) -> None:
    """An identity without token or cost limits is counted a request without tokens or cost:
    the metric shows how many, by kind, where the identity's metrics cannot."""
    env: Env = await make_env(upstream_url=upstream.url)
    for reply, stream in [
        ((200, b"application/json", NO_USAGE), False),
        ((200, b"text/event-stream", SSE_NO_USAGE), True),
        ((200, b"application/json", WITH_USAGE), False),
        ((500, b"application/json", b'{"error": {"message": "down"}}'), False),
    ]:
        upstream.reply = reply
        assert (await ask(env, "unread", stream)).status_code == reply[0]
    await env.settle()
    counted = await unread(env)
    assert counted.pop('sidecar_usage_unread_requests_total{kind="chat"}') == 2
    assert len(counted) == 4 and set(counted.values()) == {0}  # every other kind, from 0
    metrics = await env.metrics("unread")
    assert (metrics["total_requests"], metrics["total_tokens"]) == (4, 18)
    # Whose usage is unknown shows in the identity's own counters: its series, the usage
    # export (per identity and per model) and its usage by model; the 500 is an error, not one.
    r = await env.api.get("/v2/identities/unread/metrics")
    points = r.json()["series"]["points"]
    assert sum(p["unreported_requests"] for p in points) == 2
    r = await env.api.get("/v2/usage")
    (row,) = r.json()["data"]
    assert (row["requests"], row["errors"], row["unreported_requests"]) == (4, 1, 2)
    r = await env.api.get("/v2/usage", params={"group_by": "model"})
    (row,) = r.json()["data"]
    assert (row["model"], row["unreported_requests"]) == ("gpt-4o", 2)
    r = await env.api.get("/v2/usage", params={"format": "csv"})
    header, line = r.text.splitlines()
    assert header.split(",")[-1] == "unreported_requests" and line.split(",")[-1] == "2"
    r = await env.api.get("/v2/identities/unread/metrics", params={"group_by": "model"})
    assert [m["unreported_requests"] for m in r.json()["data"]] == [2]
    async with httpx.AsyncClient(base_url=env.url) as browser:
        await sign_in(browser)
        page = (await browser.get("/ui/identities/unread")).text
    assert '<div class="card" id="metric-unreported"><b>2</b>' in page
