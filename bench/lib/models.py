"""Usage by model at scale: Redis bytes per identity per day, and the time to stream
`/v2/usage?group_by=model` (and the other groupings beside it) over many identities."""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import time
from collections.abc import Mapping
from typing import Any, cast

from redis.asyncio import Redis

from bench.lib.client import admin_headers
from bench.lib.config import sidecar_config
from bench.lib.identity import upserts
from bench.lib.processes import Launcher
from bench.lib.report import log, spread, spread_text, table
from sidecar.catalog import open_catalog
from sidecar.store.keys import Keys
from sidecar.usage import buckets
from sidecar.usage.ranking import Rankings
from sidecar.usage.spool import Entry
from sidecar.usage.writer import UsageWriter

KEYS = Keys("sidecar")
# A day of one identity's usage of each model, as the recorder sums it (requests, tokens,
# nano-dollars, the source).
DAYS_OF = (
    ("gpt-4o-2024-08-06", {"r": 12, "i": 18_000, "ci": 6_000, "o": 4_200, "c": 75_000_000}),
    (
        "claude-sonnet-4-20250514",
        {"r": 5, "e": 1, "i": 9_000, "ci": 3_000, "cw": 1_000, "o": 2_500, "c": 60_000_000},
    ),
    ("o3-mini", {"r": 3, "i": 2_000, "o": 3_000, "rs": 2_000, "c": 15_000_000}),
)
BY_MODEL = "model" in Entry.__struct_fields__  # False at a commit before usage by model


def day_of(n: int) -> tuple[str, dict[str, int]]:
    name, counters = DAYS_OF[n % len(DAYS_OF)]
    return (name if n < len(DAYS_OF) else f"{name}-{n}"), {**counters, "sh": counters["r"]}


class _NoRankings:
    def add(self, identity_id: str, at: float, counters: dict[str, int]) -> None:
        pass


class _Known:
    async def ensure(self, external_id: str, profile: object) -> str:
        raise AssertionError("every entry names its identity")

    def forget(self, external_id: str) -> None:
        pass


