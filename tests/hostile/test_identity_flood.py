"""A flood of distinct identity ids stays within the per-process memory bound: every cache keyed
by identity is bounded in entries, and an identity evicted from one still works. The bounds are
shrunk here so that a flood of a few thousand ids overflows each of them several times over;
bench/flood_bench.py measures the real ones with a million ids."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import flood_bench
from sidecar.identity import identify, records
from sidecar.quota import profiles
from sidecar.usage import recorder as usage_recorder
from tests.support.env import Env, MakeEnv

BOUND = 250
HEADER_IDS = 4 * BOUND
BODY_IDS = 2 * BOUND
CONCURRENCY = 16
POLICY = '[[policy]]\nname = "flood"\nrequests = ["1000000/minute"]\n'


@pytest.fixture
def small_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_CACHE_SIZE", BOUND)
    monkeypatch.setattr(identify, "_WRITTEN_SIZE", BOUND)
    monkeypatch.setattr(profiles, "_PROFILES", BOUND)


def cache_sizes(env: Env) -> dict[str, int]:
    services = env.app.services
    return {
        "external ids": services.records.remembered,
        "written profiles": services.identifier.remembered_profiles,
        "policy profiles": len(services.quota.profiles),
        "pending usage": services.recorder.waiting,
    }


def request(k: int) -> dict[str, Any]:
    """Header identities (the cheapest kind) and some body identities (which upsert a profile)."""
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if k < HEADER_IDS:
        return {"json": body, "headers": {"x-orq-identity-id": f"flood-{k}"}}
    body["identity"] = {"id": f"flood-{k}", "tags": ["flood"], "metadata": {"n": k}}
    return {"json": body}


@pytest.mark.slow
async def test_a_flood_of_identities_keeps_every_cache_within_its_bound(
    make_env: MakeEnv, small_caches: None, tmp_path: Path
) -> None:
    policy = tmp_path / "flood.toml"
    policy.write_text(POLICY)
    # Every id from one address: the creation cap (1,000 a minute by default) is lifted.
    env = await make_env(
        policies={"paths": [str(policy)]}, identity={"max_new_per_minute": 1_000_000}
    )
    peak = dict.fromkeys(cache_sizes(env), 0)
    statuses: list[int] = []
    ids = iter(range(HEADER_IDS + BODY_IDS))

    async def worker(client: httpx.AsyncClient) -> None:
        for k in ids:
            r = await client.post("/v1/chat/completions", **request(k))
            statuses.append(r.status_code)
            for name, size in cache_sizes(env).items():
                peak[name] = max(peak[name], size)

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=env.url, limits=limits, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    assert statuses.count(200) == HEADER_IDS + BODY_IDS
    # Each cache filled up and was held at its bound: eviction, not a flood too small to tell.
    assert peak["external ids"] == BOUND, peak
    assert peak["written profiles"] == BOUND, peak
    assert peak["policy profiles"] == BOUND, peak
    assert peak["pending usage"] <= usage_recorder.MAX_PENDING, peak

    # The first identities were evicted long ago; they still resolve to their own records.
    await env.settle()
    async with httpx.AsyncClient(base_url=env.url) as client:
        for k in (0, HEADER_IDS):
            r = await client.post("/v1/chat/completions", **request(k))
            assert r.status_code == 200
    for k in (0, HEADER_IDS):
        metrics = await env.metrics(f"flood-{k}")
        assert metrics["total_requests"] == 2, (k, metrics)
    listed = await env.api.get("/v2/identities", params={"search": "flood-0"})
    assert [i["external_id"] for i in listed.json()["data"]] == ["flood-0"]


@pytest.mark.slow
def test_the_flood_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/flood_bench.py end to end on a small flood: its own redis-server, mock upstream and
    `sidecar serve`, all stopped at the end."""
    assert flood_bench.main(["--identities", "300", "--connections", "4", "--interval", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["completed"] == 300 and result["statuses"] == {"200": 300}
    assert result["failures"] == 0
    assert result["sidecar_rss_mb"]["end"] > 0
    assert result["redis_bytes_per_identity"] > 0  # each identity left a record in Redis
    assert result["samples"] and result["samples"][-1]["identities"] == 300
