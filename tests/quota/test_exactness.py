"""Token and cost limits that hold exactly: charges are durable before the client has the
response (sequential calls never overshoot, on any sidecar), and concurrent requests reserve
their estimate at admission (docs/policies.md, "Exactness")."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sidecar.identity.resolve import Resolved, Source
from sidecar.proxy.inline import InlineProxy
from sidecar.quota.decision import Reserve, Subject
from tests.support.clock import FakeClock
from tests.support.env import Env, MakeEnv
from tests.support.limits import limit_usage
from tests.support.traffic import tokens

MESSAGES = [{"role": "user", "content": "hi"}]


def policy(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "policies.toml"
    path.write_text('[[policy]]\nname = "p"\n' + text)
    return {"policies": {"paths": [str(path)]}}


async def used(env: Env, who: str) -> float:
    """The token window's count for `who`, as admission reads it."""
    usage = await limit_usage(env, who)
    return float(sum(u.used for u in usage.limits if u.limit.dimension.value == "tokens"))


async def test_sequential_calls_never_overshoot_without_waiting_for_write_behind(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["100/minute"]\n'))
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-x", max_retries=0)
    admitted = 0
    for _ in range(5):  # no settle(), no sleep: the next call comes right after the answer
        try:
            await client.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=30,
                extra_headers={"X-ORQ-IDENTITY-ID": "seq", **tokens(20, 30)},
            )
            admitted += 1
        except openai.RateLimitError as exc:
            body: Any = exc.body
            assert body["dimension"] == "tokens"
            assert 1 <= int(exc.response.headers["retry-after"]) <= 60
    await client.close()
    # Write-behind let 60 + 60 + 60 through a 100 limit; now what is admitted fits (the
    # estimate, about 75 here, is over the actual 50: the second does not fit beside the first).
    assert admitted >= 1 and admitted * 50 <= 100
    assert await used(env, "seq") == admitted * 50  # reservations replaced by the actual


async def test_sequential_calls_on_two_sidecars_see_each_others_charges(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    config = policy(tmp_path, 'tokens = ["100/minute"]\n')
    first: Env = await make_env(**config)
    second: Env = await make_env(**config)
    statuses = []
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10}
    for n in range(4):
        env = first if n % 2 == 0 else second
        async with httpx.AsyncClient(base_url=env.url) as client:
            r = await client.post(
                "/v1/chat/completions",
                json=body,
                headers={"X-ORQ-IDENTITY-ID": "both", **tokens(30, 10)},
            )
        statuses.append(r.status_code)
    assert statuses.count(200) * 40 <= 100
    assert statuses[:2] == [200, 200] and statuses[-1] == 429


async def test_concurrent_slow_requests_admit_no_more_than_fits(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["100/minute"]\n'))
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10}
    headers = {"X-ORQ-IDENTITY-ID": "crowd", "x-mock-latency-ms": "300", **tokens(15, 10)}
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(20))
        )
    admitted = Counter(r.status_code for r in replies)[200]
    # Each reserves about 36 tokens (bytes / 3 + 16, and max_tokens 10): two fit in 100, and
    # they use 25 each, so no more than the limit is ever used.
    assert 1 <= admitted <= 100 // 25
    assert admitted * 25 <= 100
    assert len(env.mock.requests) == admitted
    assert await used(env, "crowd") == admitted * 25


async def test_concurrent_requests_without_a_cap_overshoot_by_at_most_one_estimate_error(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(
        limits={"default_output_reserve": 10}, **policy(tmp_path, 'tokens = ["100/minute"]\n')
    )
    body = {"model": "gpt-4o", "messages": MESSAGES}  # no max_tokens: 10 output tokens reserved
    size = len(json.dumps(body, separators=(",", ":")))
    estimate = size // 3 + 16 + 10
    actual = 15 + 100
    assert estimate < actual and 2 * estimate <= 100  # two fit beside each other
    headers = {"X-ORQ-IDENTITY-ID": "uncapped", "x-mock-latency-ms": "300", **tokens(15, 100)}
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    content=json.dumps(body, separators=(",", ":")),
                    headers={"Content-Type": "application/json", **headers},
                )
                for _ in range(2)
            )
        )
    assert Counter(r.status_code for r in replies)[200] == 2
    # Each went out with the output cap its reservation counted (`[limits] cap_output`) ...
    sent = [json.loads(request.body) for request in env.mock.requests]
    assert [b.get("max_completion_tokens") for b in sent] == [10, 10]
    # ... so the spec's bound holds: no more past the limit than one request's estimate error.
    assert await used(env, "uncapped") - 100 <= actual - estimate


