"""`[limits] prefetch`: quota a process holds ahead per limit (allowances), admitted from with no
Redis exchange (docs/policies.md, "Prefetch"). It never admits more than a limit, what requests
use is counted exactly once, and what a process holds goes back to its buckets. Allowances are
asked for only by an identity that is busy: the first request in a while asks for none, the
next one (within allowances.HOLD_S) does."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from sidecar import cli
from sidecar.errors import StoreUnavailable
from sidecar.quota import allowances
from sidecar.quota.limiter import SWEEP_S, Limiter
from sidecar.settings import ConfigError, load
from sidecar.testing.redis_server import RedisServer
from tests.support.auth import ADMIN_TOKEN
from tests.support.env import Env, MakeEnv
from tests.support.limits import BODY, burst, limit_usage, policy_file
from tests.support.prometheus import parse
from tests.support.traffic import tokens

PREFETCH = {"limits": {"prefetch": 32}}
HOOK = {"x-sidecar-token": ADMIN_TOKEN}
# Sent as these bytes, so what a request reserves is known: its bytes / 3 + 16 tokens of
# input, and its max_tokens of output (sidecar/usage/estimate.py).
CONTENT = json.dumps({**BODY, "max_tokens": 50}, separators=(",", ":")).encode()
RESERVED = len(CONTENT) // 3 + 16 + 50
USED = 20 + 10  # what the mock reports with tokens(20, 10): output under max_tokens
# Held units go back when neither used nor topped up for HOLD_S, looked over every SWEEP_S.
HOLD_S = allowances.HOLD_S
MAX_HOLD_S = allowances.MAX_HOLD_S
GIVEN_BACK_S = HOLD_S + SWEEP_S


def hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is given back for being idle or old (however slow this machine runs the
    traffic that should find the allowances), until `release`."""
    monkeypatch.setattr(allowances, "HOLD_S", 60.0)
    monkeypatch.setattr(allowances, "MAX_HOLD_S", 60.0)


def release(monkeypatch: pytest.MonkeyPatch) -> float:
    """Allowances unused for HOLD_S are given back again; when that began."""
    monkeypatch.setattr(allowances, "HOLD_S", HOLD_S)
    monkeypatch.setattr(allowances, "MAX_HOLD_S", MAX_HOLD_S)
    return time.monotonic()


def policy(tmp_path: Path, limits: str) -> dict[str, Any]:
    return policy_file(tmp_path, '[[policy]]\nname = "p"\n' + limits)


async def bucket(redis: Redis, part: str) -> int:
    """The count in the one bucket of limits `part` (e.g. 'r:60', 't:3600'); the clock is
    fixed, so a window has one bucket."""
    keys = await redis.keys(f"sidecar:rl:*:{part}:*")
    assert len(keys) == 1, keys
    return int(await redis.get(keys[0]) or 0)


async def until(redis: Redis, part: str, expected: int, within_s: float) -> float:
    """Poll bucket `part` until it counts `expected`; how long that took."""
    began = time.monotonic()
    while True:
        count = await bucket(redis, part)
        waited = time.monotonic() - began
        if count == expected:
            return waited
        assert waited < within_s, f"{part} counts {count}, not {expected}, after {waited:.2f} s"
        await asyncio.sleep(0.02)


async def ahead(url: str) -> float:
    """sidecar_limit_checks_ahead_total, from /metrics."""
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    return parse(r.text)["sidecar_limit_checks_ahead_total"]


async def chat(client: httpx.AsyncClient, who: str) -> httpx.Response:
    """A chat completion reserving RESERVED tokens and using USED."""
    return await client.post(
        "/v1/chat/completions",
        content=CONTENT,
        headers={"Content-Type": "application/json", "X-ORQ-IDENTITY-ID": who, **tokens(20, 10)},
    )


async def used(env: Env, who: str) -> float:
    """The dashboard's reading of `who`'s one limit (Limiter.usage)."""
    (limit,) = (await limit_usage(env, who)).limits
    return limit.used


