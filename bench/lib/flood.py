"""A flood of distinct identities: every request a new external id, over raw keep-alive
connections (asyncio streams), with the target's RSS and Redis's used_memory sampled meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from bench.lib import config
from bench.lib.client import Target
from bench.lib.payloads import CHAT_PATH, IDENTITY_HEADER, chat
from bench.lib.processes import Launcher
from bench.lib.report import compare, compare_table, log, table
from bench.lib.sampling import rss_kb

REQUEST_TIMEOUT_S = 30.0
MAX_SAMPLES = 10_000
WARMUP = 200


@dataclass(frozen=True)
class Flood:
    identities: int
    connections: int = 32
    source: str = "header"  # or "body": a body identity with a profile
    big_profiles: bool = False
    interval: float = 2.0
    max_seconds: float = 3600.0


@dataclass
class Tally:
    next_id: int = 0
    done: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: int = 0


def profile(k: int, big: bool) -> dict[str, Any]:
    external_id = f"flood-{k}"
    if big:  # every field at its limit: what a hostile client can make the process remember
        return {
            "display_name": f"{k:x<255}",
            "email": f"{external_id:<240}@example.com".replace(" ", "x"),
            "avatar_url": f"https://example.com/{k:x<2000}",
            "tags": [f"{i}{k:x<62}" for i in range(10)],
            "metadata": {f"{i}{k:k<62}": f"{k:v<512}" for i in range(20)},
        }
    return {
        "display_name": f"Flood User {k}",
        "email": f"{external_id}@example.com",
        "tags": ["flood", f"t{k % 7}"],
        "metadata": {"plan": "pro", "team": f"team-{k % 100}", "region": "eu-west-1"},
    }


def request(k: int, source: str, prefix: str, big: bool = False) -> bytes:
    external_id = f"{prefix}-{k}"
    payload: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = f"content-type: application/json\r\n{IDENTITY_HEADER}: {external_id}\r\n"
    if source == "body":
        headers = "content-type: application/json\r\n"
        payload["identity"] = {"id": external_id, **profile(k, big)}
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\n{headers}"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status, and whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers.get("connection", "").lower() != "close"


async def client(
    port: int, tally: Tally, total: int, flood: Flood, prefix: str, deadline: float
) -> None:
    """One keep-alive connection sending requests until `total` identities are taken."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while tally.next_id < total and time.monotonic() < deadline:
            k = tally.next_id
            tally.next_id += 1
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request(k, flood.source, prefix, flood.big_profiles))
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, keep = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                tally.failures += 1
                writer.close()
                reader = writer = None
                continue
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            tally.done += 1
            if not keep:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


def mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


async def used_memory(redis: Redis | None) -> int:
    return 0 if redis is None else int((await redis.info("memory"))["used_memory"])


async def run(
    port: int, pid: int, flood: Flood, identities: int, redis: Redis | None = None
) -> dict[str, Any]:
    """`identities` requests, each a new id, against the target on `port` (served by `pid`)."""
    warm = Tally()
    await asyncio.gather(
        *(client(port, warm, WARMUP, flood, "warm", time.monotonic() + 60) for _ in range(4))
    )
    await asyncio.sleep(1.0)  # the baseline has the connections, scripts and code paths in it
    rss_start, redis_start = rss_kb(pid), await used_memory(redis)
    tally = Tally()
    samples: list[dict[str, Any]] = []
    started = time.monotonic()

    async def sample() -> None:
        point = {
            "t_s": round(time.monotonic() - started, 2),
            "identities": tally.done,
            "rss_mb": mb(rss_kb(pid)),
        }
        if redis is not None:
            point["redis_used_memory_mb"] = round(await used_memory(redis) / 2**20, 1)
        samples.append(point)

    async def sampler() -> None:
        while len(samples) < MAX_SAMPLES:
            await sample()
            await asyncio.sleep(flood.interval)

    watcher = asyncio.create_task(sampler())
    deadline = started + flood.max_seconds
    try:
        await asyncio.gather(
            *(
                client(port, tally, identities, flood, "flood", deadline)
                for _ in range(flood.connections)
            )
        )
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    elapsed = time.monotonic() - started
    await asyncio.sleep(1.0)  # the last usage writes
    await sample()
    rss_end, redis_end = rss_kb(pid), await used_memory(redis)
    growth_kb = (rss_end or 0) - (rss_start or 0)
    out: dict[str, Any] = {
        "completed": tally.done,
        "failures": tally.failures,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "seconds": round(elapsed, 1),
        "requests_per_s": round(tally.done / elapsed, 1) if elapsed else None,
        "rss_mb": {
            "start": mb(rss_start),
            "end": mb(rss_end),
            "peak": max((s["rss_mb"] or 0.0 for s in samples), default=0.0),
        },
        "rss_growth_mb": round(growth_kb / 1024, 1),
        "rss_growth_bytes_per_identity": round(growth_kb * 1024 / max(tally.done, 1), 1),
    }
    if redis is not None:
        out["redis_used_memory_mb"] = {
            "start": round(redis_start / 2**20, 1),
            "end": round(redis_end / 2**20, 1),
        }
        out["redis_bytes_per_identity"] = round((redis_end - redis_start) / max(tally.done, 1), 1)
    out["samples"] = samples
    return out


