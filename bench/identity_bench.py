"""Identity store and API at scale: upsert rate, memory per identity, GET/list/search latency.

    .venv/bin/python -m bench.identity_bench [--identities 100000] [--repeats 3]

Starts a private redis-server and a `sidecar serve` process on it; nothing else is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from sidecar.identity.model import Profile
from sidecar.identity.store import IdentityStore
from sidecar.store.keys import Keys
from sidecar.testing.redis_server import RedisServer, free_port
from sidecar.usage import buckets

TOKEN = "bench-admin-token-0123456789"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples_ms: list[float]) -> dict[str, float]:
    return {"p50": round(pct(samples_ms, 0.5), 3), "p99": round(pct(samples_ms, 0.99), 3)}


def typical_profile(n: int) -> Profile:
    return Profile(
        display_name=f"User Number {n}",
        email=f"user{n}@example-company.com",
        avatar_url=f"https://cdn.example.com/avatars/{n}.png",
        tags=["premium", f"team-{n % 50}"],
        metadata={"plan": "pro" if n % 3 else "free", "region": "eu-west-1"},
    )


async def populate(store: IdentityStore, start: int, stop: int, concurrency: int) -> float:
    """Upsert identities start..stop-1 from one process; returns upserts per second."""
    queue = iter(range(start, stop))

    async def worker() -> None:
        for n in queue:
            await store.upsert(f"user-{n:07d}", typical_profile(n))

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (stop - start) / (time.perf_counter() - began)


async def update_rate(store: IdentityStore, count: int, total: int, concurrency: int) -> float:
    ids = [random.randrange(total) for _ in range(count)]
    queue = iter(ids)

    async def worker() -> None:
        for n in queue:
            await store.upsert(f"user-{n:07d}", typical_profile(n))

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - began)


def start_sidecar(redis_url: str, port: int, data_dir: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env |= {
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_PORT": str(port),
        "SIDECAR_ADMIN_TOKEN": TOKEN,
        "SIDECAR_DATA_DIR": data_dir,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(400):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("sidecar did not start")


class LeanClient:
    """One keep-alive HTTP/1.1 connection with Nagle off: measures the server, not a client
    library (httpx adds 0.5-1 ms per request here)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.conn.connect()
        assert self.conn.sock is not None
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, path: str, params: Any = None) -> tuple[int, bytes]:
        if params:
            path += "?" + urllib.parse.urlencode(params)
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = self.conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.conn.close()


def timed(client: LeanClient, path: str, params: Any = None) -> tuple[float, Any]:
    began = time.perf_counter()
    status, body = client.get(path, params)
    elapsed = (time.perf_counter() - began) * 1000
    assert status == 200, body
    return elapsed, json.loads(body)


