"""The first burst after a cold start: 100 concurrent limit checks (POST /hooks/authorize, three
limits each) sent the moment a freshly started `sidecar serve` is ready.

    .venv/bin/python -m bench.warm_bench [--repeats 10] [--burst 100] [--baseline DIR]
                                         [--warm-connections N]

Starts a private redis-server; a first sidecar creates the burst's identities (so each burst
finds them in Redis, as after a restart) and is stopped. Then, per repeat, a new sidecar is
started, the burst's connections are opened, and every request is written at once: the time to
the last answer, and the Redis connections opened meanwhile, are the figures. A second burst on
the same, now warm, process is the reference. `--baseline DIR` runs another checkout's sidecar
(e.g. `git worktree add /tmp/before <commit>`) in the same repeats, alternating with this one;
`--warm-connections N` sets this checkout's `[redis] warm_connections` (not the baseline's).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.lib import cli, config
from bench.lib.payloads import ADMIN_TOKEN, IDENTITY_HEADER
from bench.lib.processes import ROOT, Launcher
from bench.lib.report import log, spread, spread_text, table
from sidecar.testing.rawhttp import read_message

MODULE = "bench.warm_bench"
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


def request(k: int) -> bytes:
    return (
        b"POST /hooks/authorize HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\n"
        b"x-sidecar-token: %s\r\n%s: warm-user-%d\r\ncontent-length: %d\r\n\r\n%s"
        % (ADMIN_TOKEN.encode(), IDENTITY_HEADER.encode(), k, len(BODY), BODY)
    )


async def _answer(reader: asyncio.StreamReader) -> int:
    head, _ = await read_message(reader)
    return int(head.split(b" ", 2)[1])


async def _burst(port: int, size: int) -> tuple[float, list[int]]:
    """Milliseconds from writing `size` requests at once (on connections opened before) to the
    last answer, and the statuses."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(size)]
    await asyncio.sleep(0.2)  # every connection accepted before the clock starts
    try:
        started = time.perf_counter()
        for k, (_, writer) in enumerate(conns):
            writer.write(request(k))
        statuses = await asyncio.wait_for(
            asyncio.gather(*(_answer(reader) for reader, _ in conns)), timeout=60
        )
        return (time.perf_counter() - started) * 1000, list(statuses)
    finally:
        for _, writer in conns:
            writer.close()


def burst(port: int, size: int, store: redis.Redis) -> dict[str, float]:
    before = int(store.info("stats")["total_connections_received"])
    ms, statuses = asyncio.run(_burst(port, size))
    opened = int(store.info("stats")["total_connections_received"]) - before
    if statuses != [200] * size:
        raise RuntimeError(f"the burst was not admitted whole: {sorted(set(statuses))}")
    return {"ms": ms, "store_connections_opened": opened}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    p.add_argument("--repeats", type=cli.positive, default=10, help="cold starts per checkout")
    p.add_argument("--burst", type=cli.positive, default=100, help="concurrent limit checks")
    p.add_argument("--baseline", default=None, help="another checkout to measure alike")
    p.add_argument(
        "--warm-connections", type=cli.non_negative, default=None, help="this checkout's"
    )
    args = p.parse_args(argv)
    trees = {"this": ROOT}
    if args.baseline:
        trees = {"baseline": Path(args.baseline).resolve(), **trees}

    def measure() -> cli.Outcome:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        with Launcher("warm-bench-") as launcher:
            server = launcher.redis()
            store = redis.Redis.from_url(server.url)
            base, _ = config.sidecar_config(launcher.folder("baseline"), overrides=config.limits())
            this = base
            if args.warm_connections is not None:
                redis_table = {"warm_connections": args.warm_connections}
                overrides = {**config.limits(), "redis": redis_table}
                this, _ = config.sidecar_config(launcher.folder("this"), overrides=overrides)
            configs = {"baseline": base, "this": this}
            seed = launcher.sidecar("seed", base, server.url)
            burst(seed.port, args.burst, store)  # the identities exist from here on
            launcher.stop("seed")
            for index in range(args.repeats):
                for name, tree in trees.items():
                    label = f"{name}-{index}"
                    target = launcher.sidecar(label, configs[name], server.url, cwd=tree)
                    cold = burst(target.port, args.burst, store)
                    warm = burst(target.port, args.burst, store)
                    launcher.stop(label)
                    runs[name].append({"cold": cold, "warm": warm})
                    log(
                        f"{label}: first burst {cold['ms']:.1f} ms "
                        f"({cold['store_connections_opened']} store connections opened), "
                        f"second {warm['ms']:.1f} ms"
                    )
            store.close()
        summary: dict[str, Any] = {}
        rows = []
        for name, done in runs.items():
            entry = {
                "first_burst_ms": spread([r["cold"]["ms"] for r in done]),
                "second_burst_ms": spread([r["warm"]["ms"] for r in done]),
                "first_over_second": spread([r["cold"]["ms"] / r["warm"]["ms"] for r in done]),
                "store_connections_opened_in_first": spread(
                    [r["cold"]["store_connections_opened"] for r in done]
                ),
            }
            summary[name] = entry
            rows.append(
                [
                    f"{name} ({trees[name]})",
                    spread_text(entry["first_burst_ms"], 1),
                    spread_text(entry["second_burst_ms"], 1),
                    spread_text(entry["first_over_second"], 2),
                    spread_text(entry["store_connections_opened_in_first"], 0),
                ]
            )
        header = ["sidecar", "first burst ms", "second burst ms", "first / second", "opened"]
        text = [
            f"{args.burst} concurrent POST /hooks/authorize (three limits each, identities "
            f"already in Redis) on a sidecar just started, then again on the same process; "
            f"{args.repeats} cold starts each, median (min-max). 'opened': Redis connections "
            "the first burst opened.",
            "",
            *table(header, rows),
        ]
        if args.baseline:
            before = statistics.median(r["cold"]["ms"] for r in runs["baseline"])
            after = statistics.median(r["cold"]["ms"] for r in runs["this"])
            summary["this_over_baseline_first_burst"] = round(after / before, 3)
            text.append(f"first burst, this / baseline (medians): {after / before:.2f}")
        return cli.Outcome({"runs": runs, "summary": summary}, "\n".join(text))

    return cli.run(MODULE, "First burst after a cold start", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
