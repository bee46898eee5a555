"""Request bodies a client never finishes: too large (refused with 413 as soon as that is known,
not after reading them) or too slow (cut with 408 after `[server] body_timeout_s`). Raw sockets,
so that a test knows exactly how much of the body had been sent when the answer came."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sidecar.settings import ConfigError, parse
from tests.support.env import Env, MakeEnv
from tests.support.rawhttp import Answer, RawConnection

LIMIT = 4096
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def assert_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    error: dict[str, Any] = answer.json()["error"]
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "code": code,
        "param": None,
    }
    assert error["message"]


async def nothing_written(env: Env, external_id: str) -> None:
    await env.settle()
    assert not env.mock.requests, "nothing may be forwarded"
    r = await env.api.get(f"/v2/identities/{external_id}")
    assert r.status_code == 404, "nothing may be written"


def test_the_body_timeout_is_configured_and_checked() -> None:
    assert parse({}).server.body_timeout_s == 30
    assert parse({"server": {"body_timeout_s": 0.1}}).server.body_timeout_s == 0.1
    assert parse({"server": {"body_timeout_s": 3600}}).server.body_timeout_s == 3600
    for bad in (0, 0.05, -1, 3601):
        with pytest.raises(ConfigError) as caught:
            parse({"server": {"body_timeout_s": bad}})
        assert caught.value.problems == ["server.body_timeout_s: must be between 0.1 and 3600"]


async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    make_env: MakeEnv,
) -> None:
    env = await make_env(server={"max_body_bytes": LIMIT})
    conn = await RawConnection.open(env.url)
    try:
        await conn.head("POST", CHAT, {**JSON, "content-length": str(1 << 30)})
        # Not a byte of the GiB: the answer comes from the header alone.
        answer = await conn.answer(within=5)
        assert_error(answer, 413, "payload_too_large")
        assert conn.sent == 0
        assert await conn.closed_by_server(within=5)  # the upload is not waited for
    finally:
        await conn.close()
    await nothing_written(env, "anyone")


async def test_a_declared_length_over_the_limit_is_refused_mid_body(make_env: MakeEnv) -> None:
    env = await make_env(server={"max_body_bytes": LIMIT})
    conn = await RawConnection.open(env.url)
    try:
        await conn.head("POST", CHAT, {**JSON, "content-length": str(LIMIT * 100)})
        await conn.send(b'{"identity": {"id": "big"}, "x": "' + b"x" * (2 * LIMIT))
        answer = await conn.answer(within=5)
        assert_error(answer, 413, "payload_too_large")
        assert conn.sent < LIMIT * 100
        assert await conn.closed_by_server(within=5)
    finally:
        await conn.close()
    await nothing_written(env, "big")


async def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    make_env: MakeEnv,
) -> None:
    env = await make_env(server={"max_body_bytes": LIMIT})
    conn = await RawConnection.open(env.url)
    try:
        await conn.head("POST", CHAT, {**JSON, "transfer-encoding": "chunked"})
        assert await conn.chunk(b'{"identity": {"id": "chunky"}, "x": "')
        while conn.sent < LIMIT - 512:
            assert await conn.chunk(b"x" * 256)
        # Under the limit: the sidecar waits for the rest.
        with pytest.raises(TimeoutError):
            await conn.answer(within=0.3)
        assert await conn.chunk(b"x" * 1024)  # now over it, the body still unfinished
        answer = await conn.answer(within=5)
        assert_error(answer, 413, "payload_too_large")
        assert await conn.closed_by_server(within=5)
    finally:
        await conn.close()
    await nothing_written(env, "chunky")


@pytest.mark.slow
async def test_a_stalled_body_gets_408(make_env: MakeEnv) -> None:
    env = await make_env(server={"body_timeout_s": 0.5})
    body = b'{"model": "gpt-4o", "identity": {"id": "staller"}, "messages": []}'
    conn = await RawConnection.open(env.url)
    try:
        await conn.head("POST", CHAT, {**JSON, "content-length": str(len(body))})
        await conn.send(body[:-5])  # all but the end, then nothing
        started = time.monotonic()
        answer = await conn.answer(within=5)
        elapsed = time.monotonic() - started
        assert_error(answer, 408, "request_timeout")
        assert 0.4 <= elapsed < 3, elapsed
        assert await conn.closed_by_server(within=5)
    finally:
        await conn.close()
    await nothing_written(env, "staller")


@pytest.mark.slow
async def test_a_trickled_body_is_cut_at_the_timeout_too(make_env: MakeEnv) -> None:
    # The bound is on the whole body, not between bytes: a byte every 50 ms keeps no idle
    # timer from firing, and still gets cut.
    env = await make_env(server={"body_timeout_s": 0.5})
    body = b'{"model": "gpt-4o", "identity": {"id": "trickler"}, "x": "' + b"x" * 400 + b'"}'
    conn = await RawConnection.open(env.url)

    async def trickle() -> None:
        for i in range(len(body)):
            if not await conn.send(body[i : i + 1]):
                return
            await asyncio.sleep(0.05)

    try:
        await conn.head("POST", CHAT, {**JSON, "content-length": str(len(body))})
        sender = asyncio.create_task(trickle())
        started = time.monotonic()
        answer = await conn.answer(within=5)
        elapsed = time.monotonic() - started
        sender.cancel()
        assert_error(answer, 408, "request_timeout")
        assert 0.4 <= elapsed < 3, elapsed
        assert conn.sent < len(body) // 2  # it came while the client was still sending
    finally:
        await conn.close()
    await nothing_written(env, "trickler")


async def test_a_slow_body_that_ends_in_time_is_forwarded(make_env: MakeEnv) -> None:
    env = await make_env(server={"body_timeout_s": 2})
    body = b'{"model": "gpt-4o", "identity": {"id": "patient"}, "messages": []}'
    conn = await RawConnection.open(env.url)
    try:
        await conn.head("POST", CHAT, {**JSON, "content-length": str(len(body))})
        for start in range(0, len(body), 20):
            await conn.send(body[start : start + 20])
            await asyncio.sleep(0.05)
        answer = await conn.answer(within=5)
    finally:
        await conn.close()
    assert answer.status == 200, answer
    assert len(env.mock.requests) == 1
    assert "identity" not in env.mock.requests[0].json()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "auth"),
    [
        ("/v2/identities", "authorization"),
        ("/hooks/authorize", "x-sidecar-token"),
        ("/hooks/usage", "x-sidecar-token"),
    ],
)
async def test_owned_routes_are_not_held_by_a_stalled_body(
    make_env: MakeEnv, path: str, auth: str
) -> None:
    env = await make_env(server={"body_timeout_s": 0.5})
    body = b'{"external_id": "api-staller", "identity": {"id": "api-staller"}}'
    token = env.api.headers["authorization"].removeprefix("Bearer ")
    conn = await RawConnection.open(env.url)
    try:
        await conn.head(
            "POST",
            path,
            {
                **JSON,
                auth: env.api.headers["authorization"] if auth == "authorization" else token,
                "content-length": str(len(body)),
            },
        )
        await conn.send(body[:-3])
        started = time.monotonic()
        answer = await conn.answer(within=3)
        assert_error(answer, 408, "request_timeout")
        assert 0.4 <= time.monotonic() - started < 2.5
    finally:
        await conn.close()
    await nothing_written(env, "api-staller")