async def through(target: Target, flood: Flood, count: int, url: str | None) -> dict[str, Any]:
    redis = Redis.from_url(url) if url else None
    try:
        return await run(target.port, target.pid, flood, count, redis)
    finally:
        if redis is not None:
            await redis.aclose()


def benchmark(flood: Flood, reference_identities: int, policies: bool = True) -> dict[str, Any]:
    """The references' floods (up to `reference_identities` ids each), then the sidecar's, on a
    private redis-server with bench/limits-policy.toml (unless `policies` is off)."""
    measured: dict[str, Any] = {}
    with Launcher("flood-bench-") as launcher:
        redis = launcher.redis()
        upstream = launcher.mock()
        references = []
        if reference_identities:
            references = launcher.references(upstream, chat(1), ("nginx", "bare"))
        path, _ = config.sidecar_config(
            launcher.folder("sidecar"),
            # One client address sends every new id: the creation cap is lifted to measure.
            overrides={**config.limits(policies), "identity": {"max_new_per_minute": 100_000_000}},
        )
        sidecar = launcher.sidecar("sidecar", path, redis.url, upstream)
        for target in references:
            count = min(flood.identities, reference_identities)
            log(f"{count:,} identities through {target.name}")
            measured[target.name] = asyncio.run(through(target, flood, count, None))
        log(f"{flood.identities:,} identities through the sidecar")
        side = asyncio.run(through(sidecar, flood, flood.identities, redis.url))
        launcher.procs["sidecar"].check_alive()
    result: dict[str, Any] = {
        "identities": flood.identities,
        "source": flood.source,
        "big_profiles": flood.big_profiles,
        "connections": flood.connections,
    }
    result |= {k: v for k, v in side.items() if not k.startswith("rss")}
    result |= {f"sidecar_{k}": v for k, v in side.items() if k.startswith("rss")}
    result["references"] = measured
    runs = [{"sidecar": side} | measured]
    result["compared"] = compare(runs, "requests_per_s", ["sidecar"], list(measured))
    return result


def summary(result: dict[str, Any]) -> str:
    references: dict[str, Any] = result["references"]
    rss = {"sidecar": result["sidecar_rss_mb"]} | {n: m["rss_mb"] for n, m in references.items()}
    growth = {"sidecar": result["sidecar_rss_growth_mb"]}
    growth |= {n: m["rss_growth_mb"] for n, m in references.items()}
    counts = {"sidecar": result["completed"]} | {n: m["completed"] for n, m in references.items()}
    rows = [
        [
            name,
            f"{counts[name]:,}",
            f"{rss[name]['start']}",
            f"{rss[name]['end']}",
            f"{growth[name]}",
        ]
        for name in rss
    ]
    lines = [
        f"Flood of {result['identities']:,} distinct {result['source']} identities through the "
        f"sidecar, {result['connections']} connections; the references took the same flood, "
        "shorter. The ratio is the sidecar's requests/s over the reference's.",
        "",
        *compare_table(result["compared"], "requests_per_s", "requests/s", list(references)),
        *table(["target", "identities", "RSS MB at start", "RSS MB at end", "growth MB"], rows),
    ]
    if "redis_bytes_per_identity" in result:
        lines.append(f"Redis: {result['redis_bytes_per_identity']:,} bytes per identity.")
    return "\n".join(lines) + "\n"