def checks(limiter: Limiter, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the admit.lua calls `limiter` sends from now on (one entry each): every one is
    written on the hot line (`Coalescer.write`), waited for or not."""
    sent: list[int] = []
    write = limiter._calls.write

    def written(keys: list[str], args: list[Any]) -> Any:
        future = write(keys, args)
        if future is not None:
            sent.append(1)
        return future

    monkeypatch.setattr(limiter._calls, "write", written)
    return sent


async def authorize(env: Env, who: str) -> httpx.Response:
    """Hook mode's authorization of a chat completion reserving RESERVED tokens."""
    return await env.api.post(
        "/hooks/authorize",
        content=CONTENT,
        headers={**HOOK, "Content-Type": "application/json", "X-ORQ-IDENTITY-ID": who},
    )


def remaining_tokens(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text
    return int(r.headers["x-ratelimit-remaining-tokens"])


# -- one sidecar ---------------------------------------------------------------------------


async def test_80_concurrent_against_20_per_minute_admit_exactly_20(
    make_env: MakeEnv, tmp_path: Path, redis: Redis
) -> None:
    env = await make_env(**PREFETCH, **policy(tmp_path, 'requests = ["20/minute"]\n'))
    assert await burst(env.url, 80, "burst") == {200: 20, 429: 60}
    assert len(env.mock.requests) == 20
    # Whatever was held ahead was spent by the requests Redis refused: nothing left over.
    assert await bucket(redis, "r:60") == 20
    assert (await burst(env.url, 5, "burst")) == {429: 5}


async def test_requests_are_admitted_with_no_exchange_while_allowances_last(
    make_env: MakeEnv, tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(monkeypatch)
    limits = 'requests = ["1000/minute"]\ntokens = ["1000000/hour"]\ncost_usd = ["1000/day"]\n'
    config = policy(tmp_path, limits)
    stats = {}
    for prefetch in (0, 32):
        env: Env = await make_env(limits={"prefetch": prefetch}, **config)
        limiter = env.app.services.limiter
        sent = checks(limiter, monkeypatch)
        recorder = env.app.services.recorder
        async with httpx.AsyncClient(base_url=env.url) as client:
            assert (await chat(client, f"steady-{prefetch}")).status_code == 200  # identified
            await env.settle()
            with pytest.MonkeyPatch.context() as later:
                # Usage is written when the traffic is over: only the limits' scripts run.
                later.setattr(recorder, "_start", lambda: None)
                await redis.config_resetstat()
                for _ in range(39):
                    assert (await chat(client, f"steady-{prefetch}")).status_code == 200
                stats[prefetch] = (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
        recorder._start()
        await env.settle()
        if prefetch:
            # The first asks for nothing; the second's exchange grants 32 requests' worth per
            # limit; the 35th request finds the requests limit's allowance spent (its token and
            # cost ones pay for it) and is granted 32 more.
            assert len(sent) == 3
            assert limiter.ahead == 37 and await ahead(env.url) == 37
        else:
            assert len(sent) == 40
            assert limiter.ahead == 0 and await ahead(env.url) == 0
        assert len(env.mock.requests) == 40
    # After the first: per request without prefetch, an admit.lua and a settle.lua call; with
    # it, the second's and the 35th's admit.lua only (granted allowances, they too are settled
    # in the process), the rest admitted and settled in the process.
    assert stats == {0: 2 * 39, 32: 2}


def test_only_a_busy_identity_asks_for_allowances() -> None:
    now = [100.0]
    ahead = allowances.Allowances(32, clock=lambda: now[0])
    assert not ahead.wanted("a")  # the first request in a while
    now[0] += HOLD_S / 2
    assert ahead.wanted("a")
    assert not ahead.wanted("b")
    now[0] += HOLD_S + 0.01
    assert not ahead.wanted("a")  # back after a pause: as lone as the first
    now[0] += HOLD_S + 0.01
    assert ahead.due(0) == []
    assert ahead.asked == {}  # identities not admitted for HOLD_S are forgotten


async def test_an_identity_busy_on_its_allowances_asks_for_more_at_its_next_exchange(
    make_env: MakeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its allowance runs out more than HOLD_S after its last exchange, its requests all
    # admitted from it meanwhile: it is busy, so its next exchange asks for more, and the
    # requests after it are admitted in the process (were it lone, the next would go to Redis
    # too).
    monkeypatch.setattr(allowances, "HOLD_S", 0.3)
    monkeypatch.setattr(allowances, "MAX_HOLD_S", 60.0)
    env = await make_env(**PREFETCH, **policy(tmp_path, 'requests = ["1000/minute"]\n'))
    limiter = env.app.services.limiter
    async with httpx.AsyncClient(base_url=env.url) as client:
        sent = checks(limiter, monkeypatch)
        for _ in range(2):  # the first asks for nothing, the second is granted 32
            assert (await chat(client, "busy")).status_code == 200
        assert len(sent) == 2
        granted = time.monotonic()
        for _ in range(32):  # spent, over more than HOLD_S
            await asyncio.sleep(0.4 / 32)
            assert (await chat(client, "busy")).status_code == 200
        assert len(sent) == 2 and time.monotonic() - granted > 0.3
        for _ in range(3):  # one exchange, granted 32 more
            assert (await chat(client, "busy")).status_code == 200
    assert len(sent) == 3
    assert limiter.ahead == 32 + 2


async def test_an_identity_that_calls_now_and_then_holds_nothing(
    make_env: MakeEnv, tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(allowances, "HOLD_S", 0.3)
    env = await make_env(**PREFETCH, **policy(tmp_path, 'requests = ["1000/minute"]\n'))
    limiter = env.app.services.limiter
    assert limiter.allowances is not None
    for n in (1, 2):
        if n > 1:
            await asyncio.sleep(0.3 + SWEEP_S)
        assert await burst(env.url, 1, "sparse") == {200: 1}
        # Counted alone: nothing held ahead, so nothing to give back.
        assert await bucket(redis, "r:60") == n
        assert limiter.allowances.held == {}
    assert await burst(env.url, 1, "sparse") == {200: 1}  # back at once: busy
    assert await bucket(redis, "r:60") == 3 + 32
    assert limiter.ahead == 0


@pytest.mark.slow
async def test_token_limits_settle_exactly_against_allowances(
    make_env: MakeEnv, tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(monkeypatch)
    env = await make_env(**PREFETCH, **policy(tmp_path, 'tokens = ["100000/hour"]\n'))
    services = env.app.services
    async with httpx.AsyncClient(base_url=env.url) as client:
        first = await chat(client, "exact")
        # What this process holds ahead is not shown as used: only the request's reservation.
        assert remaining_tokens(first) == 100_000 - RESERVED
        for _ in range(9):
            assert (await chat(client, "exact")).status_code == 200
        assert services.limiter.ahead == 8
        # What the first used (settled at Redis: it asked for no allowance), the second's
        # reservation and 32 more held ahead: what the other nine used is spent, and their
        # surplus returned, inside the process; the bucket is as it was granted.
        held = await bucket(redis, "t:3600")
        assert held == USED + 33 * RESERVED
        # The dashboard's reading leaves out what this process holds.
        assert await used(env, "exact") == 10 * USED
        release(monkeypatch)
        await until(redis, "t:3600", 10 * USED, GIVEN_BACK_S + 0.5)
        # A later request (at Redis: nothing is held now) sees exactly what was used.
        later = await chat(client, "exact")
        assert remaining_tokens(later) == 100_000 - 10 * USED - RESERVED
    await until(redis, "t:3600", 11 * USED, GIVEN_BACK_S + 0.5)


async def test_headers_of_requests_admitted_ahead_count_what_was_used(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(**PREFETCH, **policy(tmp_path, 'tokens = ["100000/hour"]\n'))
    shown = []
    async with httpx.AsyncClient(base_url=env.url) as client:
        for _ in range(4):
            shown.append(remaining_tokens(await chat(client, "shown")))
    assert env.app.services.limiter.ahead == 2  # the first two at Redis
    # Each response: what the earlier ones used, and its own reservation.
    assert shown == [100_000 - n * USED - RESERVED for n in range(4)]


async def test_headers_of_authorizations_admitted_ahead_count_their_reservations(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(**PREFETCH, **policy(tmp_path, 'tokens = ["100000/hour"]\n'))
    shown = []
    for _ in range(4):
        shown.append(remaining_tokens(await authorize(env, "hooked")))
    assert env.app.services.limiter.ahead == 2  # the first two at Redis
    # Nothing reported yet: each reservation counts, its own included.
    assert shown == [100_000 - n * RESERVED for n in range(1, 5)]


@pytest.mark.slow
async def test_held_units_are_given_back_within_the_hold(
    make_env: MakeEnv, tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(monkeypatch)
    env = await make_env(**PREFETCH, **policy(tmp_path, 'requests = ["1000/minute"]\n'))
    limiter = env.app.services.limiter
    assert limiter.allowances is not None
    async with httpx.AsyncClient(base_url=env.url) as client:
        for n in range(5):
            r = await client.post(
                "/v1/chat/completions", json=BODY, headers={"X-ORQ-IDENTITY-ID": "holder"}
            )
            assert r.status_code == 200
            # Held units are not shown as used.
            assert int(r.headers["x-ratelimit-remaining-requests"]) == 1000 - n - 1
    assert limiter.ahead == 3
    (touched,) = (allowance.touched for allowance in limiter.allowances.held.values())
    assert await bucket(redis, "r:60") == 2 + 32  # two requests' own counts and 32 held
    released = release(monkeypatch)
    await until(redis, "r:60", 5, GIVEN_BACK_S + 0.5)
    back = time.monotonic()
    # Not used since the last request: given back HOLD_S after it, at the next sweep.
    assert touched + HOLD_S <= back
    assert back <= max(touched + HOLD_S, released) + SWEEP_S + 0.25
    assert limiter.allowances.held == {}
    await asyncio.sleep(2 * SWEEP_S)  # and nothing more is given back
    assert await bucket(redis, "r:60") == 5


async def test_a_refused_request_gives_back_what_its_limits_hold(
    make_env: MakeEnv, tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(monkeypatch)  # only the refusal gives anything back
    limits = 'requests = ["1000/minute"]\ntokens = ["1000/hour"]\n'
    env = await make_env(**PREFETCH, **policy(tmp_path, limits))
    limiter = env.app.services.limiter
    async with httpx.AsyncClient(base_url=env.url) as client:
        assert (await chat(client, "refused")).status_code == 200  # asks for no allowance
        assert (await chat(client, "refused")).status_code == 200  # granted allowances
        assert (await chat(client, "refused")).status_code == 200  # from the allowances
        assert limiter.ahead == 1
        # Granted with the second: 32 requests, and an eighth of the tokens left.
        assert await bucket(redis, "r:60") == 2 + 32
        granted = (1000 - USED - RESERVED) // 8
        assert await bucket(redis, "t:3600") == USED + RESERVED + granted
        # Another sidecar uses the tokens. Each request here takes its reservation from the
        # token allowance and returns its surplus: 109 + 63 held after the second, then 63 less
        # per request, so the fourth and fifth are paid from it and the sixth goes to Redis,
        # which refuses it.
        assert (granted, RESERVED - USED) == (109, 63)
        (key,) = await redis.keys("sidecar:rl:*:t:3600:*")
        await redis.incrby(key, 1000)
        assert (await chat(client, "refused")).status_code == 200
        assert (await chat(client, "refused")).status_code == 200
        assert limiter.ahead == 3
        refused = await chat(client, "refused")
    assert refused.status_code == 429 and refused.json()["error"]["dimension"] == "tokens"
    assert limiter.ahead == 3
    # What its limits held went back at once: the requests one's unit it took included.
    await until(redis, "r:60", 5, 0.5)
    assert await bucket(redis, "t:3600") == 5 * USED + 1000
    assert limiter.allowances is not None and limiter.allowances.held == {}


async def test_near_a_limits_edge_nothing_is_held(
    make_env: MakeEnv, tmp_path: Path, redis: Redis
) -> None:
    # An eighth of the tokens left is less than one request reserves: no allowance for the
    # token limit, so none for the requests limit either (all or none).
    limits = 'requests = ["1000/minute"]\ntokens = ["500/hour"]\n'
    env = await make_env(**PREFETCH, **policy(tmp_path, limits))
    assert (500 - RESERVED) // 8 < RESERVED
    async with httpx.AsyncClient(base_url=env.url) as client:
        for n in range(1, 4):
            assert (await chat(client, "edge")).status_code == 200
            await env.settle()
            assert await bucket(redis, "r:60") == n
            assert await bucket(redis, "t:3600") == n * USED
    limiter = env.app.services.limiter
    assert limiter.ahead == 0
    assert limiter.allowances is not None and limiter.allowances.held == {}


async def test_a_concurrency_limit_takes_a_slot_per_request_so_nothing_is_held(
    make_env: MakeEnv, tmp_path: Path, redis: Redis
) -> None:
    limits = 'requests = ["1000/minute"]\nconcurrency = 10\n'
    env = await make_env(**PREFETCH, **policy(tmp_path, limits))
    for n in range(1, 4):
        assert await burst(env.url, 1, "slots") == {200: 1}
        assert await bucket(redis, "r:60") == n
    limiter = env.app.services.limiter
    assert limiter.ahead == 0
    assert limiter.allowances is not None and limiter.allowances.held == {}


# -- two sidecars on one Redis -------------------------------------------------------------


async def two_sidecars(make_env: MakeEnv, config: dict[str, Any]) -> tuple[Env, Env]:
    """Two sidecars with prefetch on the one test Redis, under the same config."""
    return await make_env(**PREFETCH, **config), await make_env(**PREFETCH, **config)


@pytest.mark.slow
async def test_two_sidecars_never_admit_more_than_the_limit_together(
    make_env: MakeEnv, tmp_path: Path, redis: Redis
) -> None:
    config = policy(tmp_path, 'requests = ["30/minute"]\n')
    first, second = await two_sidecars(make_env, config)
    results = await asyncio.gather(
        burst(first.url, 20, "shared"),
        burst(second.url, 20, "shared"),
        burst(first.url, 20, "shared"),
    )
    admitted = sum(result[200] for result in results)
    assert sum(results, Counter[int]()) == {200: admitted, 429: 60 - admitted}
    assert 0 < admitted <= 30
    assert len(first.mock.requests) + len(second.mock.requests) == admitted
    # Once what each holds is given back, a burst admits the rest, exactly.
    await until(redis, "r:60", admitted, GIVEN_BACK_S + 0.5)
    final = await burst(second.url, 40, "shared")
    assert (final[200], final[429]) == (30 - admitted, 10 + admitted)
    assert await bucket(redis, "r:60") == 30
    assert await burst(first.url, 5, "shared") == {429: 5}
    assert len(first.mock.requests) + len(second.mock.requests) == 30


@pytest.mark.slow
async def test_units_one_sidecar_holds_refuse_the_other_until_given_back(
    make_env: MakeEnv, tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(monkeypatch)
    config = policy(tmp_path, 'requests = ["30/minute"]\n')
    first, second = await two_sidecars(make_env, config)
    assert await burst(first.url, 1, "split") == {200: 1}  # asks for no allowance
    assert await burst(first.url, 1, "split") == {200: 1}
    assert await bucket(redis, "r:60") == 2 + 28 // 8  # the first holds an eighth of what is left
    # The other admits up to what the first holds ...
    assert await burst(second.url, 40, "split") == {200: 25, 429: 15}
    assert await bucket(redis, "r:60") == 30
    # ... which goes back when the first has not used it for a while.
    release(monkeypatch)
    await until(redis, "r:60", 27, GIVEN_BACK_S + 0.5)
    assert await burst(second.url, 10, "split") == {200: 3, 429: 7}
    assert await bucket(redis, "r:60") == 30
    assert len(first.mock.requests) + len(second.mock.requests) == 30


@pytest.mark.slow
async def test_hook_mode_reservations_taken_ahead_settle_on_any_sidecar(
    make_env: MakeEnv, tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(monkeypatch)
    config = policy(tmp_path, 'tokens = ["100000/hour"]\n')
    first, second = await two_sidecars(make_env, config)
    ids = []
    for _ in range(6):
        r = await authorize(first, "hooked")
        assert r.status_code == 200, r.text
        ids.append(r.json()["request_id"])
    assert first.app.services.limiter.ahead == 4  # the first two at Redis, the second granted
    reported = [25, 26, 27, 28, 29, 200]  # the last used more than it reserved
    for n, (request_id, total) in enumerate(zip(ids, reported, strict=True)):
        env = first if n % 2 == 0 else second
        report = {
            "request_id": request_id,
            "identity": "hooked",
            "model": "gpt-4o",
            "usage": {"prompt_tokens": 5, "completion_tokens": total - 5, "total_tokens": total},
        }
        r = await env.api.post("/hooks/usage", json=report, headers=HOOK)
        assert r.status_code == 202, r.text
        assert r.json()["counted"] is True
    await first.settle()
    await second.settle()
    # While held: the reservations replaced by what was reported, and the rest still held.
    assert await bucket(redis, "t:3600") == 32 * RESERVED - 4 * RESERVED + sum(reported)
    release(monkeypatch)
    await until(redis, "t:3600", sum(reported), GIVEN_BACK_S + 0.5)
    assert await redis.keys("sidecar:rv:*") == []  # every reservation settled


# -- Redis not answering -------------------------------------------------------------------


async def paused(
    server: RedisServer,
    client: Redis,
    make_env: MakeEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Env, list[int], int]:
    """Two requests admitted (the second granted an eighth of what is left), then Redis paused
    and 20 more sent: (the sidecar, their statuses, the limit checks it sent Redis meanwhile)."""
    env: Env = await make_env(
        redis_client=client,
        redis={"on_error": "deny", "timeout_ms": 50},
        **PREFETCH,
        **policy(tmp_path, 'requests = ["100/minute"]\n'),
    )
    assert await burst(env.url, 1, "steady") == {200: 1}  # asks for no allowance
    assert await burst(env.url, 1, "steady") == {200: 1}
    limiter = env.app.services.limiter
    assert limiter.allowances is not None
    assert [a.left for a in limiter.allowances.held.values()] == [98 // 8]
    sent = checks(limiter, monkeypatch)
    server.pause()
    try:
        statuses = []
        async with httpx.AsyncClient(base_url=env.url) as http:
            for _ in range(20):
                r = await http.post(
                    "/v1/chat/completions", json=BODY, headers={"X-ORQ-IDENTITY-ID": "steady"}
                )
                statuses.append(r.status_code)
    finally:
        server.resume()
    return env, statuses, len(sent)


@pytest.mark.slow
async def test_redis_paused_admits_what_is_held_then_follows_on_error(
    private_redis: RedisServer,
    private_client: Redis,
    make_env: MakeEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hold(monkeypatch)  # what is held stays held while paused
    env, statuses, sent = await paused(
        private_redis, private_client, make_env, tmp_path, monkeypatch
    )
    held = 98 // 8
    assert statuses == [200] * held + [503] * (20 - held)
    limiter = env.app.services.limiter
    assert limiter.ahead == held
    # The checks that went to Redis timed out, until the breaker opened.
    assert limiter.errors == sent and 1 <= sent <= 20 - held
    assert len(env.mock.requests) == 2 + held


@pytest.mark.slow
async def test_checks_redis_answers_late_leave_no_allowance_counted(
    private_redis: RedisServer,
    private_client: Redis,
    make_env: MakeEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, statuses, sent = await paused(private_redis, private_client, make_env, tmp_path, monkeypatch)
    assert statuses.count(200) == 98 // 8 and sent >= 1
    await asyncio.sleep(GIVEN_BACK_S + SWEEP_S)
    # Every unit held was spent; the checks Redis ran late were of requests refused 503
    # (on_error = "deny"): what they counted is given back, as without prefetch.
    assert await bucket(private_client, "r:60") == 2 + 98 // 8


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 10001])
def test_prefetch_out_of_range_is_a_config_error(
    tmp_path: Path, value: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)
    path = tmp_path / "config.toml"
    path.write_text(f"[limits]\nprefetch = {value}\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), env={})
    assert info.value.problems == [f"{path}: limits.prefetch: must be 0-10000"]
    args = cli.build_parser().parse_args(["check-config", "--config", str(path)])
    with pytest.raises(SystemExit) as exited:
        args.run(args)
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"{path}: limits.prefetch: must be 0-10000\n"


@pytest.mark.parametrize("value", [0, 10000])
def test_prefetch_at_its_bounds_is_valid(tmp_path: Path, value: int) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[limits]\nprefetch = {value}\n")
    assert load(str(path), env={}).limits.prefetch == value


# -- budget resets -------------------------------------------------------------------------


async def token_budget(env: Env, who: str, token_limit: int) -> str:
    body = {"scope": {"kind": "identity", "target": who}, "token_limit": token_limit}
    r = await env.api.post("/v2/budgets", json={**body, "period": "one_time"})
    assert r.status_code == 201, r.text
    budget_id: str = r.json()["_id"]
    return budget_id


async def budget_tokens(env: Env, budget_id: str) -> int:
    r = await env.api.get(f"/v2/budgets/{budget_id}")
    assert r.status_code == 200, r.text
    tokens_used: int = r.json()["consumption"]["tokens"]
    return tokens_used


@pytest.mark.slow
async def test_a_budget_reset_ends_what_allowances_held_before_it(
    make_env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held units were counted in the buckets the reset empties: none of them is spent after
    it (a request they paid for would count nowhere), nor given back (that would take off
    what requests after the reset were counted)."""
    hold(monkeypatch)
    env = await make_env(**PREFETCH)
    limiter = env.app.services.limiter
    assert limiter.allowances is not None
    budget_id = await token_budget(env, "reset", 100_000)
    async with httpx.AsyncClient(base_url=env.url) as client:
        for _ in range(6):
            assert (await chat(client, "reset")).status_code == 200
        assert limiter.ahead == 4 and limiter.allowances.held  # held ahead
        r = await env.api.post(f"/v2/budgets/{budget_id}/reset")
        assert r.status_code == 200 and r.json()["consumption"]["tokens"] == 0
        assert not limiter.allowances.held  # what was held ended with the reset
        for _ in range(6):
            assert (await chat(client, "reset")).status_code == 200
    await env.settle()
    release(monkeypatch)
    await asyncio.sleep(GIVEN_BACK_S + 0.3)  # what is held since the reset goes back
    assert not limiter.allowances.held
    assert await budget_tokens(env, budget_id) == 6 * USED  # what came after the reset


@pytest.mark.slow
async def test_a_budget_reset_ends_what_another_sidecar_held_before_it(
    make_env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(monkeypatch)
    first, second = await make_env(**PREFETCH), await make_env(**PREFETCH)
    held = second.app.services.limiter.allowances
    assert held is not None
    budget_id = await token_budget(first, "shared", 100_000)
    await second.app.services.budgets.refresh()
    async with httpx.AsyncClient(base_url=second.url) as client:
        for _ in range(3):
            assert (await chat(client, "shared")).status_code == 200
    assert held.held
    assert (await first.api.post(f"/v2/budgets/{budget_id}/reset")).status_code == 200
    # The second sees the reset at its next look at the budgets (within budgets.REFRESH_S).
    await second.app.services.budgets.refresh()
    assert not held.held
    async with httpx.AsyncClient(base_url=first.url) as client:
        for _ in range(4):
            assert (await chat(client, "shared")).status_code == 200
    await first.settle()
    await second.settle()
    release(monkeypatch)
    await asyncio.sleep(GIVEN_BACK_S + 0.3)
    assert await budget_tokens(first, budget_id) == 4 * USED


async def test_a_charge_beyond_an_allowance_retried_after_a_lost_reply_counts_once(
    make_env: MakeEnv, tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request admitted ahead that used more than its allowance holds is charged the rest at
    Redis. When Redis ran that charge but its reply was lost, the retry must not add it again."""
    hold(monkeypatch)
    env = await make_env(**PREFETCH, **policy(tmp_path, 'tokens = ["10000000/hour"]\n'))
    limiter = env.app.services.limiter
    charge = limiter.charge
    lost: list[str | None] = []

    async def reply_lost_once(more: list[tuple[str, int, int]], once: str | None = None) -> None:
        await (charge(more) if once is None else charge(more, once))
        if not lost and any(units > 0 for _, units, _ in more):  # a charge, not a give-back
            lost.append(once)
            raise StoreUnavailable("the reply was lost")

    monkeypatch.setattr(limiter, "charge", reply_lost_once)
    async with httpx.AsyncClient(base_url=env.url) as client:
        for _ in range(2):  # the second asks for an allowance
            assert (await chat(client, "over")).status_code == 200
        assert await bucket(redis, "t:3600") == USED + 33 * RESERVED
        big = await client.post(
            "/v1/chat/completions",
            content=CONTENT,
            headers={"Content-Type": "application/json", "X-ORQ-IDENTITY-ID": "over"}
            | tokens(100_000, 10),
        )
        assert big.status_code == 200
    assert limiter.ahead == 1 and lost  # admitted ahead; its charge's first reply lost
    await env.settle()
    assert await bucket(redis, "t:3600") == USED + 33 * RESERVED + (100_000 + 10 - RESERVED)
