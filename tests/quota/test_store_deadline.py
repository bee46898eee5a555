"""A limit check gives up on a store that does not answer after twice `[redis] timeout_ms`
(store/deadline.py), however many other requests are written to it meanwhile: a call written to
the socket is no sign that the store is alive, only a reply is."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.quota import allowances
from sidecar.store import errors
from sidecar.store.deadline import STORE
from sidecar.testing.redis_server import RedisServer
from tests.support.env import Env, MakeEnv

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
TIMEOUT_S = 0.05


def test_only_a_call_the_store_answered_tells_it_is_alive() -> None:
    before = STORE.last
    with errors.translated(replied=False):
        pass
    assert STORE.last == before
    with errors.translated():
        pass
    assert STORE.last > before


async def test_checks_fail_on_a_hung_store_while_requests_keep_coming(
    private_redis: RedisServer, private_client: Redis, make_env: MakeEnv, tmp_path: Path
) -> None:
    path = tmp_path / "policies.toml"
    path.write_text('[[policy]]\nname = "p"\nrequests = ["1000/minute"]\n')
    env: Env = await make_env(
        redis_client=private_client,
        redis={"on_error": "deny", "timeout_ms": int(TIMEOUT_S * 1000)},
        policies={"paths": [str(path)]},
    )
    async with httpx.AsyncClient(base_url=env.url, timeout=10) as client:
        assert (
            await client.post(CHAT, json=BODY, headers={"X-ORQ-IDENTITY-ID": "hung"})
        ).status_code == 200

        async def one(i: int) -> tuple[int, float]:
            await asyncio.sleep(i * 0.02)  # a request every 20 ms, each one written to Redis
            began = time.monotonic()
            r = await client.post(CHAT, json=BODY, headers={"X-ORQ-IDENTITY-ID": "hung"})
            return r.status_code, time.monotonic() - began

        private_redis.pause()
        try:
            answered = await asyncio.gather(*(one(i) for i in range(20)))
        finally:
            private_redis.resume()
    assert {status for status, _ in answered} == {503}
    # Twice the timeout (the probe's period), and the event loop's own time: not the deadline's
    # cap (1 s here), which every request written meanwhile used to extend a check to.
    slowest = max(took for _, took in answered)
    assert slowest < 2 * TIMEOUT_S + 0.25, answered


async def counts(client: Redis, part: str) -> int:
    """What the one bucket of limits `part` (e.g. 'r:60') counts, 0 when there is none."""
    keys = await client.keys(f"sidecar:rl:*:{part}:*")
    assert len(keys) <= 1, keys
    return int(await client.get(keys[0]) or 0) if keys else 0


async def total(client: Redis, part: str) -> int:
    """What the buckets of limits `part` count together (a run may cross into the next)."""
    keys = await client.keys(f"sidecar:rl:*:{part}:*")
    return sum(int(value or 0) for value in (await client.mget(keys) if keys else []))


async def until_total(client: Redis, part: str, expected: int, within_s: float = 5) -> int:
    """Waits until the buckets of `part` count at least `expected` together; what they count."""
    began = time.monotonic()
    while (found := await total(client, part)) < expected:
        assert time.monotonic() - began < within_s, f"{part}: {found}, not {expected}"
        await asyncio.sleep(0.05)
    return found


async def until_counted(client: Redis, part: str, expected: int, within_s: float = 3) -> None:
    began = time.monotonic()
    while (found := await counts(client, part)) != expected:
        assert time.monotonic() - began < within_s, f"{part}: {found}, not {expected}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("on_error", "kept"), [("deny", 0), ("allow", 1)])
async def test_a_check_redis_ran_after_the_sidecar_gave_up_counts_only_if_it_was_let_through(
    private_redis: RedisServer,
    private_client: Redis,
    make_env: MakeEnv,
    tmp_path: Path,
    on_error: str,
    kept: int,
) -> None:
    """With `deny` the request was refused (503), and a refused request consumes nothing: what
    Redis counted when it ran the check late is given back, its reservation with it. With
    `allow` it went upstream, and its count stands."""
    path = tmp_path / "policies.toml"
    path.write_text(
        '[[policy]]\nname = "p"\nrequests = ["1000/minute"]\ntokens = ["100000/hour"]\n'
    )
    env: Env = await make_env(
        redis_client=private_client,
        redis={"on_error": on_error, "timeout_ms": int(TIMEOUT_S * 1000)},
        policies={"paths": [str(path)]},
    )
    headers = {"X-ORQ-IDENTITY-ID": "late", "x-mock-input-tokens": "5", "x-mock-output-tokens": "5"}
    async with httpx.AsyncClient(base_url=env.url, timeout=10) as client:
        assert (await client.post(CHAT, json=BODY, headers=headers)).status_code == 200
        await env.settle()
        assert (await counts(private_client, "r:60"), await counts(private_client, "t:3600")) == (
            1,
            10,
        )
        private_redis.pause()
        try:
            r = await client.post(CHAT, json=BODY, headers=headers)
        finally:
            private_redis.resume()
    assert r.status_code == (503 if on_error == "deny" else 200)
    await asyncio.sleep(0.3)  # Redis runs the check it had queued, and the sidecar answers it
    await env.settle()
    await until_counted(private_client, "r:60", 1 + kept)
    if on_error == "deny":  # its reservation given back, and its record gone
        await until_counted(private_client, "t:3600", 10)
        for key in await private_client.keys("sidecar:rv:*"):
            assert await private_client.hlen(key) == 0


async def test_what_requests_let_through_unchecked_used_is_charged_once_the_store_is_back(
    private_redis: RedisServer, private_client: Redis, make_env: MakeEnv, tmp_path: Path
) -> None:
    """With `allow`, requests go upstream unchecked while the store is down; what they used
    was never charged, so once it was back the identity's token limit admitted its amount
    again on top of what went through meanwhile."""
    path = tmp_path / "policies.toml"
    path.write_text('[[policy]]\nname = "p"\ntokens = ["100000/minute"]\n')
    env: Env = await make_env(
        redis_client=private_client,
        redis={"on_error": "allow", "timeout_ms": int(TIMEOUT_S * 1000)},
        limits={"cap_output": False, "default_output_reserve": 10},
        policies={"paths": [str(path)]},
    )
    # Each reserves about 40 tokens and uses 505: what a late check reserved cannot make up for it.
    headers = {
        "X-ORQ-IDENTITY-ID": "down",
        "x-mock-input-tokens": "5",
        "x-mock-output-tokens": "500",
    }
    async with httpx.AsyncClient(base_url=env.url, timeout=10) as client:
        assert (await client.post(CHAT, json=BODY, headers=headers)).status_code == 200
        await env.settle()
        assert await total(private_client, "t:60") == 505
        private_redis.pause()
        try:
            for _ in range(8):
                r = await client.post(CHAT, json=BODY, headers=headers)
                assert r.status_code == 200, r.text
                assert "x-ratelimit-limit-tokens" not in r.headers  # not checked
        finally:
            private_redis.resume()
    found = await until_total(private_client, "t:60", 9 * 505)
    await asyncio.sleep(0.5)
    reservations = found - 9 * 505  # those of the checks Redis ran late, given back at expiry
    assert 0 <= reservations < 8 * 60  # charged once, not again by a retry
    assert await total(private_client, "t:60") == found


async def test_a_usage_report_kept_while_the_store_is_down_is_charged_once_it_is_back(
    private_redis: RedisServer, private_client: Redis, make_env: MakeEnv, tmp_path: Path
) -> None:
    """A hook report the store could not take was counted in the identity's metrics later,
    but never charged to its limits."""
    path = tmp_path / "policies.toml"
    path.write_text('[[policy]]\nname = "p"\ntokens = ["100000/minute"]\n')
    env: Env = await make_env(
        redis_client=private_client,
        redis={"timeout_ms": int(TIMEOUT_S * 1000)},
        policies={"paths": [str(path)]},
    )
    token = env.api.headers["authorization"].split(" ", 1)[1]
    body = {**BODY, "max_tokens": 20}
    async with httpx.AsyncClient(base_url=env.url, headers={"x-sidecar-token": token}) as hooks:
        auth = await hooks.post("/hooks/authorize", json=body, headers={"x-orq-identity-id": "k"})
        assert auth.status_code == 200, auth.text
        reserved = await total(private_client, "t:60")
        assert reserved > 20
        report = {
            "request_id": auth.json()["request_id"],
            "identity": "k",
            "model": "gpt-4o",
            "usage": {"prompt_tokens": 400, "completion_tokens": 600},
        }
        private_redis.pause()
        try:
            kept = await hooks.post("/hooks/usage", json=report)
            again = await hooks.post("/hooks/usage", json=report)  # retried
        finally:
            private_redis.resume()
        assert kept.status_code == 202 and kept.json()["spooled"] is True, kept.text
        assert again.status_code == 202, again.text
        # Retried once more with the store back, before or after the spool is replayed: the
        # report counts once, and its usage is charged once.
        last = await hooks.post("/hooks/usage", json=report)
        assert last.status_code == 202, last.text
    found = await until_total(private_client, "t:60", 1000)
    await asyncio.sleep(1.0)  # the spool replayed
    await env.settle()
    found = await total(private_client, "t:60")
    # Charged with its record when the spool was replayed (beside the reservation, given
    # back when it expires), or settled by the last try in place of the reservation.
    assert found in (reserved + 1000, 1000), found
    assert (await env.metrics("k"))["total_tokens"] == 1000  # counted once, too


@pytest.mark.slow  # waits out a hold
async def test_with_prefetch_what_a_refused_late_check_counted_is_given_back_too(
    private_redis: RedisServer,
    private_client: Redis,
    make_env: MakeEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy identity's checks ask for quota ahead; those Redis runs late are granted it (held,
    then given back unused) and count their own request, which is given back: in the end the
    bucket counts exactly the requests admitted."""
    monkeypatch.setattr(allowances, "HOLD_S", 0.3)
    path = tmp_path / "policies.toml"
    path.write_text('[[policy]]\nname = "p"\nrequests = ["1000/minute"]\n')
    env: Env = await make_env(
        redis_client=private_client,
        redis={"on_error": "deny", "timeout_ms": int(TIMEOUT_S * 1000)},
        limits={"prefetch": 4},
        policies={"paths": [str(path)]},
    )
    headers = {"X-ORQ-IDENTITY-ID": "busy"}
    statuses = []
    async with httpx.AsyncClient(base_url=env.url, timeout=10) as client:
        for _ in range(3):  # the second and third ask for quota ahead
            statuses.append((await client.post(CHAT, json=BODY, headers=headers)).status_code)
        private_redis.pause()
        try:
            for _ in range(12):
                r = await client.post(CHAT, json=BODY, headers=headers)
                statuses.append(r.status_code)
        finally:
            private_redis.resume()
    assert 503 in statuses
    admitted = statuses.count(200)
    assert len(env.mock.requests) == admitted
    # What is held goes back once unused (HOLD_S), what late checks counted once answered.
    await until_counted(private_client, "r:60", admitted, within_s=allowances.HOLD_S + 3)


@pytest.mark.parametrize("prefetch", [0, 4])
async def test_a_check_whose_connection_is_lost_follows_on_error(
    make_env: MakeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefetch: int
) -> None:
    """The line's connection lost while a check waits: the store is unavailable (503 with
    `deny`), never a 500."""
    path = tmp_path / "policies.toml"
    path.write_text('[[policy]]\nname = "p"\nrequests = ["1000/minute"]\n')
    env: Env = await make_env(
        redis={"on_error": "deny"}, limits={"prefetch": prefetch}, policies={"paths": [str(path)]}
    )
    calls = env.app.services.limiter._calls

    def lost(keys: list[str], args: list[object]) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        future.set_exception(RedisConnectionError("connection to Redis lost: closed"))
        return future

    monkeypatch.setattr(calls, "write", lost)
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post(CHAT, json=BODY, headers={"X-ORQ-IDENTITY-ID": "lost"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "rate_limiter_unavailable"
