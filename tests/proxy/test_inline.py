from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any
from urllib.parse import unquote

import anthropic
import httpx
import openai
import pytest
from redis.asyncio import Redis

from sidecar.identity import identify
from sidecar.testing.redis_server import free_port
from tests.support.env import Env, MakeEnv
from tests.support.traffic import MESSAGES, client, tokens


async def test_seed_example_responses_with_body_identity(env: Env) -> None:
    async with client(env) as oai:
        response = await oai.responses.create(
            model="gpt-4o",
            input="Hello",
            extra_body={
                "identity": {
                    "id": "user_12345",
                    "display_name": "John Smith",
                    "email": "john@example.com",
                    "metadata": [{"plan": "pro"}],
                }
            },
            extra_headers=tokens(1000, 500),
        )
    assert response.usage is not None and response.usage.input_tokens == 1000
    forwarded = env.mock.requests[-1]
    assert "identity" not in forwarded.json()
    assert forwarded.header("x-orq-identity-id") == "user_12345"
    assert forwarded.header("authorization") == "Bearer sk-upstream"
    record = (await env.api.get("/v2/identities/user_12345")).json()
    assert record["display_name"] == "John Smith"
    assert record["metadata"] == {"plan": "pro"}
    metrics = await env.metrics("user_12345")
    assert metrics["total_requests"] == 1
    assert (metrics["input_tokens"], metrics["output_tokens"]) == (1000, 500)
    assert metrics["total_tokens"] == 1500
    # gpt-4o from the catalogue: 1000 * $2.50/M + 500 * $10/M.
    assert metrics["total_cost"] == pytest.approx(0.0075, abs=1e-12)


async def test_chat_json_counts_every_token_kind(env: Env) -> None:
    async with client(env) as oai:
        await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_body={"orq": {"identity": {"id": "team-a"}}},
            extra_headers=tokens(700, 300, cached_tokens=200, reasoning_tokens=120),
        )
    forwarded = env.mock.requests[-1].json()
    assert "orq" not in forwarded
    await env.settle()
    names = ["s:r", "s:i", "s:ci", "s:o", "s:rs", "s:sb", "s:c"]
    values = await env.redis.hmget(await _days_key(env, "team-a"), names)
    sums = {name[2:]: int(value or 0) for name, value in zip(names, values, strict=True)}
    assert sums["r"] == 1 and sums["i"] == 700 and sums["ci"] == 200
    assert sums["o"] == 300 and sums["rs"] == 120 and sums["sb"] == 1
    assert sums["c"] > 0


async def _days_key(env: Env, external_id: str) -> str:
    identity_id: str = (await env.api.get(f"/v2/identities/{external_id}")).json()["_id"]
    return "sidecar:u:{" + identity_id + "}:d"


async def test_chat_stream_without_usage_request_gets_it_stripped(env: Env) -> None:
    async with client(env) as oai:
        stream = await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-ORQ-IDENTITY-ID": "streamer", **tokens(40, 25)},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks and all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks), "the usage-only chunk was not removed"
    assert env.mock.requests[-1].json()["stream_options"] == {"include_usage": True}
    metrics = await env.metrics("streamer")
    assert (metrics["input_tokens"], metrics["output_tokens"]) == (40, 25)


async def test_chat_stream_that_asked_for_usage_keeps_it(env: Env) -> None:
    async with client(env) as oai:
        stream = await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-ORQ-IDENTITY-ID": "asker", **tokens(40, 25)},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 65
    assert (await env.metrics("asker"))["total_tokens"] == 65


