"""The identity store and API at scale: upserts per second, Redis memory per identity, and the
latency of GET, list and search through `sidecar serve`, beside a raw Redis round trip."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from redis.asyncio import Redis

from bench.lib.client import LeanClient, admin_headers
from bench.lib.config import sidecar_config
from bench.lib.processes import Launcher
from bench.lib.report import log, percentile, spread, spread_text, table
from sidecar.catalog import Catalog, open_catalog
from sidecar.identity.model import Profile
from sidecar.store.keys import Keys
from sidecar.usage import buckets


def summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {"p50": round(percentile(ordered, 50), 3), "p99": round(percentile(ordered, 99), 3)}


def typical_profile(n: int) -> Profile:
    return Profile(
        display_name=f"User Number {n}",
        email=f"user{n}@example-company.com",
        avatar_url=f"https://cdn.example.com/avatars/{n}.png",
        tags=["premium", f"team-{n % 50}"],
        metadata={"plan": "pro" if n % 3 else "free", "region": "eu-west-1"},
    )


async def upserts(store: Catalog, numbers: list[int], concurrency: int) -> float:
    """Upsert the identities numbered `numbers` from one process; upserts per second."""
    queue = iter(numbers)

    async def worker() -> None:
        for n in queue:
            await store.records.upsert(f"user-{n:07d}", typical_profile(n))

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(numbers) / (time.perf_counter() - began)


async def timed_ms(call: Awaitable[Any]) -> float:
    began = time.perf_counter()
    await call
    return (time.perf_counter() - began) * 1000


async def seed_usage(redis: Redis, store: Catalog, count: int) -> None:
    """Thirty days of usage for the newest identities, as the recorder leaves it."""
    page = await store.page(limit=200)
    pipe = redis.pipeline(transaction=False)
    first, last = buckets.window(time.time())
    day = {"r": 10, "e": 1, "i": 5000, "o": 1000, "c": 123456}
    for identity in page.data[:count]:
        key = store.records.keys.usage_days(identity.id)
        for d in range(first, last + 1):
            pipe.hset(key, mapping={f"{d}:{k}": v for k, v in day.items()})
        sums: dict[str, int] = {f"s:{k}": v * 30 for k, v in day.items()}
        sums["s:day"] = last
        pipe.hset(key, mapping=sums)  # type: ignore[arg-type]
    await pipe.execute()


async def store_figures(url: str, total: int, repeats: int, concurrency: int) -> dict[str, Any]:
    """Straight against the store (no HTTP): creates, updates, memory, a search by size."""
    redis = Redis.from_url(url)
    store = open_catalog(redis, Keys("sidecar"))
    out: dict[str, Any] = {}
    try:
        base_memory = int((await redis.info("memory"))["used_memory"])
        done, rates, scans = 0, [], {}
        for checkpoint in sorted({min(total, c) for c in (10_000, 30_000)} | {total}):
            log(f"creating identities {done:,}-{checkpoint:,}")
            rates.append(await upserts(store, list(range(done, checkpoint)), concurrency))
            done = checkpoint
            samples = [await timed_ms(store.page(search="no-such-user")) for _ in range(5)]
            scans[checkpoint] = round(statistics.median(samples), 2)
        out["create_upserts_per_s"] = [round(r) for r in rates]
        used = int((await redis.info("memory"))["used_memory"]) - base_memory
        out["memory_bytes_per_identity_all_structures"] = round(used / total)
        sample = (await store.page(limit=1)).data[0]
        key = store.records.keys.identity(sample.id)
        out["memory_usage_record_key_bytes"] = await redis.memory_usage(key)
        out["store_search_no_match_ms_by_size"] = scans
        out["update_upserts_per_s"] = [
            round(await upserts(store, random.choices(range(total), k=20_000), concurrency))
            for _ in range(repeats)
        ]
        out["update_upserts_per_s_concurrency_1"] = [
            round(await upserts(store, random.choices(range(total), k=3_000), 1))
            for _ in range(repeats)
        ]
        await seed_usage(redis, store, 200)
        rtt = [await timed_ms(redis.hget("sidecar:{idx}:xid", "nothing")) for _ in range(2000)]
        out["raw_redis_hget_rtt_ms"] = summary(rtt)
    finally:
        await redis.aclose()
    return out


def query(path: str, params: Mapping[str, Any]) -> str:
    return path + "?" + urllib.parse.urlencode(params)


def api_latencies(port: int, total: int) -> dict[str, Any]:
    """GET, list and search through the sidecar, one keep-alive connection."""
    client = LeanClient(port)
    listing = "/v2/identities"

    def get(path: str) -> tuple[float, Any]:
        began = time.perf_counter()
        status, body = client.get(path, admin_headers())
        elapsed = (time.perf_counter() - began) * 1000
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body[:200]!r}")
        return elapsed, json.loads(body)

    def times(n: int, path: Callable[[], str]) -> dict[str, float]:
        return summary([get(path())[0] for _ in range(n)])

    out: dict[str, Any] = {}
    try:
        get("/healthz")
        out["healthz_ms"] = times(300, lambda: "/healthz")
        out["get_by_external_id_ms"] = times(
            1000, lambda: f"{listing}/user-{random.randrange(total):07d}"
        )
        first = get(query(listing, {"limit": 200}))[1]["data"]
        cursors = iter(record["_id"] for record in first)
        page = {"limit": 100, "include_metrics": "true"}
        out["list_100_with_metrics_ms"] = times(
            100, lambda: query(listing, page | {"starting_after": next(cursors)})
        )
        out["search_no_match_ms"] = times(10, lambda: query(listing, {"search": "no-such-user"}))
        out["search_one_match_ms"] = times(
            20, lambda: query(listing, {"search": f"user{random.randrange(total)}@"})
        )
        out["search_many_matches_page_of_100_ms"] = times(
            20, lambda: query(listing, {"search": "example-company", "limit": 100})
        )
        out["tag_filter_2pct_page_of_100_ms"] = times(
            20, lambda: query(listing, {"filter_by.tags": "team-7", "limit": 100})
        )
    finally:
        client.close()
    return out


def benchmark(identities: int, repeats: int, concurrency: int) -> dict[str, Any]:
    result: dict[str, Any] = {"identities": identities, "repeats": repeats}
    with Launcher("identity-bench-") as launcher:
        server = launcher.redis()
        result |= asyncio.run(store_figures(server.url, identities, repeats, concurrency))
        config, _ = sidecar_config(launcher.folder("sidecar"))
        sidecar = launcher.sidecar("sidecar", config, server.url)
        runs = [api_latencies(sidecar.port, identities) for _ in range(repeats)]
    result["api"] = {
        name: {
            "p50_runs": [run[name]["p50"] for run in runs],
            "p99_runs": [run[name]["p99"] for run in runs],
        }
        for name in runs[0]
    }
    get_p50 = statistics.median(result["api"]["get_by_external_id_ms"]["p50_runs"])
    result["get_over_raw_redis_rtt"] = round(get_p50 / result["raw_redis_hget_rtt_ms"]["p50"], 1)
    return result


def render(result: Mapping[str, Any]) -> str:
    rows = [
        [name, spread_text(spread(v["p50_runs"]), 2), spread_text(spread(v["p99_runs"]), 2)]
        for name, v in result["api"].items()
    ]
    rtt = result["raw_redis_hget_rtt_ms"]
    return "\n".join(
        [
            f"{result['identities']:,} identities; creates "
            f"{', '.join(f'{r:,}' for r in result['create_upserts_per_s'])} upserts/s, updates "
            f"{', '.join(f'{r:,}' for r in result['update_upserts_per_s'])} upserts/s; "
            f"{result['memory_bytes_per_identity_all_structures']:,} B of Redis per identity.",
            "",
            *table(["through the sidecar", "p50 ms", "p99 ms"], rows),
            f"Raw Redis HGET: p50 {rtt['p50']} ms; GET by external id / raw HGET = "
            f"{result['get_over_raw_redis_rtt']}.",
        ]
    )
