"""Inline requests are counted with the others answered around them (Recorder.later), through
the proxy: what they used, in the hour they were answered in, their concurrency slot given
back at once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
from redis.asyncio import Redis

from sidecar.app import create_app
from sidecar.settings import parse
from sidecar.testing.redis_server import RedisServer
from sidecar.testing.serving import serve
from sidecar.usage import buckets
from sidecar.usage import recorder as recorder_module
from tests.support.auth import ADMIN_TOKEN
from tests.support.clock import FakeClock
from tests.support.env import Env, MakeEnv
from tests.support.usage import KEYS, catalog, requests_of

MESSAGES: Any = [{"role": "user", "content": "Say hi"}]


def client(env: Env) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-upstream", max_retries=0)


async def chat(env: Env, who: str, input_tokens: int = 10, **more: Any) -> None:
    async with client(env) as oai:
        await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_body={"identity": {"id": who}, **more},
            extra_headers={"x-mock-input-tokens": str(input_tokens)},
        )


async def identity_id(env: Env, who: str) -> str:
    r = await env.api.get(f"/v2/identities/{who}")
    assert r.status_code == 200, r.text
    found: str = r.json()["_id"]
    return found


async def test_usage_counts_in_the_hour_it_was_answered_though_counted_after(
    make_env: MakeEnv, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "TALLY_S", 30.0)  # counted when the test drains
    env = await make_env()
    answered_in = buckets.hour(clock())
    await chat(env, "late-counted", input_tokens=123)
    await chat(env, "late-counted", input_tokens=77, stream=True)
    assert env.app.services.recorder.waiting >= 2  # not counted yet
    clock.advance(3600)  # the hour turns before the tally runs
    await env.settle()
    ref = await identity_id(env, "late-counted")
    hours = await env.redis.hgetall(KEYS.usage_hours(ref) + str(answered_in))
    assert hours[b"r"] == b"2"
    assert hours[b"i"] == b"200"
    assert not await env.redis.exists(KEYS.usage_hours(ref) + str(answered_in + 1))


async def test_a_concurrency_slot_is_free_before_the_request_is_counted(
    make_env: MakeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "TALLY_S", 30.0)
    path = tmp_path / "one-at-a-time.toml"
    path.write_text('[[policy]]\nname = "one"\nconcurrency = 1\n', encoding="utf-8")
    env = await make_env(policies={"paths": [str(path)]})
    for _ in range(3):  # each after the last answer: the slot was given back with it
        await chat(env, "one-at-a-time")
    await env.settle()
    metrics = await env.metrics("one-at-a-time")
    assert (metrics["total_requests"], metrics["input_tokens"]) == (3, 30)


async def test_a_refusal_counts_in_the_hour_it_was_refused_in_though_counted_after(
    make_env: MakeEnv, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "TALLY_S", 30.0)
    path = tmp_path / "one.toml"
    path.write_text('[[policy]]\nname = "one"\nrequests = ["1/hour"]\n', encoding="utf-8")
    env = await make_env(policies={"paths": [str(path)]})
    refused_in = buckets.hour(clock())
    await chat(env, "refused-late")
    with pytest.raises(openai.RateLimitError):
        await chat(env, "refused-late")
    clock.advance(3600)
    await env.settle()
    ref = await identity_id(env, "refused-late")
    hours = await env.redis.hgetall(KEYS.usage_hours(ref) + str(refused_in))
    assert (hours[b"r"], hours[b"rl"]) == (b"1", b"1")  # a refusal is not a request


async def test_at_shutdown_what_a_count_left_for_later_starts_is_waited_for(
    redis: Redis,
    redis_server: RedisServer,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A count may start a task of its own (an identity still being written when its request
    was answered): the shutdown runs the counts before it waits for such tasks, so that what
    they add is written, not dropped after the recorder closed."""
    monkeypatch.setattr(recorder_module, "TALLY_S", 30.0)
    raw = {"redis": {"url": redis_server.url}, "server": {"data_dir": str(tmp_path)}}
    app = create_app(parse(raw), admin_token=ADMIN_TOKEN, redis=redis, clock=clock)
    services = app.services

    async def written_late() -> None:
        await asyncio.sleep(0.2)
        services.recorder.add(None, {"r": 1}, source="header", external_id="written-late")

    async with serve(app):
        services.recorder.later(lambda: services.background.spawn(written_late()))
    found = await catalog(redis, clock).get("written-late")
    assert found is not None
    assert (await requests_of(redis, found.id, clock))["requests"] == 1