async def test_anthropic_json_and_stream_with_header_identity(env: Env) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=env.url,
        api_key="sk-ant",
        max_retries=0,
        default_headers={"X-ORQ-IDENTITY-ID": "claude-user"},
    ) as claude:
        message = await claude.messages.create(
            model="claude-sonnet-4-20250514",
            max_tokens=64,
            messages=MESSAGES,
            extra_headers=tokens(100, 50, cached_tokens=30, cache_write_tokens=20),
        )
        assert message.usage.output_tokens == 50
        async with claude.messages.stream(
            model="claude-sonnet-4-20250514",
            max_tokens=64,
            messages=MESSAGES,
            extra_headers=tokens(10, 7),
        ) as stream:
            final = await stream.get_final_message()
        assert final.usage.output_tokens == 7
    metrics = await env.metrics("claude-user")
    assert metrics["total_requests"] == 2
    # x-mock-input-tokens is all input; Anthropic's own input_tokens leaves the cache reads
    # and writes out, and the sidecar adds them back.
    assert metrics["input_tokens"] == 100 + 10
    sums = await env.redis.hmget(await _days_key(env, "claude-user"), ["s:ci", "s:cw", "s:sh"])
    assert sums == [b"30", b"20", b"2"]
    assert metrics["output_tokens"] == 57
    record = (await env.api.get("/v2/identities/claude-user")).json()
    assert record["display_name"] is None, "a header never sets profile fields"


async def test_embeddings_attributed_to_the_api_key_owner(make_env: MakeEnv) -> None:
    key = "sk-user-owned-123"
    env = await make_env(
        api_keys=[{"sha256": hashlib.sha256(key.encode()).hexdigest(), "owner": "key-owner"}]
    )
    async with openai.AsyncOpenAI(base_url=env.url + "/v1", api_key=key, max_retries=0) as oai:
        result = await oai.embeddings.create(
            model="text-embedding-3-small", input=["a", "b"], extra_headers=tokens(12, 0)
        )
    assert len(result.data) == 2
    assert env.mock.requests[-1].header("x-orq-identity-id") == "key-owner"
    metrics = await env.metrics("key-owner")
    assert (metrics["total_requests"], metrics["input_tokens"]) == (1, 12)
    assert metrics["total_cost"] > 0


async def test_unattributed_requests_count_under_anonymous(env: Env) -> None:
    async with client(env) as oai:
        await oai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers=tokens(5, 5)
        )
    assert env.mock.requests[-1].header("x-orq-identity-id") == "anonymous"
    assert (await env.metrics("anonymous"))["total_requests"] == 1


async def test_unmetered_paths_are_forwarded_untouched(env: Env) -> None:
    async with client(env) as oai:
        models = await oai.models.list()
    assert models.data
    async with httpx.AsyncClient(base_url=env.url) as raw:
        r = await raw.post("/v1/files?purpose=x", json={"identity": {"id": "nope"}})
    assert env.mock.requests[-1].query == "purpose=x"
    assert env.mock.requests[-1].json() == {"identity": {"id": "nope"}}
    assert r.status_code == 404
    await env.settle()
    listed = (await env.api.get("/v2/identities")).json()
    assert listed["data"] == []


@pytest.mark.parametrize(
    ("identity", "param"),
    [
        ({"id": ""}, "identity.id"),
        ({"display_name": "x"}, "identity.id"),
        ({"id": "x", "tags": ["a"] * 11}, "identity.tags"),
        ({"id": "x", "metadata": {"deep": {"er": 1}}}, "identity.metadata.deep"),
        ({"id": "x", "favourite": 1}, "identity.favourite"),
        ("just-a-string", "identity"),
    ],
)
async def test_invalid_identity_is_400_and_nothing_happens(
    env: Env, redis: Redis, identity: Any, param: str
) -> None:
    async with client(env) as oai:
        with pytest.raises(openai.BadRequestError) as info:
            await oai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_body={"identity": identity}
            )
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == param
    assert len(env.mock.requests) == 0
    await env.settle()
    assert await redis.dbsize() == 0


async def test_identity_required(make_env: MakeEnv) -> None:
    env = await make_env(identity={"required": True})
    async with client(env) as oai:
        with pytest.raises(openai.AuthenticationError):
            await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        await oai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "ok"}
        )
    assert len(env.mock.requests) == 1


