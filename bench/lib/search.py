"""Identity search at scale, in the store (no HTTP): identities that look like a real user base
(bench/lib/people.py) loaded into a private redis-server through the record scripts, first as
a version without the search index left them; then the list, tag filter and search read
them through the scan; the index is built in the background as a starting sidecar builds it;
and the same reads, and searches of every kind, go through the index. Memory and Redis CPU
per identity, with and without the index, come from INFO."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from ulid import ULID

from bench.lib.people import Person, people
from bench.lib.processes import Launcher
from bench.lib.report import log, percentile, table
from sidecar.catalog import Catalog, open_catalog
from sidecar.identity.indexer import IndexBuilder
from sidecar.identity.model import Identity, Profile
from sidecar.identity.records import order_member
from sidecar.store.keys import Keys, xid_digest

# claim.lua as it was before the search index: how a store written by that version looks.
CLAIM_WITHOUT_INDEX = """
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner then return owner end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return ARGV[2]
"""
T = TypeVar("T")
BATCH = 500  # identities per pipeline while loading
YEAR_MS = 365 * 86_400_000


class Clock:
    """The loader's clock: creation times spread evenly over the year before `end`."""

    def __init__(self, end: float, total: int) -> None:
        self.now = end - YEAR_MS / 1000
        self.step = YEAR_MS / 1000 / max(total, 1)

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step


def profile(person: Person) -> Profile:
    return Profile(display_name=person.display_name, email=person.email, tags=person.tags)


async def load(
    redis: Redis, catalog: Catalog, clock: Clock, crowd: Sequence[Person], indexed: bool
) -> None:
    """Create `crowd` through merge.lua and claim.lua (or, not `indexed`, the claim without
    the index), BATCH identities per pipeline, two pipelines in flight."""
    records = catalog.records
    for script in records.create_scripts:
        await script.load(redis)
    legacy = await redis.script_load(CLAIM_WITHOUT_INDEX)
    keys = records.keys

    async def send(batch: Sequence[Person]) -> None:
        pipe = redis.pipeline(transaction=False)
        for person in batch:
            candidate = str(ULID.from_timestamp(clock()))
            clock.tick()
            if indexed:
                records.queue_create(pipe, candidate, person.external_id, profile(person))
                continue
            # The same record and order-set member, claimed as the earlier version did.
            records.queue_record(pipe, candidate, person.external_id, profile(person))
            member = order_member(
                Identity(
                    id=candidate,
                    external_id=person.external_id,
                    display_name=person.display_name,
                    email=person.email,
                    tags=person.tags,
                    created="",
                    updated="",
                )
            )
            args = [xid_digest(person.external_id), candidate, member]
            pipe.evalsha(legacy, 2, keys.external_ids, keys.order, *args)
        await pipe.execute()

    pending: set[asyncio.Task[None]] = set()
    for at in range(0, len(crowd), BATCH):
        if len(pending) >= 2:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        pending.add(asyncio.create_task(send(crowd[at : at + BATCH])))
    for task in pending:
        await task


async def redis_figures(redis: Redis) -> tuple[int, float]:
    """used_memory (bytes) and Redis's CPU time so far (s)."""
    memory, cpu = await redis.info("memory"), await redis.info("cpu")
    return int(memory["used_memory"]), float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50": round(percentile(ordered, 50), 2),
        "p99": round(percentile(ordered, 99), 2),
        "n": len(ordered),
    }


async def timed(call: Awaitable[T]) -> tuple[float, T]:
    began = time.perf_counter()
    result = await call
    return (time.perf_counter() - began) * 1000, result