async def test_a_reservation_never_settled_is_given_back_when_it_expires(
    make_env: MakeEnv, tmp_path: Path, clock: FakeClock
) -> None:
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["1000/hour"]\n'))
    services = env.app.services
    resolved = Resolved("crashed", Source.HEADER)
    identity_id = await services.identifier.identify(resolved)
    policy_ = await services.quota.policy_for(identity_id, resolved)
    assert policy_ is not None
    subject = Subject(identity_id, "crashed", policy_)
    limiter = services.limiter
    # A sidecar reserves 900 tokens, then dies before the answer.
    decision = await limiter.admit([subject], "req-lost", policy_, Reserve(900, 0))
    assert decision.admitted and await used(env, "crashed") == 900
    refused = await limiter.admit([subject], "req-2", policy_, Reserve(200, 0))
    assert not refused.admitted and refused.dimension is not None
    clock.advance(limiter.lease_ms / 1000 + 1)
    again = await limiter.admit([subject], "req-3", policy_, Reserve(200, 0))
    assert again.admitted  # the lost reservation was given back first
    await limiter.settle([subject], "req-3", 150, 0)
    assert await used(env, "crashed") == 150
    # A late settlement of the lost one charges its actual, once.
    await limiter.settle([subject], "req-lost", 100, 0)
    assert await used(env, "crashed") == 250


async def subjects_of(env: Env, *external_ids: str) -> list[Subject]:
    """Header identities as the limiter's subjects, each with its policy."""
    services = env.app.services
    subjects = []
    for who in external_ids:
        resolved = Resolved(who, Source.HEADER)
        identity_id = await services.identifier.identify(resolved)
        policy_ = await services.quota.policy_for(identity_id, resolved)
        assert policy_ is not None
        subjects.append(Subject(identity_id, who, policy_))
    return subjects


