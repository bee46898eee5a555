"""Memory under a flood of distinct identities: every request a new external id.

    .venv/bin/python -m bench.flood_bench --identities 1000000 [--connections 32] [--source header]

Starts a private redis-server, the mock upstream and a `sidecar serve` in front of it (with
bench/limits-policy.toml, so the limit checks and their profile cache are on the path), sends
one POST /v1/chat/completions per identity over keep-alive connections, samples the sidecar's
RSS and Redis's used_memory while it runs, prints JSON, and stops everything it started.
The sidecar's per-process caches are bounded in entries, so its RSS must level off once they are
full, whatever the number of identities; Redis grows by the bytes each identity keeps there.
`--source body` sends a body identity with a profile instead of the header (the costlier case:
the process remembers what it wrote).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.proxy_bench import (
    ADMIN_TOKEN,
    CHAT_PATH,
    IDENTITY_HEADER,
    SIDECAR_MAIN,
    Proc,
    clean_env,
    http_ok,
    rss_kb,
    start_mock,
    wait_for,
)
from sidecar.testing.redis_server import RedisServer, free_port

HERE = Path(__file__).resolve().parent
POLICY = HERE / "limits-policy.toml"
REQUEST_TIMEOUT_S = 30.0
MAX_SAMPLES = 10_000
WARMUP = 200


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
    port: int,
    tally: Tally,
    total: int,
    source: str,
    prefix: str,
    deadline: float,
    big: bool = False,
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
                writer.write(request(k, source, prefix, big))
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


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


def mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


async def flood(port: int, pid: int, redis: Redis, args: argparse.Namespace) -> dict[str, Any]:
    # Warm-up, so that the baseline has the connections, scripts and code paths in it.
    warm = Tally()
    await asyncio.gather(
        *(client(port, warm, WARMUP, args.source, "warm", time.monotonic() + 60) for _ in range(4))
    )
    await asyncio.sleep(1.0)
    rss_start, redis_start = rss_kb(pid), await used_memory(redis)
    tally = Tally()
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    deadline = started + args.max_seconds

    async def sample() -> None:
        rss = rss_kb(pid)
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 2),
                "identities": tally.done,
                "rss_mb": mb(rss),
                "redis_used_memory_mb": round(await used_memory(redis) / 2**20, 1),
            }
        )

    async def sampler() -> None:
        while len(samples) < MAX_SAMPLES:
            await sample()
            await asyncio.sleep(args.interval)

    watcher = asyncio.create_task(sampler())
    try:
        await asyncio.gather(
            *(
                client(
                    port, tally, args.identities, args.source, "flood", deadline, args.big_profiles
                )
                for _ in range(args.connections)
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
    peak = max((s["rss_mb"] or 0.0 for s in samples), default=0.0)
    growth_kb = (rss_end or 0) - (rss_start or 0)
    return {
        "identities": args.identities,
        "source": args.source,
        "big_profiles": args.big_profiles,
        "connections": args.connections,
        "completed": tally.done,
        "failures": tally.failures,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "seconds": round(elapsed, 1),
        "requests_per_s": round(tally.done / elapsed, 1) if elapsed else None,
        "sidecar_rss_mb": {"start": mb(rss_start), "end": mb(rss_end), "peak": peak},
        "sidecar_rss_growth_mb": round(growth_kb / 1024, 1),
        "sidecar_rss_growth_bytes_per_identity": round(growth_kb * 1024 / max(tally.done, 1), 1),
        "redis_used_memory_mb": {
            "start": round(redis_start / 2**20, 1),
            "end": round(redis_end / 2**20, 1),
        },
        "redis_bytes_per_identity": round((redis_end - redis_start) / max(tally.done, 1), 1),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--identities", type=int, default=100_000, help="distinct ids to send")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--source", choices=("header", "body"), default="header")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument(
        "--max-seconds", type=float, default=3600.0, help="stop sending after this long"
    )
    parser.add_argument("--no-policies", action="store_true", help="no limit checks")
    parser.add_argument(
        "--big-profiles",
        action="store_true",
        help="with --source body: every profile field at its limit (about 15 kB of JSON)",
    )
    args = parser.parse_args(argv)
    if args.identities < 1 or args.connections < 1 or args.interval <= 0:
        parser.error("--identities, --connections and --interval must be positive")
    if args.big_profiles and args.source != "body":
        parser.error("--big-profiles needs --source body")
    with tempfile.TemporaryDirectory(prefix="flood-bench-") as tmp:
        work = Path(tmp)
        redis_server = RedisServer(work)
        redis_server.start()
        procs: list[Proc] = []
        try:
            mock, mock_port = start_mock(work)
            procs.append(mock)
            config = work / "config.toml"
            policies = "" if args.no_policies else f'[policies]\npaths = ["{POLICY}"]\n'
            config.write_text(f'[redis]\nurl = "{redis_server.url}"\n{policies}')
            port = free_port()
            env = clean_env() | {
                "SIDECAR_HOST": "127.0.0.1",
                "SIDECAR_PORT": str(port),
                "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{mock_port}",
                "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN,
                "SIDECAR_DATA_DIR": str(work / "data"),
            }
            sidecar = Proc(
                "sidecar",
                [sys.executable, "-c", SIDECAR_MAIN, "serve", "--config", str(config)],
                work / "sidecar.log",
                env=env,
            )
            procs.append(sidecar)
            wait_for("sidecar", sidecar, lambda: http_ok(port, "/healthz"))

            async def run() -> dict[str, Any]:
                redis = Redis.from_url(redis_server.url)
                try:
                    return await flood(port, sidecar.pid, redis, args)
                finally:
                    await redis.aclose()

            result = asyncio.run(run())
            if not sidecar.alive():
                raise RuntimeError(f"the sidecar died:\n{sidecar.log_tail()}")
        finally:
            for proc in reversed(procs):
                proc.stop()
            redis_server.kill()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
