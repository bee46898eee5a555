"""Failed admin authentications (the API's bearer token, the hooks' x-sidecar-token, the
dashboard's sign-in) are limited per client address, across every sidecar sharing the store:
after `admin.failed_auth_per_minute` failures in a minute, every attempt from that address, the
right token included, is a 429 with retry-after until the minute is over. Other addresses are
not affected; the token is never logged."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from sidecar.testing.redis_server import free_port
from tests.support.auth import ADMIN_TOKEN
from tests.support.clock import FakeClock
from tests.support.env import Env, MakeEnv

LIMIT = 3
# The sidecar's peer in these tests is 127.0.0.1: trusted, so X-Forwarded-For names the client.
CONFIG: dict[str, Any] = {
    "admin": {"failed_auth_per_minute": LIMIT},
    "identity": {"trusted_networks": ["127.0.0.1/32"]},
}
ALICE = "203.0.113.7"
MALLORY = "198.51.100.66"
WRONG = "wrong-token-0123456789"


def bearer(token: str, client: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "x-forwarded-for": client}


def hook(token: str, client: str) -> dict[str, str]:
    return {"x-sidecar-token": token, "x-forwarded-for": client}


async def api_get(env: Env, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=env.url) as client:
        return await client.get("/v2/identities", headers=headers)


async def authorize(env: Env, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=env.url) as client:
        return await client.post("/hooks/authorize", json={"model": "m"}, headers=headers)


async def report(env: Env, headers: dict[str, str]) -> httpx.Response:
    fields = {"request_id": "r1", "identity": "someone"}
    async with httpx.AsyncClient(base_url=env.url) as client:
        return await client.post("/hooks/usage", json=fields, headers=headers)


async def login(env: Env, token: str, client: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=env.url) as browser:
        return await browser.post(
            "/ui/login", data={"token": token}, headers={"x-forwarded-for": client}
        )


def assert_throttled(r: httpx.Response, retry_after: int = 60) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == str(retry_after)
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "too_many_failed_authentications")


async def test_api_bearer_failures_block_the_address_until_the_minute_passes(
    make_env: MakeEnv, clock: FakeClock
) -> None:
    env = await make_env(**CONFIG)
    for _ in range(LIMIT):
        r = await api_get(env, bearer(WRONG, MALLORY))
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        clock.advance(1)
    # Blocked: the right token too (a right guess must not be told apart from a wrong one).
    assert_throttled(await api_get(env, bearer(ADMIN_TOKEN, MALLORY)), 60 - LIMIT)
    assert_throttled(await api_get(env, bearer(WRONG, MALLORY)), 60 - LIMIT)
    clock.advance(30)
    assert_throttled(await api_get(env, bearer(ADMIN_TOKEN, MALLORY)), 60 - LIMIT - 30)
    # Another address is not affected, before or after.
    assert (await api_get(env, bearer(ADMIN_TOKEN, ALICE))).status_code == 200
    clock.advance(60 - LIMIT - 30)  # the minute that began with the first failure is over
    assert (await api_get(env, bearer(ADMIN_TOKEN, MALLORY))).status_code == 200
    assert (await api_get(env, bearer(WRONG, MALLORY))).status_code == 401


@pytest.mark.slow
async def test_a_request_without_a_token_is_not_a_failure(make_env: MakeEnv) -> None:
    env = await make_env(**CONFIG)
    no_token: tuple[dict[str, str], ...] = (
        {},
        {"authorization": "Basic dGVzdA=="},
        {"authorization": "Bearer"},
    )
    for headers in no_token:
        for _ in range(LIMIT + 1):
            r = await api_get(env, {**headers, "x-forwarded-for": ALICE})
            assert r.status_code == 401
    assert (await api_get(env, bearer(ADMIN_TOKEN, ALICE))).status_code == 200
    # Nor, blocked, is it refused as an attempt: it is still just unauthenticated.
    for _ in range(LIMIT):
        await api_get(env, bearer(WRONG, MALLORY))
    assert_throttled(await api_get(env, bearer(ADMIN_TOKEN, MALLORY)))
    for headers in no_token:
        r = await api_get(env, {**headers, "x-forwarded-for": MALLORY})
        assert r.status_code == 401


async def test_hook_and_api_failures_add_up_and_block_every_route(make_env: MakeEnv) -> None:
    env = await make_env(**CONFIG)
    assert (await authorize(env, hook(WRONG, MALLORY))).status_code == 401  # raw ASGI route
    assert (await report(env, hook(WRONG, MALLORY))).status_code == 401  # Litestar route
    assert (await api_get(env, bearer(WRONG, MALLORY))).status_code == 401
    assert_throttled(await authorize(env, hook(ADMIN_TOKEN, MALLORY)))
    assert_throttled(await report(env, hook(ADMIN_TOKEN, MALLORY)))
    assert_throttled(await api_get(env, bearer(ADMIN_TOKEN, MALLORY)))
    assert (await login(env, ADMIN_TOKEN, MALLORY)).status_code == 429
    r = await authorize(env, hook(ADMIN_TOKEN, ALICE))
    assert r.status_code == 200, r.text


@pytest.mark.slow
async def test_the_dashboard_sign_in_is_limited(make_env: MakeEnv) -> None:
    env = await make_env(**CONFIG)
    for _ in range(LIMIT):
        r = await login(env, WRONG, MALLORY)
        assert r.status_code == 401 and "That is not the admin token." in r.text
    r = await login(env, ADMIN_TOKEN, MALLORY)
    assert r.status_code == 429 and r.headers["retry-after"] == "60"
    assert "too many failed authentications" in r.text
    assert "set-cookie" not in r.headers
    # The admin token as a bearer header on a page is the same sign-in.
    async with httpx.AsyncClient(base_url=env.url) as browser:
        page = await browser.get("/ui", headers=bearer(ADMIN_TOKEN, MALLORY))
        assert page.status_code == 429 and page.headers["retry-after"] == "60"
        r = await browser.post("/ui/login", data={"token": ADMIN_TOKEN, "next": "/ui"})
        assert r.status_code == 303  # 127.0.0.1 itself is another address
        assert (await browser.get("/ui")).status_code == 200


async def test_wrong_bearer_headers_on_dashboard_pages_count(make_env: MakeEnv) -> None:
    env = await make_env(**CONFIG)
    async with httpx.AsyncClient(base_url=env.url) as browser:
        for _ in range(LIMIT):
            r = await browser.get("/ui", headers=bearer(WRONG, MALLORY))
            assert r.status_code == 303  # not signed in: to the sign-in form
    assert (await login(env, ADMIN_TOKEN, MALLORY)).status_code == 429


@pytest.mark.slow
async def test_a_success_does_not_reset_another_address(make_env: MakeEnv) -> None:
    env = await make_env(**CONFIG)
    for _ in range(LIMIT - 1):
        assert (await api_get(env, bearer(WRONG, MALLORY))).status_code == 401
    for _ in range(5):
        assert (await api_get(env, bearer(ADMIN_TOKEN, ALICE))).status_code == 200
    assert (await api_get(env, bearer(WRONG, MALLORY))).status_code == 401  # the LIMIT-th
    assert_throttled(await api_get(env, bearer(ADMIN_TOKEN, MALLORY)))
    # Alice's own failures are hers alone.
    assert (await api_get(env, bearer(WRONG, ALICE))).status_code == 401
    assert (await api_get(env, bearer(ADMIN_TOKEN, ALICE))).status_code == 200


async def test_failures_count_across_sidecars_sharing_the_store(make_env: MakeEnv) -> None:
    first = await make_env(**CONFIG)
    second = await make_env(**CONFIG)
    assert (await api_get(first, bearer(WRONG, MALLORY))).status_code == 401
    assert (await authorize(second, hook(WRONG, MALLORY))).status_code == 401
    assert (await api_get(first, bearer(WRONG, MALLORY))).status_code == 401
    # The second sidecar saw one failure of three: it asks the store.
    assert_throttled(await api_get(second, bearer(ADMIN_TOKEN, MALLORY)))
    assert_throttled(await authorize(second, hook(WRONG, MALLORY)))
    assert_throttled(await authorize(first, hook(ADMIN_TOKEN, MALLORY)))


async def test_a_blocked_address_costs_no_store_round_trip(make_env: MakeEnv, redis: Redis) -> None:
    env = await make_env(**CONFIG)
    for _ in range(LIMIT):
        await api_get(env, bearer(WRONG, MALLORY))
    await redis.config_resetstat()
    async with httpx.AsyncClient(base_url=env.url) as client:
        for _ in range(20):
            r = await client.get("/v2/identities", headers=bearer(ADMIN_TOKEN, MALLORY))
            assert r.status_code == 429
            r = await client.post("/hooks/authorize", json={}, headers=hook(WRONG, MALLORY))
            assert r.status_code == 429
    stats = await redis.info("commandstats")
    assert not {"cmdstat_hmget", "cmdstat_evalsha", "cmdstat_eval"} & set(stats), stats


async def test_a_store_that_is_down_falls_back_to_counting_in_the_process(
    make_env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        env = await make_env(redis_client=dead, **CONFIG)
        caplog.set_level(logging.INFO, logger="sidecar.auth")
        assert (await authorize(env, hook(ADMIN_TOKEN, MALLORY))).status_code == 200
        for _ in range(LIMIT):
            assert (await authorize(env, hook(WRONG, MALLORY))).status_code == 401
        assert_throttled(await authorize(env, hook(ADMIN_TOKEN, MALLORY)))
        assert_throttled(await report(env, hook(ADMIN_TOKEN, MALLORY)))
        assert (await authorize(env, hook(ADMIN_TOKEN, ALICE))).status_code == 200
    finally:
        await dead.aclose()
    said = [r.getMessage() for r in caplog.records if "counted by this process" in r.getMessage()]
    assert len(said) == 1, said  # once, not per attempt


async def test_the_token_is_never_logged(
    make_env: MakeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    guess = "zQ9-guessed-Tok3n-7f3a9c1e5b2d"
    env = await make_env(**{**CONFIG, "admin": {"failed_auth_per_minute": 100}})
    caplog.set_level(logging.DEBUG)
    await api_get(env, bearer(guess, MALLORY))
    await authorize(env, hook(guess, MALLORY))
    await report(env, hook(guess, MALLORY))
    await login(env, guess, MALLORY)
    async with httpx.AsyncClient(base_url=env.url) as browser:
        await browser.get("/ui", headers=bearer(guess, MALLORY))
    failures = [r for r in caplog.records if "failed admin authentication" in r.getMessage()]
    assert len(failures) == 5, [r.getMessage() for r in caplog.records]
    assert all(MALLORY in r.getMessage() for r in failures)
    pieces = [guess, guess[:8], guess[-8:], "guessed-Tok3n"]
    for record in caplog.records:
        text = " ".join(
            [record.getMessage(), repr(record.args), str(record.__dict__), record.exc_text or ""]
        )
        for piece in pieces:
            assert piece not in text, (piece, text)