class Queries:
    """The searches of each kind, drawn from the loaded crowd; `middle`: an _id halfway down
    the list, for pages that start there."""

    def __init__(self, crowd: Sequence[Person], count: int, middle: str, seed: int = 11) -> None:
        rnd = random.Random(seed)
        unique = [p for p in crowd if p.external_id.startswith("cus_")]
        named = [p for p in crowd if p.display_name]
        letters = "bcdfghjkmnpqvwxz"
        self.kinds: dict[str, list[dict[str, Any]]] = {
            "no match (7 random letters)": [
                {"search": "".join(rnd.choice(letters) for _ in range(7))} for _ in range(count)
            ],
            "one match (a random external id)": [
                {"search": rnd.choice(unique).external_id} for _ in range(count)
            ],
            "few matches (a full name), page of 10": [
                {"search": str(rnd.choice(named).display_name)} for _ in range(count)
            ],
            "many matches (gmail, smith, john, user_, ann), page of 10": [
                {"search": s} for s in ("gmail", "smith", "john", "user_", "ann")
            ],
            "many matches, page of 100": [
                {"search": s, "limit": 100} for s in ("gmail", "smith", "john", "user_", "ann")
            ],
            "two characters (an, qx, é, zy, ñ), page of 10": [
                {"search": s} for s in ("an", "qx", "é", "zy", "ñ")
            ],
            "search and a tag (smith + premium, gmail + team-7)": [
                {"search": "smith", "tags": ["premium"]},
                {"search": "gmail", "tags": ["team-7"], "limit": 100},
            ],
            "many matches, page of 10 halfway down, either way": [
                {"search": s, cursor: middle}
                for s in ("gmail", "smith", "user_")
                for cursor in ("starting_after", "ending_before")
            ],
        }


async def reads(
    catalog: Catalog, kinds: Mapping[str, list[dict[str, Any]]], repeats: int
) -> dict[str, Any]:
    """p50 / p99 (ms) of Catalog.page per kind of read, over its queries times `repeats`
    (after one read of each, not counted)."""
    out: dict[str, Any] = {}
    for kind, queries in kinds.items():
        await catalog.page(**queries[0])
        samples: list[float] = []
        results: list[int] = []
        for _ in range(repeats):
            for query in queries:
                elapsed, page = await timed(catalog.page(**query))
                samples.append(elapsed)
                results.append(len(page.data))
        out[kind] = summary(samples) | {"results_median": statistics.median(results)}
        log(f"  {kind}: p50 {out[kind]['p50']} ms, p99 {out[kind]['p99']} ms")
    return out


async def list_reads(catalog: Catalog) -> dict[str, list[dict[str, Any]]]:
    """The reads that do not search: pages of the list, a tag filter, a deep page."""
    middle = (await catalog.page(limit=1)).data
    kinds: dict[str, list[dict[str, Any]]] = {
        "list, page of 10": [{}],
        "list, page of 100": [{"limit": 100}],
        "tag filter (2%), page of 100": [{"tags": ["team-7"], "limit": 100}],
    }
    if middle:
        kinds["list, page of 100 after a cursor"] = [{"limit": 100, "starting_after": middle[0].id}]
    return kinds


