"""Limits under saturation: no check fails open, and the admitted count is exact.

    .venv/bin/python -m bench.exact_bench [--rounds 3] [--duration 10] [--identities 4] \\
        [--limit 2000] [--connections 64] [--sidecars 2] [--prefetch 32]

Starts a private redis-server, the mock upstream and `sidecar serve` with three limits per
request (requests per hour binding, tokens and dollars not), and per round drives wrk at
`--connections` against the sidecar with `--identities` fresh header identities, each sent far
more than `--limit` requests. Afterwards: the requests the sidecar admitted (each identity's
`total_requests`, read back from the identity API once the usage is written) must be exactly
`--limit` per identity; the limit checks that failed
(`sidecar_redis_limit_check_errors` in /metrics: each would have been forwarded unchecked with
`on_error = "allow"`) must be 0. The default `timeout_ms` (50 ms) and `on_error` are kept: the
point is that a saturated worker does not fail open with Redis healthy. `--sidecars 2` runs two
sidecars on the one Redis, each driven by its own wrk (half the connections) at once: the count
must be exact across them. `--prefetch N` sets `[limits] prefetch` (docs/policies.md): quota
held ahead per process must not admit one request more, nor strand any. The JSON goes to stdout
and bench/out/ (or --json FILE), the table to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.lib import cli
from bench.lib.client import admin_get, metric
from bench.lib.config import sidecar_config
from bench.lib.payloads import chat_body
from bench.lib.processes import Launcher
from bench.lib.report import log
from bench.lib.wrk import Load, run_wrk

MODULE = "bench.exact_bench"


def measure(args: Any) -> cli.Outcome:
    rounds = []
    with Launcher("exact") as launcher:
        redis = launcher.redis()
        upstream = launcher.mock()
        folder = launcher.folder("sidecar")
        policy = folder / "limits.toml"
        policy.write_text(
            '[[policy]]\nname = "exact"\n'
            f'requests = ["{args.limit}/hour"]\n'
            'tokens = ["1000000000/hour"]\ncost_usd = ["1000000/day"]\n'
        )
        overrides: dict[str, dict[str, Any]] = {"policies": {"paths": [str(policy)]}}
        if args.prefetch:
            overrides["limits"] = {"prefetch": args.prefetch}
        config, _ = sidecar_config(folder, overrides=overrides)
        sidecars = [
            launcher.sidecar(f"sidecar-{k}", config, redis.url, upstream)
            for k in range(args.sidecars)
        ]
        sidecar = sidecars[0]
        load = Load(
            max(1, args.threads // args.sidecars), max(1, args.connections // args.sidecars)
        )
        body = folder / "bodies.jsonl"
        body.write_bytes(chat_body(0, with_identity=False) + b"\n")
        for n in range(args.rounds):
            headers = folder / f"headers-{n}.txt"
            headers.write_text(
                "".join(f"X-ORQ-IDENTITY-ID: exact-{n}-{i}\n" for i in range(args.identities))
            )
            failed_before = sum(
                metric(s.port, "sidecar_redis_limit_check_errors") for s in sidecars
            )
            env = {"WRK_BODIES": str(body), "WRK_HEADERS": str(headers)}
            with ThreadPoolExecutor(len(sidecars)) as pool:
                runs = list(
                    pool.map(
                        lambda s, env=env: run_wrk(
                            f"http://127.0.0.1:{s.port}/v1/chat/completions",
                            args.duration,
                            load,
                            env=env,
                        )[0],
                        sidecars,
                    )
                )
            figures = {
                "requests": sum(r["requests"] for r in runs),
                "requests_per_s": sum(r["requests_per_s"] for r in runs),
                "p99_ms": max(r["p99_ms"] for r in runs),
                "socket_errors": sum(r["socket_errors"] for r in runs),
            }
            failed = (
                sum(metric(s.port, "sidecar_redis_limit_check_errors") for s in sidecars)
                - failed_before
            )
            time.sleep(1.0)  # usage is written within 300 ms of each answer
            per_identity = []
            for i in range(args.identities):
                record = admin_get(
                    sidecar.port, f"/v2/identities/exact-{n}-{i}?include_metrics=true"
                )
                per_identity.append(int(record["metrics"]["total_requests"]) if record else -1)
            admitted = sum(per_identity)
            expected = args.identities * args.limit
            row = {
                "round": n,
                "requests": figures["requests"],
                "requests_per_s": figures["requests_per_s"],
                "p99_ms": figures["p99_ms"],
                "admitted": admitted,
                "expected": expected,
                "per_identity": per_identity,
                "exact": all(a == args.limit for a in per_identity),
                "failed_open": int(failed),
                "socket_errors": figures["socket_errors"],
            }
            log(f"round {n}: {row}")
            rounds.append(row)
    ok = all(r["exact"] and r["failed_open"] == 0 for r in rounds)
    lines = [
        "| round | requests | req/s | p99 ms | admitted | expected | failed open |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['round']} | {r['requests']:,} | {r['requests_per_s']:,.0f} | {r['p99_ms']:.1f} "
            f"| {r['admitted']:,} | {r['expected']:,} | {r['failed_open']} |"
            for r in rounds
        ),
        "",
        "exact and never failed open" if ok else "NOT EXACT or FAILED OPEN",
    ]
    result = {"rounds": rounds, "ok": ok, "limit": args.limit, "identities": args.identities}
    return cli.Outcome(result, "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    add = p.add_argument
    add("--rounds", type=cli.positive, default=3)
    add("--duration", type=cli.positive, default=10, help="seconds of wrk per round")
    add("--identities", type=cli.positive, default=4)
    add("--limit", type=cli.positive, default=1000, help="requests per hour per identity")
    add("--connections", type=cli.positive, default=64)
    add("--threads", type=cli.positive, default=2)
    add("--sidecars", type=cli.positive, default=1, help="sidecars on the one Redis")
    add("--prefetch", type=cli.non_negative, default=0, help="[limits] prefetch")
    args = p.parse_args(argv)
    return cli.run(MODULE, "Limits under saturation", args, argv, lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
