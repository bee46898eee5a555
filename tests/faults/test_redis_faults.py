"""Redis paused, killed and restarted under traffic: every answered request counted once."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from sidecar.testing.redis_server import RedisServer
from tests.support.auth import ADMIN_TOKEN
from tests.support.env import Env, MakeEnv
from tests.support.redis import own_redis, quick_client

TIMEOUT_MS = 100
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "faults"
KNOWN = [f"known-{n}" for n in range(4)]  # seen before the fault
CONCURRENCY = 6


@dataclass
class Traffic:
    answered: Counter[str] = field(default_factory=Counter)  # 200s per external id
    tokens: Counter[str] = field(default_factory=Counter)
    failed: Counter[int] = field(default_factory=Counter)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (started, seconds)


async def drive(env: Env, traffic: Traffic, stop: asyncio.Event, new_prefix: str) -> None:
    """Chat completions from CONCURRENCY clients until `stop`: header identities known before
    the fault, and body identities never seen before (created while Redis may be down)."""

    async def client(worker: int) -> None:
        n = 0
        async with httpx.AsyncClient(base_url=env.url, timeout=30) as http:
            while not stop.is_set():
                n += 1
                body: dict[str, Any] = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi " * (n % 7 + 1)}],
                }
                headers = {}
                if n % 3:
                    who = KNOWN[(worker + n) % len(KNOWN)]
                    headers["X-ORQ-IDENTITY-ID"] = who
                else:
                    who = f"{new_prefix}-{worker}-{n // 30}"
                    body["identity"] = {"id": who, "display_name": f"New {who}"}
                began = time.monotonic()
                reply = await http.post("/v1/chat/completions", json=body, headers=headers)
                traffic.latencies.append((began, time.monotonic() - began))
                if reply.status_code != 200:
                    traffic.failed[reply.status_code] += 1
                    continue
                traffic.answered[who] += 1
                traffic.tokens[who] += reply.json()["usage"]["total_tokens"]

    await asyncio.gather(*(client(w) for w in range(CONCURRENCY)))


@pytest.fixture
async def aof_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with own_redis(tmp_path, "--appendonly", "yes") as server:
        yield server


@pytest.fixture
async def client(aof_redis: RedisServer) -> AsyncIterator[Redis]:
    # The store's own socket timeout (the sidecar uses 5 s) cut to 1 s, so that a 5 s pause
    # sends usage through the spool rather than waiting it out.
    async with quick_client(aof_redis, 1.0) as made:
        yield made


async def run_fault(
    name: str,
    make_env: MakeEnv,
    client: Redis,
    tmp_path: Path,
    fault: Callable[[], Awaitable[tuple[float, float]]],
) -> tuple[Env, Traffic, tuple[float, float]]:
    policies = tmp_path / "policies.toml"
    policies.write_text('[[policy]]\nname = "roomy"\nrequests = ["100000/minute"]\n')
    env: Env = await make_env(
        redis_client=client,
        real_clock=True,
        redis={"timeout_ms": TIMEOUT_MS},
        policies={"paths": [str(policies)]},
    )
    async with httpx.AsyncClient(base_url=env.url) as http:
        for who in KNOWN:  # known before the fault: their _id is cached
            reply = await http.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
                headers={"X-ORQ-IDENTITY-ID": who},
            )
            assert reply.status_code == 200
    await env.settle()
    baseline: dict[str, tuple[int, int]] = {}
    for who in KNOWN:
        metrics = await env.metrics(who)
        baseline[who] = (metrics["total_requests"], metrics["total_tokens"])
        assert baseline[who][0] == 1
    traffic = Traffic()
    stop = asyncio.Event()
    driver = asyncio.create_task(drive(env, traffic, stop, "new"))
    try:
        await asyncio.sleep(1.0)
        window = await fault()
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await driver
    recorder = env.app.services.recorder
    deadline = time.monotonic() + 30
    while recorder.waiting or recorder.backlog.pending:
        assert time.monotonic() < deadline, "the spool was not replayed"
        await asyncio.sleep(0.1)
    await env.settle()
    counted: dict[str, tuple[int, int]] = {}
    for who in traffic.answered:
        metrics = await env.metrics(who)
        requests, tokens = baseline.get(who, (0, 0))
        counted[who] = (metrics["total_requests"] - requests, metrics["total_tokens"] - tokens)
    report(name, traffic, window, counted)
    # Every request a client saw answered is counted exactly once, tokens too.
    assert not traffic.failed
    for who, answered in traffic.answered.items():
        assert counted[who] == (answered, traffic.tokens[who]), who
    return env, traffic, window


def report(
    name: str, traffic: Traffic, window: tuple[float, float], counted: dict[str, tuple[int, int]]
) -> None:
    """The fault's figures, in tests/artifacts/faults/<name>.json (bench/RESULTS.md quotes
    them): requests served during it, usage lost and counted twice, latency during it."""
    during = sorted(s for began, s in traffic.latencies if window[0] <= began <= window[1])
    lost = sum(max(0, n - counted.get(who, (0, 0))[0]) for who, n in traffic.answered.items())
    twice = sum(max(0, counted.get(who, (0, 0))[0] - n) for who, n in traffic.answered.items())
    figures = {
        "fault_s": round(window[1] - window[0], 2),
        "requests_answered": sum(traffic.answered.values()),
        "requests_during_fault": len(during),
        "requests_failed": sum(traffic.failed.values()),
        "identities": len(traffic.answered),
        "usage_lost": lost,
        "usage_counted_twice": twice,
        "tokens_answered": sum(traffic.tokens.values()),
        "tokens_counted": sum(t for _, t in counted.values()),
        "p50_ms_during_fault": round(1000 * during[len(during) // 2], 2) if during else None,
        "p99_ms_during_fault": round(1000 * during[int(len(during) * 0.99)], 2) if during else None,
        "max_ms_during_fault": round(1000 * during[-1], 2) if during else None,
        "timeout_ms": TIMEOUT_MS,
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


def p99_within(traffic: Traffic, window: tuple[float, float]) -> float:
    during = sorted(s for began, s in traffic.latencies if window[0] <= began <= window[1])
    assert len(during) > 50, "traffic went on during the fault"
    return during[int(len(during) * 0.99)]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_redis_paused_for_five_seconds(
    make_env: MakeEnv, aof_redis: RedisServer, client: Redis, tmp_path: Path
) -> None:
    async def pause() -> tuple[float, float]:
        began = time.monotonic()
        aof_redis.pause()
        await asyncio.sleep(5.0)
        aof_redis.resume()
        return began, time.monotonic()

    env, traffic, window = await run_fault("redis-paused", make_env, client, tmp_path, pause)
    health = (await env.api.get("/healthz")).json()
    assert (health["usage_waiting"], health["spool_bytes"], health["usage_dropped"]) == (0, 0, 0)
    recorder = env.app.services.recorder
    assert recorder.spool and recorder.spool.replayed > 0, "usage went through the spool"
    assert recorder.dropped == 0
    assert any(who.startswith("new") for who in traffic.answered)
    assert p99_within(traffic, window) <= (TIMEOUT_MS + 50) / 1000


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_redis_killed_and_restarted_from_its_append_only_file(
    make_env: MakeEnv, aof_redis: RedisServer, client: Redis, tmp_path: Path
) -> None:
    async def crash_and_restart() -> tuple[float, float]:
        began = time.monotonic()
        aof_redis.crash()
        await asyncio.sleep(3.0)
        aof_redis.start()
        return began, time.monotonic()

    env, traffic, window = await run_fault(
        "redis-killed", make_env, client, tmp_path, crash_and_restart
    )
    recorder = env.app.services.recorder
    assert recorder.spool and recorder.spool.replayed > 0, "usage went through the spool"
    assert recorder.dropped == 0
    assert p99_within(traffic, window) <= (TIMEOUT_MS + 50) / 1000


@pytest.mark.slow
async def test_hook_reports_during_an_outage_are_counted_once_afterwards(
    make_env: MakeEnv, aof_redis: RedisServer, client: Redis
) -> None:
    env: Env = await make_env(redis_client=client, real_clock=True)
    hook = {"x-sidecar-token": ADMIN_TOKEN}

    def report(request_id: str, who: str) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "identity": who,
            "model": "gpt-4o-mini",
            "status": 200,
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }

    known = await env.api.post("/hooks/usage", json=report("r0", "hooked"), headers=hook)
    assert known.json()["counted"] is True
    aof_redis.pause()
    try:
        replies = [
            await env.api.post("/hooks/usage", json=report(f"r{n}", who), headers=hook)
            for n, who in [(1, "hooked"), (2, "hooked"), (3, "first-seen-in-outage")]
        ]
    finally:
        aof_redis.resume()
    assert [(r.status_code, r.json()["spooled"]) for r in replies] == [(202, True)] * 3
    # The proxy retries one of them after the outage: still counted once.
    retried = await env.api.post("/hooks/usage", json=report("r2", "hooked"), headers=hook)
    assert retried.status_code == 202
    recorder = env.app.services.recorder
    deadline = time.monotonic() + 20
    while recorder.backlog.pending:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    hooked = await env.metrics("hooked")
    assert (hooked["total_requests"], hooked["total_tokens"]) == (3, 30)
    first = await env.metrics("first-seen-in-outage")
    assert (first["total_requests"], first["total_tokens"]) == (1, 10)