async def test_a_request_of_several_subjects_settles_in_one_store_call(
    make_env: MakeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["1000/hour"]\n'))
    # As a policy and two budgets.
    subjects = await subjects_of(env, "payer", "its-budget", "its-tag-budget")
    limiter = env.app.services.limiter
    decision = await limiter.admit(subjects, "req-3", subjects[0].policy, Reserve(400, 0))
    assert decision.admitted
    sent: list[int] = []
    settles = limiter._settles
    assert settles.line is not None  # one server: calls go out on the hot line
    write = settles.write

    def counted(keys: list[str], args: list[Any]) -> Any:
        sent.append(len(args) - 1)  # the subjects it settles
        return write(keys, args)

    monkeypatch.setattr(settles, "write", counted)
    await limiter.settle(subjects, "req-3", 120, 0)
    assert sent == [3]  # one script call for the three subjects, one round trip
    for who in ("payer", "its-budget", "its-tag-budget"):
        assert await used(env, who) == 120  # each reservation replaced by the actual
    await limiter.settle(subjects, "req-late", 30, 0)  # nothing reserved: the actual charged
    for who in ("payer", "its-budget", "its-tag-budget"):
        assert await used(env, who) == 150


async def test_a_settlement_tried_again_counts_once(make_env: MakeEnv, tmp_path: Path) -> None:
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["10000/hour"]\n'))
    ran, lost = await subjects_of(env, "retried", "not-run")
    limiter = env.app.services.limiter
    reserve = Reserve(900, 0)
    assert (await limiter.admit([ran], "req-ran", ran.policy, reserve)).admitted
    assert (await limiter.admit([lost], "req-lost", lost.policy, reserve)).admitted
    # The first attempt ran (its answer was lost on the way back): trying again is a no-op ...
    await limiter.settle([ran], "req-ran", 300, 0)
    await limiter.settle([ran], "req-ran", 300, 0, again=reserve)
    await limiter.settle([ran], "req-ran", 300, 0, again=reserve)
    assert await used(env, "retried") == 300
    # ... and when it did not run, trying again settles it, once.
    await limiter.settle([lost], "req-lost", 200, 0, again=reserve)
    await limiter.settle([lost], "req-lost", 200, 0, again=reserve)
    assert await used(env, "not-run") == 200
    # Without `again` (a first attempt) a request with no reservation is charged its actual.
    await limiter.settle([lost], "req-unreserved", 50, 0)
    assert await used(env, "not-run") == 250


@pytest.mark.slow
async def test_a_client_that_leaves_is_charged_what_upstream_produced(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["100000/hour"]\n'))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 50}
    headers = {
        "X-ORQ-IDENTITY-ID": "leaver",
        "x-mock-chunks": "10",
        "x-mock-chunk-delay-ms": "50",
        **tokens(40, 50),
    }
    async with (
        httpx.AsyncClient(base_url=env.url) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as stream,
    ):
        async for _ in stream.aiter_bytes():
            break  # gone after the first chunk
    for _ in range(60):
        if await used(env, "leaver") == 90:
            break
        await asyncio.sleep(0.05)
    assert await used(env, "leaver") == 90


@asynccontextmanager
async def authorized(
    make_env: MakeEnv, tmp_path: Path, limit: str
) -> AsyncIterator[tuple[Env, httpx.AsyncClient, str, int]]:
    """A sidecar whose policy limits tokens to `limit`, a client of its hooks, and one request
    of identity `h` authorized there (`max_tokens` 20): its request id and what it reserved."""
    env: Env = await make_env(**policy(tmp_path, f'tokens = ["{limit}"]\n'))
    token = env.api.headers["authorization"].split(" ", 1)[1]
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20}
    async with httpx.AsyncClient(base_url=env.url, headers={"x-sidecar-token": token}) as hooks:
        first = await hooks.post("/hooks/authorize", json=body, headers={"x-orq-identity-id": "h"})
        assert first.status_code == 200
        yield env, hooks, first.json()["request_id"], int(await used(env, "h"))


async def test_hook_mode_reserves_at_authorize_and_settles_on_report(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    async with authorized(make_env, tmp_path, "100/hour") as (env, hooks, request_id, reserved):
        assert 20 < reserved <= 100
        report = {
            "request_id": request_id,
            "identity": "h",
            "model": "gpt-4o",
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        }
        assert (await hooks.post("/hooks/usage", json=report)).status_code == 202
        assert await used(env, "h") == 30
        assert (await hooks.post("/hooks/usage", json=report)).json()["duplicate"] is True
        assert await used(env, "h") == 30  # settled once


@pytest.mark.parametrize(
    ("status", "extra", "charged", "unreported"),
    [
        (200, {}, "reserved", 1),  # a success that told nothing: its reservation stands
        (200, {"usage": {}}, "reserved", 1),  # an empty usage object tells nothing either
        (200, {"usage": {"total_tokens": 9}}, "reserved", 1),  # nor a total alone
        (200, {"cost_usd": 0.001}, "reserved", 0),  # a cost told, not the tokens
        (500, {}, 0, 0),  # a failure uses nothing
        (200, {"path": "/v1/rerank"}, 0, 0),  # an extra path's answers need not tell usage
    ],
    ids=["nothing", "empty", "total", "cost", "failed", "extra-path"],
)
async def test_a_hook_report_without_usage_is_charged_its_reservation(
    make_env: MakeEnv,
    tmp_path: Path,
    status: int,
    extra: dict[str, Any],
    charged: int | str,
    unreported: int,
) -> None:
    """As inline (an answer that hides its usage is charged what it reserved): a report of
    success without usage or cost does not make the request free against token limits, and is
    counted as unreported."""
    async with authorized(make_env, tmp_path, "100000/hour") as (env, hooks, request_id, reserved):
        assert reserved > 20
        report = {
            "request_id": request_id,
            "identity": "h",
            "model": "gpt-4o",
            "status": status,
            **extra,
        }
        assert (await hooks.post("/hooks/usage", json=report)).status_code == 202
        assert await used(env, "h") == (reserved if charged == "reserved" else charged)
        assert (await hooks.post("/hooks/usage", json=report)).json()["duplicate"] is True
        assert await used(env, "h") == (reserved if charged == "reserved" else charged)
    await env.settle()
    r = await env.api.get("/v2/usage")
    (row,) = r.json()["data"]
    assert (row["requests"], row["unreported_requests"]) == (1, unreported)


@pytest.mark.parametrize("cap_output", [True, False])
async def test_the_output_cap_is_added_only_where_a_token_limit_needs_it(
    make_env: MakeEnv, tmp_path: Path, cap_output: bool
) -> None:
    env: Env = await make_env(
        limits={"default_output_reserve": 300, "cap_output": cap_output},
        **policy(tmp_path, 'tokens = ["100000/minute"]\n'),
    )
    body = {"model": "gpt-4o", "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        for extra in ({}, {"max_tokens": 7}):
            reply = await client.post(
                "/v1/chat/completions",
                json={**body, **extra},
                headers={"X-ORQ-IDENTITY-ID": "capped"},
            )
            assert reply.status_code == 200
    uncapped, own = (json.loads(request.body) for request in env.mock.requests)
    assert uncapped.get("max_completion_tokens") == (300 if cap_output else None)
    assert own["max_tokens"] == 7 and "max_completion_tokens" not in own  # its own cap stands


@pytest.mark.parametrize(
    ("policy_line", "limits", "body", "cap"),
    [
        ('tokens = ["100000/minute"]', {"default_output_reserve": 300}, {}, 300),
        ('cost_usd = ["100/day"]', {}, {}, 1024),
        ('tokens = ["100000/minute"]', {}, {"max_tokens": 7}, None),  # its own cap
        ('tokens = ["100000/minute"]', {}, {"max_output_tokens": 7}, None),  # any kind's
        ('requests = ["100/minute"]', {}, {}, None),  # nothing reserved
        ('tokens = ["100000/minute"]', {"cap_output": False}, {}, None),
    ],
    ids=["tokens", "cost", "own-cap", "responses-cap", "requests-only", "off"],
)
async def test_authorize_names_the_output_cap_it_reserved_for(
    make_env: MakeEnv,
    tmp_path: Path,
    policy_line: str,
    limits: dict[str, Any],
    body: dict[str, Any],
    cap: int | None,
) -> None:
    """Hook mode cannot change the body: `/hooks/authorize` names the cap a request without one
    was reserved for (`output_cap`, and a header for proxies that copy them), for the caller
    to set as inline mode does."""
    env: Env = await make_env(limits=limits, **policy(tmp_path, policy_line + "\n"))
    token = env.api.headers["authorization"].split(" ", 1)[1]
    request = {"model": "gpt-4o", "messages": MESSAGES, **body}
    async with httpx.AsyncClient(base_url=env.url, headers={"x-sidecar-token": token}) as hooks:
        r = await hooks.post("/hooks/authorize", json=request, headers={"x-orq-identity-id": "c"})
    assert r.status_code == 200, r.text
    assert r.json()["output_cap"] == cap
    assert r.headers.get("x-sidecar-output-cap") == (None if cap is None else str(cap))


async def test_each_choice_asked_for_is_reserved(make_env: MakeEnv, tmp_path: Path) -> None:
    """`n` choices of up to `max_tokens` each: a reservation of one choice's output let
    requests through that together produce many times the limit."""
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["600/minute"]\n'))
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "n": 10}
    headers = {"X-ORQ-IDENTITY-ID": "many", "x-mock-latency-ms": "300", **tokens(15, 500)}
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(5))
        )
    # Each reserves its input (about 40) and 10 x 50 of output: one fits in 600 at a time.
    assert Counter(r.status_code for r in replies) == {200: 1, 429: 4}
    (answered,) = (r for r in replies if r.status_code == 200)
    assert await used(env, "many") == answered.json()["usage"]["total_tokens"]