def api_latencies(port: int, total: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = LeanClient(port)
    try:
        client.get("/healthz")
        samples = [timed(client, "/healthz")[0] for _ in range(300)]
        out["healthz_ms"] = summary(samples)
        samples = []
        for _ in range(1000):
            n = random.randrange(total)
            ms, body = timed(client, f"/v2/identities/user-{n:07d}")
            assert body["external_id"] == f"user-{n:07d}"
            samples.append(ms)
        out["get_by_external_id_ms"] = summary(samples)
        first = timed(client, "/v2/identities", {"limit": 200})[1]["data"]
        samples = []
        for i in range(100):
            cursor = first[i]["_id"]
            ms, body = timed(
                client,
                "/v2/identities",
                {"limit": 100, "include_metrics": "true", "starting_after": cursor},
            )
            assert len(body["data"]) == 100 and "metrics" in body["data"][0]
            samples.append(ms)
        out["list_100_with_metrics_ms"] = summary(samples)
        samples = [
            timed(client, "/v2/identities", {"search": "no-such-user"})[0] for _ in range(10)
        ]
        out["search_no_match_full_scan_ms"] = summary(samples)
        samples = []
        for _ in range(20):
            ms, body = timed(
                client, "/v2/identities", {"search": f"user{random.randrange(total)}@"}
            )
            samples.append(ms)
        out["search_one_match_ms"] = summary(samples)
        samples = [
            timed(client, "/v2/identities", {"search": "example-company", "limit": 100})[0]
            for _ in range(20)
        ]
        out["search_many_matches_page_of_100_ms"] = summary(samples)
        samples = [
            timed(client, "/v2/identities", {"filter_by.tags": "team-7", "limit": 100})[0]
            for _ in range(20)
        ]
        out["tag_filter_2pct_page_of_100_ms"] = summary(samples)
    finally:
        client.close()
    return out


async def raw_redis_rtt(redis: Redis) -> dict[str, float]:
    samples = []
    for _ in range(2000):
        began = time.perf_counter()
        await redis.hget("sidecar:{idx}:xid", "nothing")
        samples.append((time.perf_counter() - began) * 1000)
    return summary(samples)


async def seed_usage(redis: Redis, store: IdentityStore, count: int) -> None:
    """Thirty days of usage for the newest identities, as the recorder leaves it."""
    page = await store.page(limit=200)
    ids = [i.id for i in page.data][:count]
    pipe = redis.pipeline(transaction=False)
    first, last = buckets.window(time.time())
    day = {"r": 10, "e": 1, "i": 5000, "o": 1000, "c": 123456}
    for identity_id in ids:
        key = store.keys.usage_days(identity_id)
        for d in range(first, last + 1):
            pipe.hset(key, mapping={f"{d}:{k}": v for k, v in day.items()})
        sums: dict[str, int] = {f"s:{k}": v * 30 for k, v in day.items()}
        sums["s:day"] = last
        pipe.hset(key, mapping=sums)  # type: ignore[arg-type]
    await pipe.execute()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"identities": args.identities, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        redis = Redis.from_url(server.url)
        store = IdentityStore(redis, Keys("sidecar"))
        await store.load_scripts()
        try:
            base_memory = int((await redis.info("memory"))["used_memory"])
            checkpoints = sorted(
                {min(args.identities, c) for c in (10_000, 30_000)} | {args.identities}
            )
            done = 0
            rates = []
            scans: dict[int, float] = {}
            for checkpoint in checkpoints:
                rates.append(await populate(store, done, checkpoint, args.concurrency))
                done = checkpoint
                samples = []
                for _ in range(5):
                    began = time.perf_counter()
                    await store.page(search="no-such-user")
                    samples.append((time.perf_counter() - began) * 1000)
                scans[checkpoint] = round(statistics.median(samples), 2)
            result["create_upserts_per_s"] = [round(r) for r in rates]
            used = int((await redis.info("memory"))["used_memory"]) - base_memory
            result["memory_bytes_per_identity_all_structures"] = round(used / args.identities)
            sample = (await store.page(limit=1)).data[0]
            result["memory_usage_record_key_bytes"] = await redis.memory_usage(
                store.keys.identity(sample.id)
            )
            result["store_full_scan_search_ms_by_size"] = scans
            result["update_upserts_per_s"] = [
                round(await update_rate(store, 20_000, args.identities, args.concurrency))
                for _ in range(args.repeats)
            ]
            result["update_upserts_per_s_concurrency_1"] = [
                round(await update_rate(store, 3_000, args.identities, 1))
                for _ in range(args.repeats)
            ]
            await seed_usage(redis, store, 200)
            result["raw_redis_hget_rtt_ms"] = await raw_redis_rtt(redis)
            port = free_port()
            proc = start_sidecar(server.url, port, tmp + "/data")
            try:
                runs = [api_latencies(port, args.identities) for _ in range(args.repeats)]
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            result["api"] = {
                name: {
                    "p50_runs": [run[name]["p50"] for run in runs],
                    "p99_runs": [run[name]["p99"] for run in runs],
                }
                for name in runs[0]
            }
            get_p50 = statistics.median(result["api"]["get_by_external_id_ms"]["p50_runs"])
            result["get_over_raw_redis_rtt"] = round(
                get_p50 / result["raw_redis_hget_rtt_ms"]["p50"], 1
            )
        finally:
            await redis.aclose()
            server.kill()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
