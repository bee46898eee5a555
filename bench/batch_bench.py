"""The usage writer's batches, in process: the client's CPU per usage entry written through
redis-py's pipeline against `sidecar.store.scripts.batch` (the calls packed at once on one
connection, their replies read under one deadline), alternating in one run.

    .venv/bin/python -m bench.batch_bench [--entries 40] [--batches 300] [--rounds 5]

Starts a private redis-server. Each batch writes `--entries` usage entries (one identity,
hour and model each, as the inline proxy's write-behind flushes them under load) with the
real record script and arguments. Prints per path the median over rounds (and the spread) of
microseconds of this process's CPU per entry; Redis's own time is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis

from bench.lib.processes import private_redis
from sidecar.store.connect import connect
from sidecar.store.keys import Keys
from sidecar.store.scripts import Call, batch, pipeline
from sidecar.usage.ranking import Rankings
from sidecar.usage.spool import Entry
from sidecar.usage.writer import UsageWriter, writer_floor

KEYS = Keys("bench")


class _Known:
    async def ensure(self, external_id: str, profile: object) -> str:
        return external_id

    def forget(self, external_id: str) -> None:
        pass


def calls_for(writer: UsageWriter, entries: int, seq: int) -> list[Call]:
    now = time.time()
    counters = {"r": 1, "i": 120, "o": 40, "c": 5_000, "sh": 1}
    made = [
        Entry(at=now, source="body", counters=counters, identity=f"01BENCH{n:04d}",
              writer="01JBENCHWRITER000000000000", seq=seq + n, model="gpt-4o-mini")
        for n in range(entries)
    ]  # fmt: skip
    return [writer._call(entry, now, writer_floor(now)) for entry in made]


async def round_of(path: Callable[[list[Call]], Awaitable[Any]], writer: UsageWriter,
                   entries: int, batches: int, seq: int) -> float:  # fmt: skip
    work = [calls_for(writer, entries, seq + b * entries) for b in range(batches)]
    cpu = time.process_time()
    for calls in work:
        await path(calls)
    return (time.process_time() - cpu) / (batches * entries) * 1e6


async def measure(url: str, entries: int, batches: int, rounds: int) -> dict[str, list[float]]:
    client = connect(url, timeout_ms=5000)
    assert isinstance(client, Redis)
    writer = UsageWriter(client, KEYS, _Known(), Rankings(client, KEYS))
    script = writer.script
    await script.load(client)

    async def pipelined(calls: list[Call]) -> Any:
        def queue(pipe: Any) -> None:
            for keys, args in calls:
                script.queue(pipe, keys, args)

        return await pipeline(client, queue, [script])

    async def batched(calls: list[Call]) -> Any:
        return await batch(client, script, calls)

    paths = {"pipeline": pipelined, "batch": batched}
    results: dict[str, list[float]] = {name: [] for name in paths}
    seq = 1
    for path in paths.values():  # warm
        await round_of(path, writer, entries, 20, seq)
        seq += 20 * entries
    for _ in range(rounds):
        for name, path in paths.items():
            results[name].append(await round_of(path, writer, entries, batches, seq))
            seq += batches * entries
    await client.aclose()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.batch_bench", description=__doc__)
    p.add_argument("--entries", type=int, default=40)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    with private_redis() as url:
        results = asyncio.run(measure(url, args.entries, args.batches, args.rounds))
    print("path      CPU us/entry (spread)", file=sys.stderr)
    for name, rows in results.items():
        print(
            f"{name:9} {statistics.median(rows):6.1f} ({min(rows):.1f}-{max(rows):.1f})",
            file=sys.stderr,
        )
    ratio = statistics.median(results["batch"]) / statistics.median(results["pipeline"])
    print(f"batch / pipeline CPU: {ratio:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