async def test_each_prompt_of_a_completion_is_reserved(make_env: MakeEnv, tmp_path: Path) -> None:
    """A completion's `prompt` may be a list of prompts, each answered with up to `max_tokens`
    (times its choices): a reservation of one prompt's output let requests through that
    together produced many times the limit."""
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["2500/minute"]\n'))
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-x", max_retries=0)
    headers = {"X-ORQ-IDENTITY-ID": "prompts", "x-mock-latency-ms": "300", **tokens(15, 2000)}

    async def one() -> int | None:
        try:
            answer = await client.completions.create(
                model="gpt-3.5-turbo-instruct",
                prompt=["Say hi"] * 40,
                max_tokens=50,
                extra_headers=headers,
            )
        except openai.RateLimitError:
            return None
        assert answer.usage is not None
        return answer.usage.total_tokens

    answers = await asyncio.gather(*(one() for _ in range(5)))
    await client.close()
    # Each reserves its input (about 140) and 40 x 50 of output: one fits in 2,500 at a time,
    # and it uses 2,015 (the mock, as a real upstream, produces 50 for each of the 40).
    assert sorted(answers, key=str) == [2015, None, None, None, None]
    assert await used(env, "prompts") == 2015


@pytest.mark.parametrize(
    ("field", "value"), [("max_tokens", "100000"), ("n", "128"), ("max_completion_tokens", 1.5)]
)
async def test_a_reservation_field_that_is_not_a_whole_number_is_refused(
    make_env: MakeEnv, tmp_path: Path, field: str, value: Any
) -> None:
    """A lax upstream would read it as a number and produce output nobody reserved."""
    limits = 'requests = ["10/minute"]\ntokens = ["100000/minute"]\n'
    env: Env = await make_env(**policy(tmp_path, limits))
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10, field: value}
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post(
            "/v1/chat/completions", json=body, headers={"X-ORQ-IDENTITY-ID": "lax"}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", field)
        assert env.mock.requests == type(env.mock.requests)()  # nothing went upstream
        ok = await client.post(
            "/v1/chat/completions",
            json={**body, field: 4},
            headers={"X-ORQ-IDENTITY-ID": "lax", **tokens(5, 5)},
        )
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-ratelimit-remaining-requests"] == "9"  # the refused one counted nothing


async def test_a_limited_answers_head_goes_out_before_its_settlement_and_its_body_after(
    make_env: MakeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settlement comes between the head (which the client reads meanwhile) and the body:
    the client has the whole answer only once its usage counts, whether it used less than it
    reserved (the rest given back) or more (charged). Either way the count is the actual."""
    env: Env = await make_env(**policy(tmp_path, 'tokens = ["100000/minute"]\n'))
    events: list[str] = []
    limiter = env.app.services.limiter
    written, settled = limiter.settle_written, limiter.settle

    def settle_written(*args: Any, **kwargs: Any) -> Any:
        events.append("given back")
        return written(*args, **kwargs)

    async def settle(*args: Any, **kwargs: Any) -> None:
        events.append("charged")
        await settled(*args, **kwargs)

    monkeypatch.setattr(limiter, "settle_written", settle_written)
    monkeypatch.setattr(limiter, "settle", settle)
    answer = InlineProxy.__call__

    async def traced(self: InlineProxy, scope: Any, receive: Any, send: Any) -> None:
        async def noted(message: Any) -> None:
            if message["type"] == "http.response.start":
                events.append("head")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                events.append("answered")
            await send(message)

        await answer(self, scope, receive, noted)

    monkeypatch.setattr(InlineProxy, "__call__", traced)
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 30}
    async with httpx.AsyncClient(base_url=env.url) as client:
        for who, usage, order in (
            ("under", tokens(20, 30), ["head", "given back", "answered"]),
            ("over", tokens(5000, 30), ["head", "charged", "answered"]),  # above the estimate
        ):
            events.clear()
            r = await client.post(
                "/v1/chat/completions", json=body, headers={"X-ORQ-IDENTITY-ID": who, **usage}
            )
            assert r.status_code == 200, r.text
            assert events == order
    for who, actual in (("under", 50), ("over", 5030)):
        for _ in range(30):
            if await used(env, who) == actual:
                break
            await asyncio.sleep(0.01)
        assert await used(env, who) == actual