async def _used(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def _drop_hours(redis: Redis) -> None:
    """The hour buckets (kept 72 hours, and not by model): out of a per-day figure."""
    batch = [key async for key in redis.scan_iter(match="sidecar:u:*:h:*", count=10_000)]
    for start in range(0, len(batch), 10_000):
        await redis.delete(*batch[start : start + 10_000])


async def memory(url: str, identities: int, days: int, models: int) -> dict[str, Any]:
    """Usage written through the recorder's script for `days` days of `models` models each,
    per identity: Redis bytes per identity per day."""
    redis = Redis.from_url(url)
    catalog = open_catalog(redis, KEYS)
    try:
        await redis.flushall()
        log(f"creating {identities:,} identities")
        await upserts(catalog, list(range(identities)), 32)
        members = await catalog.listing.all_ids(b"-", identities)
        ids = [m[:26].decode() for m in members]
        before = await _used(redis)
        now = time.time()
        writer = UsageWriter(redis, KEYS, _Known(), cast(Rankings, _NoRankings()), lambda: now)
        log(f"writing {days} days of {models} models for each (by model: {BY_MODEL})")
        for start in range(0, len(ids), 100):
            entries = []
            for identity in ids[start : start + 100]:
                for k in range(days):
                    for n in range(models):
                        name, counters = day_of(n)
                        fields: dict[str, Any] = {
                            "at": now - (days - 1 - k) * buckets.DAY,
                            "source": "header",
                            "counters": counters,
                            "identity": identity,
                        }
                        if BY_MODEL:
                            fields["model"] = name
                        entries.append(Entry(**fields))
            results = await writer.write(entries)
            assert set(results) == {1}, set(results)
        await _drop_hours(redis)
        used = await _used(redis) - before
        sample = ids[:200]
        day_hash = [await redis.memory_usage(KEYS.usage_days(i)) or 0 for i in sample]
        model_hashes = [
            await redis.memory_usage(KEYS.usage_models(i) + str(buckets.day(now))) or 0
            for i in sample
            if BY_MODEL
        ] or [0]
        return {
            "identities": identities,
            "days": days,
            "models": models,
            "by_model": BY_MODEL,
            "used_memory_bytes_per_identity_day": round(used / (identities * days)),
            "memory_usage_day_hash_per_day": round(statistics.mean(day_hash) / days),
            "memory_usage_model_hash_per_day": round(statistics.mean(model_hashes)),
        }
    finally:
        await redis.aclose()


async def seed_export(url: str, identities: int, days: int) -> None:
    """`identities` identities with a typical profile and `days` days of the three models each,
    written straight into the store's layout (the day counters and the by-model hashes)."""
    redis = Redis.from_url(url)
    catalog = open_catalog(redis, KEYS)
    try:
        await redis.flushall()
        log(f"creating {identities:,} identities")
        await upserts(catalog, list(range(identities)), 64)
        today = buckets.day(time.time())
        first = today - days + 1
        log(f"writing {days} days of {len(DAYS_OF)} models for each, straight into Redis")
        # Every identity's days are alike: each day's two hashes are made once.
        usage = dict(day_of(n) for n in range(len(DAYS_OF)))
        by_model: Any = buckets.model_day(usage)
        day_fields: Any = {}
        for d in range(first, today + 1):
            for counters in usage.values():
                for counter, value in counters.items():
                    field = f"{d}:{counter}"
                    day_fields[field] = day_fields.get(field, 0) + value
        bound = b"-"
        written = 0
        while True:
            members = await catalog.listing.all_ids(bound, 1000)
            if not members:
                break
            bound = b"(" + members[-1]
            pipe = redis.pipeline(transaction=False)
            for member in members:
                identity = member[:26].decode()
                prefix = KEYS.usage_models(identity)
                for d in range(first, today + 1):
                    pipe.hset(prefix + str(d), mapping=by_model)
                pipe.hset(KEYS.usage_days(identity), mapping=day_fields)
            await pipe.execute()
            written += len(members)
            if written % 20_000 < 1000:
                log(f"  {written:,} identities written")
    finally:
        await redis.aclose()


def stream(port: int, query: str) -> tuple[float, float, int, bytes]:
    """GET /v2/usage?QUERY read to its end: seconds to the first byte, to the last, bytes, and
    the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        began = time.perf_counter()
        conn.request("GET", "/v2/usage?" + query, headers=admin_headers())
        response = conn.getresponse()
        first = response.read(1)
        ttfb = time.perf_counter() - began
        body = first + response.read()
        total = time.perf_counter() - began
        assert response.status == 200, body[:300]
        return ttfb, total, len(body), body
    finally:
        conn.close()


EXPORTS = (
    "group_by=model",
    "group_by=identity,model",
    "group_by=identity",
    "group_by=metadata.plan",
)


def check(query: str, body: bytes, identities: int, days: int) -> int:
    """The rows an export of the seeded data must give (a wrong figure fails the run)."""
    data = json.loads(body)["data"]
    if query == "group_by=model":
        assert len(data) == len(DAYS_OF), data
        for row in data:
            counters = dict(day_of(next(n for n in range(3) if day_of(n)[0] == row["model"]))[1])
            assert row["identities"] == identities, row
            assert row["requests"] == counters["r"] * identities * days, row
    elif query == "group_by=identity,model":
        assert len(data) == identities * len(DAYS_OF)
    else:
        assert sum(row["requests"] for row in data) == 20 * identities * days
    return len(data)


def export(identities: int, days: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"identities": identities, "days": days}
    with Launcher("models-bench-") as launcher:
        server = launcher.redis()
        asyncio.run(seed_export(server.url, identities, days))
        config, _ = sidecar_config(launcher.folder("sidecar"))
        sidecar = launcher.sidecar("sidecar", config, server.url)
        for query in EXPORTS:
            runs = []
            # The export by model as many times as asked; the others once, as references.
            for _ in range(repeats if query == EXPORTS[0] else 1):
                log(f"GET /v2/usage?{query}")
                runs.append(stream(sidecar.port, query))
            rows = check(query, runs[0][3], identities, days)
            out[query] = {
                "rows": rows,
                "bytes": runs[0][2],
                "first_byte_s": [round(r[0], 3) for r in runs],
                "total_s": [round(r[1], 2) for r in runs],
            }
            if query == EXPORTS[0]:
                csv = stream(sidecar.port, query + "&format=csv")
                out[query]["csv_total_s"] = round(csv[1], 3)
                out[query]["csv_bytes"] = csv[2]
    return out


def render(result: Mapping[str, Any]) -> str:
    lines = []
    mem = result.get("memory")
    if mem:
        lines.append(
            f"{mem['identities']:,} identities x {mem['days']} days x {mem['models']} models "
            f"(by model: {mem['by_model']}): {mem['used_memory_bytes_per_identity_day']:,} B of "
            f"Redis per identity per day (INFO used_memory; day hash "
            f"{mem['memory_usage_day_hash_per_day']} B/day, by-model hash "
            f"{mem['memory_usage_model_hash_per_day']} B, by MEMORY USAGE)"
        )
    exp = result.get("export")
    if exp:
        rows = [
            [
                q,
                f"{exp[q]['rows']:,}",
                f"{exp[q]['bytes']:,}",
                spread_text(spread(exp[q]["first_byte_s"]), 3),
                spread_text(spread(exp[q]["total_s"]), 2),
                str(exp[q].get("csv_total_s", "")),
            ]
            for q in EXPORTS
        ]
        lines.append(f"Exports over {exp['identities']:,} identities x {exp['days']} days:")
        lines += table(["query", "rows", "JSON bytes", "first byte s", "total s", "CSV s"], rows)
    return "\n".join(lines)