async def one_size(
    launcher: Launcher, total: int, repeats: int, queries: int, scan_queries: int
) -> dict[str, Any]:
    server = launcher.redis(f"redis-{total}")
    redis = Redis.from_url(server.url)
    result: dict[str, Any] = {"identities": total}
    try:
        keys = Keys("sidecar")
        clock = Clock(time.time(), total)
        catalog = open_catalog(redis, keys, clock)
        log(f"{total:,} identities: generating")
        crowd = list(people(total))
        memory0, cpu0 = await redis_figures(redis)
        log(f"{total:,} identities: loading them as a version without the search index did")
        began = time.perf_counter()
        await load(redis, catalog, clock, crowd, indexed=False)
        seconds = time.perf_counter() - began
        memory1, cpu1 = await redis_figures(redis)
        result["load_without_index"] = {
            "seconds": round(seconds, 1),
            "identities_per_s": round(total / seconds),
            "redis_cpu_us_per_identity": round((cpu1 - cpu0) / total * 1e6, 1),
            "bytes_per_identity": round((memory1 - memory0) / total),
        }
        log(f"  {result['load_without_index']}")
        plain = await list_reads(catalog)
        log("reads without the index (the scan)")
        result["without_index"] = await reads(catalog, plain, repeats * 10)
        halfway: list[Any] = await redis.zrange(keys.order, total // 2, total // 2)
        middle = halfway[0][:26].decode()
        scans = Queries(crowd, scan_queries, middle).kinds["no match (7 random letters)"]
        result["without_index"] |= await reads(catalog, {"search, no match (scan)": scans}, 1)

        log("building the index (what a starting sidecar does)")
        builder = IndexBuilder(redis, keys)
        began = time.perf_counter()
        assert await builder.build()
        seconds = time.perf_counter() - began
        memory2, cpu2 = await redis_figures(redis)
        result["build"] = {
            "seconds": round(seconds, 1),
            "redis_cpu_s": round(cpu2 - cpu1, 1),
            "index_bytes_per_identity": round((memory2 - memory1) / total),
            "all_bytes_per_identity": round((memory2 - memory0) / total),
        }
        status = await builder.status()
        result["build"]["indexed"] = status.indexed
        log(f"  {result['build']}")

        log("reads with the index")
        result["with_index"] = await reads(catalog, plain, repeats * 10)
        drawn = Queries(crowd, queries, middle).kinds
        result["with_index"] |= await reads(catalog, drawn, repeats)

        more = list(people(min(total // 10, 50_000), seed=8, start=total))
        log(f"creating {len(more):,} more identities with the index")
        clock.now = time.time()
        began = time.perf_counter()
        await load(redis, catalog, clock, more, indexed=True)
        seconds = time.perf_counter() - began
        _, cpu3 = await redis_figures(redis)
        result["load_with_index"] = {
            "seconds": round(seconds, 1),
            "identities_per_s": round(len(more) / seconds),
            "redis_cpu_us_per_identity": round((cpu3 - cpu2) / len(more) * 1e6, 1),
        }
        log(f"  {result['load_with_index']}")
        result["changes"] = await changes(catalog, redis)
        log(f"  {result['changes']}")
    finally:
        await redis.aclose()
        server.kill()  # its memory back before the next size
    return result


async def changes(catalog: Catalog, redis: Redis) -> dict[str, Any]:
    """Renames (name and email change: postings move) and erasures of 200 identities, one at
    a time."""
    victims = (await catalog.page(limit=200)).data
    out: dict[str, Any] = {}
    _, cpu0 = await redis_figures(redis)
    samples = []
    for n, identity in enumerate(victims):
        change = Profile(display_name=f"Renamed Person {n}", email=f"renamed{n}@example.org")
        samples.append((await timed(catalog.patch(identity, change)))[0])
    _, cpu1 = await redis_figures(redis)
    out["rename_ms"] = summary(samples)
    out["rename_redis_cpu_us"] = round((cpu1 - cpu0) / len(victims) * 1e6)
    samples = []
    for identity in victims:
        samples.append((await timed(catalog.records.delete(identity)))[0])
    _, cpu2 = await redis_figures(redis)
    out["erase_ms"] = summary(samples)
    out["erase_redis_cpu_us"] = round((cpu2 - cpu1) / len(victims) * 1e6)
    return out


def benchmark(
    sizes: Sequence[int], repeats: int, queries: int, scan_queries: int
) -> dict[str, Any]:
    with Launcher("search-bench-") as launcher:
        runs = [
            asyncio.run(one_size(launcher, total, repeats, queries, scan_queries))
            for total in sizes
        ]
    return {"sizes": runs}


def render(result: Mapping[str, Any]) -> str:
    runs = result["sizes"]
    heads = [f"{run['identities']:,}" for run in runs]
    kinds = list(dict.fromkeys(k for run in runs for k in run["with_index"]))
    rows = []
    for kind in kinds:
        cells = []
        for run in runs:
            after = run["with_index"].get(kind)
            before = run["without_index"].get(kind)
            text = "-" if after is None else f"{after['p50']} / {after['p99']}"
            if before is not None:
                text += f" (scan: {before['p50']} / {before['p99']})"
            cells.append(text)
        rows.append([kind, *cells])
    scans = [run["without_index"].get("search, no match (scan)") for run in runs]
    rows.append(
        [
            "search, no match, by the scan",
            *(f"{s['p50']} / {s['p99']}" if s else "-" for s in scans),
        ]
    )
    lines = table(["p50 / p99 ms (Catalog.page, no HTTP)", *heads], rows)
    for run in runs:
        build, before, after = run["build"], run["load_without_index"], run["load_with_index"]
        lines.append(
            f"{run['identities']:,} identities: {before['bytes_per_identity']} B each without "
            f"the index, index {build['index_bytes_per_identity']} B more; built in "
            f"{build['seconds']} s ({build['redis_cpu_s']} s of Redis CPU); creates cost "
            f"{before['redis_cpu_us_per_identity']} us of Redis CPU without the index, "
            f"{after['redis_cpu_us_per_identity']} us with it ({after['identities_per_s']:,}/s "
            f"loading); rename {run['changes']['rename_ms']['p50']} ms, erase "
            f"{run['changes']['erase_ms']['p50']} ms p50."
        )
    return "\n".join(lines)
