"""Budget alerts under load: 1,000 identities crossing thresholds in one minute, every alert
delivered exactly once, and how long each took to arrive.

    .venv/bin/python -m bench.alerts_bench [--identities 1000] [--minute 60] [--sidecars 2]
                                           [--fail-first 0]

Starts a private redis-server and `--sidecars` `sidecar serve` processes sharing it, each with one
`[[notifiers]]` entry (signed JSON) pointing at a receiver in this process (aiohttp, loopback).
Each identity gets a one-time budget of 1,000 tokens with alerts at 50% and 100% (made through the
API). Over `--minute` seconds every identity crosses both thresholds, the 50% ones in the first
half and the 100% ones in the second, spread evenly: each crossing is a charge written to the
budget's token bucket as the settlement writes it (INCRBY on the key the limiter counts in), and
its time is noted. The receiver notes when each alert arrives and checks its signature;
`--fail-first N` makes it answer the first N attempts with 503, to measure the retries.

Reported: alerts expected, delivered, duplicates (a second arrival of an alert id, or of a budget
and threshold), missing, bad signatures, and the latency from the charge to the alert's arrival
(p50, p90, p99, max). The sidecars scan every 2 s, so the latency is about half a scan interval
plus the delivery on average. The JSON goes to stdout and bench/out/ (or --json FILE).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx
from aiohttp import web
from redis.asyncio import Redis

from bench.lib import cli
from bench.lib.config import toml_dumps
from bench.lib.payloads import ADMIN_TOKEN
from bench.lib.processes import Launcher
from bench.lib.report import latency_stats, log
from sidecar.budgets.store import BudgetStore
from sidecar.store.keys import Keys
from sidecar.testing.redis_server import free_port

MODULE = "bench.alerts_bench"
SECRET = "bench-notifier-secret-0123456789"
TOKENS = 1000
THRESHOLDS = (50, 100)


class Receiver:
    def __init__(self, fail_first: int, expected: int) -> None:
        self.fail_first = fail_first
        self.expected = expected
        self.all_in = asyncio.Event()  # as many arrivals as alerts expected
        self.attempts = 0
        self.arrivals: list[tuple[float, dict[str, Any]]] = []  # (time, body), 2xx only
        self.bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        at = time.time()
        self.attempts += 1
        if self.attempts <= self.fail_first:
            return web.Response(status=503)
        expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("x-sidecar-signature", "")):
            self.bad_signatures += 1
        self.arrivals.append((at, json.loads(body)))
        if len(self.arrivals) >= self.expected:
            self.all_in.set()
        return web.Response(status=204)


async def run(args: Any, launcher: Launcher) -> dict[str, Any]:
    redis_server = launcher.redis()
    expected = args.identities * len(THRESHOLDS)
    receiver = Receiver(args.fail_first, expected)
    app = web.Application()
    app.router.add_post("/alerts", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    folder = launcher.folder("sidecars")
    config = folder / "sidecar.toml"
    notifier = {"name": "bench", "url": f"http://127.0.0.1:{port}/alerts", "secret": SECRET}
    config.write_text(toml_dumps({"notifiers": [notifier], "server": {"workers": 1}}))
    sidecars = [
        launcher.sidecar(f"sidecar-{n}", config, redis_server.url) for n in range(args.sidecars)
    ]
    client = Redis.from_url(redis_server.url)
    try:
        ids = await make_budgets(sidecars[0].port, args.identities)
        store = BudgetStore(client, Keys("sidecar"))
        budgets = await store.many(ids)
        keys = {b.id: store.bucket_keys(b, int(time.time() * 1000))[0] for b in budgets}
        await asyncio.sleep(2.5)  # every sidecar has loaded them (each checks once a second)
        log(f"{len(ids)} budgets made; crossing thresholds over {args.minute} s")
        charged = await cross(client, ids, keys, args.minute)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(receiver.all_in.wait(), 120)
        await asyncio.sleep(6)  # three more scans on every sidecar: nothing more may arrive
        return report(receiver, charged, expected, args)
    finally:
        await client.aclose()
        await runner.cleanup()


async def make_budgets(port: int, n: int) -> list[str]:
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=headers, limits=limits, timeout=30
    ) as api:

        async def one(i: int) -> str:
            r = await api.post(
                "/v2/budgets",
                json={
                    "scope": {"kind": "identity", "target": f"bench-user-{i}"},
                    "period": "one_time",
                    "token_limit": TOKENS,
                    "alerts": [{"threshold_percent": t} for t in THRESHOLDS],
                },
            )
            r.raise_for_status()
            made: str = r.json()["_id"]
            return made

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def cross(
    client: Redis, ids: list[str], keys: dict[str, str], minute: float
) -> dict[tuple[str, int], float]:
    """Each budget crosses 50% in the first half of the minute and 100% in the second."""
    plan: list[tuple[float, str, int, int]] = []  # (offset s, budget, threshold, tokens)
    half = minute / 2
    for i, budget_id in enumerate(ids):
        offset = i * half / len(ids)
        plan.append((offset, budget_id, 50, TOKENS // 2 + 10))
        plan.append((half + offset, budget_id, 100, TOKENS // 2 - 10))
    plan.sort()
    charged: dict[tuple[str, int], float] = {}
    start = time.monotonic()
    for offset, budget_id, threshold, tokens in plan:
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await client.incrby(keys[budget_id], tokens)
        charged[(budget_id, threshold)] = time.time()
    return charged


def report(
    receiver: Receiver, charged: dict[tuple[str, int], float], expected: int, args: Any
) -> dict[str, Any]:
    by_id = Counter(body["id"] for _, body in receiver.arrivals)
    first: dict[tuple[str, int], float] = {}
    pairs: Counter[tuple[str, int]] = Counter()
    for at, body in receiver.arrivals:
        pair = (body["budget"]["_id"], body["threshold_percent"])
        pairs[pair] += 1
        first.setdefault(pair, at)
    latencies = [int((at - charged[pair]) * 1e9) for pair, at in first.items() if pair in charged]
    return {
        "identities": args.identities,
        "sidecars": args.sidecars,
        "minute_s": args.minute,
        "fail_first": args.fail_first,
        "expected": expected,
        "delivered": len(first),
        "missing": expected - len(set(first) & set(charged)),
        "duplicate_ids": sum(n - 1 for n in by_id.values()),
        "duplicate_alerts": sum(n - 1 for n in pairs.values()),
        "bad_signatures": receiver.bad_signatures,
        "attempts": receiver.attempts,
        "latency": latency_stats(latencies),
    }


def measure(args: Any) -> cli.Outcome:
    with Launcher("alerts") as launcher:
        result = asyncio.run(run(args, launcher))
    lat = result["latency"]
    ok = (
        result["delivered"] == result["expected"]
        and result["missing"] == 0
        and result["duplicate_ids"] == result["duplicate_alerts"] == 0
        and result["bad_signatures"] == 0
    )
    result["exactly_once"] = ok
    lines = [
        "| alerts | delivered | missing | duplicates | attempts | p50 s | p90 s | p99 s | max s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['expected']:,} | {result['delivered']:,} | {result['missing']} "
        f"| {result['duplicate_ids'] + result['duplicate_alerts']} | {result['attempts']:,} "
        f"| {lat['p50_ms'] / 1000:.2f} | {lat['p90_ms'] / 1000:.2f} | {lat['p99_ms'] / 1000:.2f} "
        f"| {lat['max_ms'] / 1000:.2f} |",
        "",
        "every alert delivered exactly once" if ok else "NOT EXACTLY ONCE",
    ]
    return cli.Outcome(result, "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    add = p.add_argument
    add("--identities", type=cli.positive, default=1000)
    add("--minute", type=cli.positive, default=60, help="seconds the crossings are spread over")
    add("--sidecars", type=cli.positive, default=2)
    add("--fail-first", type=cli.non_negative, default=0, help="attempts answered 503 first")
    args = p.parse_args(argv)
    return cli.run(MODULE, "Budget alerts", args, argv, lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
