"""The limit check's own cost, in process: CPU and wall time per admission plus settlement, on
the hot line (one pipelined connection, hiredis in the protocol) against redis-py's pooled
path (the Coalescer's direct send), alternating in one run.

    .venv/bin/python -m bench.line_bench [--calls 5000] [--rounds 5]

Starts a private redis-server. Each call admits a request against a policy of three limits
(requests, tokens, dollars) with a reservation, then settles it, one after another: what a
limited request costs the sidecar's process besides forwarding. Prints per path the median
over rounds (and the spread) of microseconds of CPU and of wall time per admission+settlement.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence

from redis.asyncio import Redis

from bench.lib.processes import private_redis
from sidecar.quota.decision import Reserve, Subject
from sidecar.quota.limiter import Limiter
from sidecar.quota.policy import Dimension, Match, Policy, parse_limit
from sidecar.store.connect import connect
from sidecar.store.keys import Keys
from sidecar.store.scripts import Coalescer

POLICY = Policy(
    name="bench",
    match=Match(),
    limits=(
        parse_limit(Dimension.REQUESTS, "1000000000/minute"),
        parse_limit(Dimension.TOKENS, "1000000000000/hour"),
        parse_limit(Dimension.COST, "1000000000/day"),
    ),
    concurrency=None,
    source="bench",
)


def limiter(client: Redis, line: bool) -> Limiter:
    made = Limiter(client, Keys("bench"), timeout_ms=1000, on_error="deny", lease_s=60)
    if not line:  # redis-py's pooled path, as on a cluster or behind Sentinel
        made.line = None
        made._calls = Coalescer(client, made.script)
        made._settles = Coalescer(client, made.scripts[2])
    return made


async def round_of(made: Limiter, calls: int, tag: str) -> tuple[float, float]:
    subject = Subject(f"01BENCH{tag}", "bench", POLICY)
    cpu, wall = time.process_time(), time.perf_counter()
    for n in range(calls):
        request = f"{tag}-{n}"
        decision = await made.admit([subject], request, POLICY, Reserve(100, 1000))
        assert decision.admitted
        await made.settle([subject], request, 50, 500)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / calls * 1e6, wall / calls * 1e6


async def measure(url: str, calls: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {"line": [], "pooled": []}
    client = connect(url, timeout_ms=1000)
    assert isinstance(client, Redis)
    paths = {"line": limiter(client, True), "pooled": limiter(client, False)}
    for made in paths.values():
        for script in made.scripts:
            await script.load(client)
        await made.open()
        await round_of(made, 200, "warm")
    for r in range(rounds):
        for name, made in paths.items():
            results[name].append(await round_of(made, calls, f"{name}{r}"))
    for made in paths.values():
        await made.close()
    await client.aclose()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.line_bench", description=__doc__)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    with private_redis() as url:
        results = asyncio.run(measure(url, args.calls, args.rounds))
    print("path    CPU us/check (spread)      wall us/check (spread)", file=sys.stderr)
    for name, rows in results.items():
        cpu = [c for c, _ in rows]
        wall = [w for _, w in rows]
        print(
            f"{name:7} {statistics.median(cpu):7.1f} ({min(cpu):.1f}-{max(cpu):.1f})"
            f"      {statistics.median(wall):7.1f} ({min(wall):.1f}-{max(wall):.1f})",
            file=sys.stderr,
        )
    line = statistics.median(c for c, _ in results["line"])
    pooled = statistics.median(c for c, _ in results["pooled"])
    print(f"line / pooled CPU: {line / pooled:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