async def test_non_ascii_id_travels_percent_encoded(env: Env) -> None:
    async with client(env) as oai:
        await oai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_body={"identity": {"id": "zoë/équipe 1"}}
        )
    sent = env.mock.requests[-1].header("x-orq-identity-id")
    assert sent is not None and sent.isascii() and unquote(sent) == "zoë/équipe 1"
    async with client(env) as oai:
        await oai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": sent}
        )
    await env.settle()
    listed = (await env.api.get("/v2/identities")).json()
    assert [i["external_id"] for i in listed["data"]] == ["zoë/équipe 1"]


async def test_upstream_errors_count_as_failed_requests(env: Env) -> None:
    async with client(env) as oai:
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_headers={"X-ORQ-IDENTITY-ID": "unlucky", "x-mock-status": "500"},
            )
        await oai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "unlucky"}
        )
    metrics = await env.metrics("unlucky")
    assert metrics["total_requests"] == 2 and metrics["error_rate"] == 0.5


async def test_unreachable_upstream_is_502_and_counted(make_env: MakeEnv) -> None:
    env = await make_env(upstream_url=f"http://127.0.0.1:{free_port()}")
    async with client(env) as oai:
        with pytest.raises(openai.APIStatusError) as info:
            await oai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "u"}
            )
    assert info.value.status_code == 502
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "upstream_unreachable"
    metrics = await env.metrics("u")
    assert (metrics["total_requests"], metrics["error_rate"]) == (1, 1.0)


async def test_slow_upstream_is_504_and_counted(make_env: MakeEnv) -> None:
    env = await make_env(upstream={"timeout_s": 0.3})
    async with client(env) as oai:
        with pytest.raises(openai.APIStatusError) as info:
            await oai.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_headers={"X-ORQ-IDENTITY-ID": "slow", "x-mock-latency-ms": "2000"},
            )
    assert info.value.status_code == 504
    assert (await env.metrics("slow"))["error_rate"] == 1.0


async def test_client_that_leaves_mid_stream_is_still_charged(env: Env) -> None:
    headers = {
        "X-ORQ-IDENTITY-ID": "leaver",
        "x-mock-chunks": "20",
        "x-mock-chunk-delay-ms": "20",
        **tokens(33, 44),
    }
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    async with (
        httpx.AsyncClient(base_url=env.url) as raw,
        raw.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        async for _ in r.aiter_bytes():
            break  # first bytes, then hang up
    for _ in range(100):
        await asyncio.sleep(0.05)
        await env.settle()
        found = await env.api.get("/v2/identities/leaver", params={"include_metrics": "true"})
        if found.status_code == 200 and found.json()["metrics"]["total_requests"]:
            break
    metrics = found.json()["metrics"]
    assert (metrics["input_tokens"], metrics["output_tokens"]) == (33, 44)


@pytest.mark.slow  # waits out the profile refresh's second
async def test_known_identities_stale_profiles_are_written_together_after_their_answers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(identify, "REFRESH_DELAY_S", 1.0)  # both answers come within it
    records = env.app.services.identifier.records
    written: list[list[str]] = []
    update_known = records.update_known

    async def counted(updates: list[tuple[str, str, Any]]) -> Any:
        written.append(sorted(external_id for _, external_id, _ in updates))
        return await update_known(updates)

    monkeypatch.setattr(records, "update_known", counted)

    async def call(oai: openai.AsyncOpenAI, who: str, name: str) -> None:
        await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_body={"identity": {"id": who, "display_name": name}},
        )

    async with client(env) as oai:
        await asyncio.gather(call(oai, "ann", "Ann"), call(oai, "bob", "Bob"))  # created
        await env.settle()
        assert written == []
        await asyncio.gather(call(oai, "ann", "Ann B."), call(oai, "bob", "Bob B."))
        assert written == []  # answered before anything was written
        await env.settle()
    assert written == [["ann", "bob"]]  # one round trip for both
    for who, name in (("ann", "Ann B."), ("bob", "Bob B.")):
        assert (await env.api.get(f"/v2/identities/{who}")).json()["display_name"] == name
    assert (await env.metrics("ann"))["total_requests"] == 2


