"""Requests of identities that were idle: the path most production traffic takes.

    .venv/bin/python -m bench.idle_bench [--repeats 3] [--identities 50] [--rounds 3] \\
        [--gap-ms 210] [--sidecar-config bench/limits-prefetch.toml]

bench.proxy_bench sends requests back to back: its 100 identities come round every 50 ms or so,
so every limit check after the first is answered from quota the process holds ahead
(`[limits] prefetch`), and every step runs with the processes' caches warm. Production traffic
is more often many identities that each call now and then. Here each of `--identities`
identities sends one chat request (body identity) per round to every target in turn, the order
rotating, with `--gap-ms` of silence after each identity's requests: an identity comes round
every identities x gap (10.5 s by default, longer than quota is held ahead, 1 s, and than a
policy's profile is remembered, 10 s), and the machine idles between requests, as a sidecar
that is not saturated does. The first round creates the identities and is not counted.

Four targets, in one run: direct (the mock upstream), the bare pass-through, `sidecar serve`
without limits, and `sidecar serve` with `--sidecar-config` (three limits, prefetch 32 by
default), each sidecar on its own database of one private Redis. Per repeat: the p50 and p90
each adds over direct, and each sidecar's added p50 over the bare pass-through's. Everything
started is stopped on exit; requests go only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lib import cli
from bench.lib.client import LeanClient, Target, rotated
from bench.lib.config import ROOT, sidecar_config
from bench.lib.meta import bare_description
from bench.lib.payloads import CHAT_PATH, Scenario, scenarios
from bench.lib.processes import Launcher
from bench.lib.report import log, percentile, ratio, rnd, spread, spread_text, table

MODULE = "bench.idle_bench"
SIDECARS = ("plain", "limits")


def parser() -> argparse.ArgumentParser:
    p = cli.parser(MODULE, __doc__)
    p.add_argument("--repeats", type=cli.positive, default=3, help="measurements")
    p.add_argument("--identities", type=cli.positive, default=50, help="identities per round")
    p.add_argument("--rounds", type=cli.positive, default=3, help="counted rounds per repeat")
    p.add_argument(
        "--gap-ms",
        type=cli.between(0, 60_000, "ms", "gap"),
        default=210.0,
        help="silence after each identity",
    )
    p.add_argument(
        "--sidecar-config",
        default=str(ROOT / "bench" / "limits-prefetch.toml"),
        help="the config TOML of the sidecar with limits",
    )
    return p


def measure_idle(
    targets: Sequence[Target], scenario: Scenario, args: argparse.Namespace, rounds: int
) -> dict[str, list[float]]:
    """Milliseconds per request and target, `rounds` rounds of every identity."""
    clients = {t.name: LeanClient(t.port) for t in targets}
    took: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for round_no in range(rounds):
            for k in range(args.identities):
                request = scenario.request(k)
                for target in rotated(targets, round_no * args.identities + k):
                    began = time.perf_counter_ns()
                    status, _ = clients[target.name].post(CHAT_PATH, request.body, request.headers)
                    elapsed = time.perf_counter_ns() - began
                    if status != 200:
                        raise RuntimeError(f"{target.name} answered {status}")
                    took[target.name].append(elapsed / 1e6)
                time.sleep(args.gap_ms / 1000)
    finally:
        for client in clients.values():
            client.close()
    return took


def one_repeat(
    targets: Sequence[Target], scenario: Scenario, args: argparse.Namespace
) -> dict[str, Any]:
    took = measure_idle(targets, scenario, args, args.rounds)
    ordered = {name: sorted(values) for name, values in took.items()}
    direct = {q: percentile(ordered["direct"], q) for q in (50, 90)}
    run: dict[str, Any] = {"requests": len(took["direct"])}
    for name, values in ordered.items():
        if name != "direct":
            run[name] = {f"p{q}": rnd(percentile(values, q) - direct[q]) for q in (50, 90)}
    for name in SIDECARS:
        run[f"{name}_over_bare_p50"] = ratio(run[name]["p50"], run["bare"]["p50"])
    log(
        f"  added p50 ms: bare {run['bare']['p50']}, plain {run['plain']['p50']}, "
        f"limits {run['limits']['p50']}"
    )
    return run


def summary(result: dict[str, Any]) -> str:
    runs = result["runs"]
    rows = []
    for name in ("bare", *SIDECARS):
        rows.append(
            [
                f"added p50 (ms), {name}",
                spread_text(spread([r[name]["p50"] for r in runs])),
                spread_text(spread([r[name]["p90"] for r in runs])),
            ]
        )
    for name in SIDECARS:
        ratios = [r[f"{name}_over_bare_p50"] for r in runs if r[f"{name}_over_bare_p50"]]
        text = spread_text(spread(ratios)) if ratios else "-"
        rows.append([f"{name} / bare, added p50", text, "-"])
    lines = [
        f"{result['identities']} identities, each idle {result['idle_s']} s between its "
        f"requests; {result['runs'][0]['requests']} requests per target and repeat"
    ]
    lines += table(["figure", "p50: median (range over repeats)", "added p90, likewise"], rows)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if not Path(args.sidecar_config).is_file():
        raise SystemExit(f"--sidecar-config {args.sidecar_config}: no such file")

    def measure() -> cli.Outcome:
        with Launcher("idle-bench-") as launcher:
            upstream = launcher.mock()
            scenario = scenarios(args.identities)["chat_body_identity"]
            launcher.checked(upstream, "the mock upstream", scenario)
            bare = launcher.bare(upstream, scenario)
            redis = launcher.redis()
            sides = []
            configs = (None, args.sidecar_config)
            for db, (name, source) in enumerate(zip(SIDECARS, configs, strict=True)):
                config, _ = sidecar_config(launcher.folder(name), source)
                url = redis.url.rpartition("/")[0] + f"/{db}"
                sides.append(launcher.sidecar(name, config, url, upstream, scenario))
            targets = [upstream, bare, *sides]
            log(f"first round: {args.identities} identities created, not counted")
            measure_idle(targets, scenario, args, 1)
            runs = []
            for index in range(args.repeats):
                log(f"repeat {index + 1}/{args.repeats}: {args.rounds} rounds")
                runs.append(one_repeat(targets, scenario, args))
            result: dict[str, Any] = {
                "bare": bare_description(),
                "identities": args.identities,
                "idle_s": round(args.identities * args.gap_ms / 1000, 2),
                "runs": runs,
            }
        return cli.Outcome(result, summary(result))

    return cli.run(MODULE, "Idle identities: added latency", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