async def test_usage_shows_in_the_identitys_metrics_within_300_ms_of_the_answer(
    env: Env,
) -> None:
    async with client(env) as oai:
        for _ in range(3):
            await oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_body={"identity": {"id": "ann"}},
                extra_headers=tokens(100, 20),
            )
    answered = time.monotonic()  # nothing waited for: the write behind must come by itself
    shown = None
    while time.monotonic() - answered < 0.3:
        r = await env.api.get("/v2/identities/ann", params={"include_metrics": "true"})
        if r.json()["metrics"]["total_requests"] == 3:
            shown = time.monotonic() - answered
            break
        await asyncio.sleep(0.01)
    assert shown is not None, "usage not in the identity's metrics 300 ms after the answer"
    assert r.json()["metrics"]["input_tokens"] == 300


async def refused_unsent(env: Env, redis: Redis, extra: dict[str, Any]) -> dict[str, Any]:
    """A chat completion with `extra` in its body, refused with 400: its error, once it is
    sure that nothing went upstream and nothing was written."""
    async with client(env) as oai:
        with pytest.raises(openai.BadRequestError) as info:
            await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_body=extra)
    error = info.value.body
    assert isinstance(error, dict)
    assert len(env.mock.requests) == 0
    await env.settle()
    assert await redis.dbsize() == 0
    return error


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stream": "true"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ],
)
async def test_a_stream_the_sidecar_could_not_ask_for_usage_is_400(
    env: Env, redis: Redis, extra: dict[str, Any], param: str
) -> None:
    """A lax upstream (pydantic's coercion, LiteLLM's truth test) streams on `"stream": "true"`
    and drops options it cannot read: the stream would come without usage, its tokens and cost
    counted as none."""
    error = await refused_unsent(env, redis, {**extra, "identity": {"id": "lax"}})
    assert error["param"] == param


async def test_a_body_naming_a_cap_twice_is_400_and_goes_nowhere(env: Env, redis: Redis) -> None:
    """msgspec keeps the last of two names, a server on simdjson's on-demand API the first: one
    would keep to a cap of 100,000 tokens where the sidecar reserved one. Sent with a header
    identity, whose body the sidecar would otherwise forward as it came."""
    body = b'{"model": "gpt-4o", "messages": [], "max_tokens": 100000, "max_tokens": 1}'
    async with httpx.AsyncClient(base_url=env.url) as raw:
        r = await raw.post(
            "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json", "x-orq-identity-id": "twice"},
        )
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
        "field_repeated",
        "max_tokens",
    )
    assert len(env.mock.requests) == 0
    await env.settle()
    assert await redis.dbsize() == 0


async def test_body_over_the_limit_is_413(make_env: MakeEnv) -> None:
    env = await make_env(server={"max_body_bytes": 4096})
    async with httpx.AsyncClient(base_url=env.url) as raw:
        r = await raw.post(
            "/v1/chat/completions",
            content=b"x" * 5000,
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert len(env.mock.requests) == 0


async def test_a_known_identitys_changed_profile_is_written_once_its_answer_is_out(
    env: Env,
) -> None:
    async with client(env) as oai:
        for name in ("Ann", "Ann", "Ann B."):
            await oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_body={"identity": {"id": "ann", "display_name": name}},
            )
            await env.settle()
            record = (await env.api.get("/v2/identities/ann")).json()
            assert record["display_name"] == name
    assert (await env.metrics("ann"))["total_requests"] == 3


@pytest.mark.parametrize(
    "extra",
    [
        {"MAX_TOKENS": 100_000},  # Go's encoding/json reads it as max_tokens
        {"max_completion_tokens": 1, "Max_Completion_Tokens": 100_000},
        {"Model": "o1-pro"},
        {"\u017ftream": True},  # U+017F, a long s, folds to an s
        {"N": 128},
    ],
)
async def test_a_body_naming_what_the_sidecar_reads_in_another_case_is_400(
    env: Env, redis: Redis, extra: dict[str, Any]
) -> None:
    """An upstream that matches names regardless of case would keep to an output cap, a
    model or a number of choices the sidecar did not reserve or price."""
    error = await refused_unsent(env, redis, {**extra, "identity": {"id": "folder"}})
    assert (error["code"], error["param"]) == ("field_not_normalized", list(extra)[-1])
