"""Throughput of the inline proxy with `[server] metrics` on and off, in one run.

    .venv/bin/python -m bench.metrics_bench [--duration 10] [--repeats 5]

Two sidecars (metrics on, metrics off) on one private redis-server in front of one mock
upstream, beside the references (the bare aiohttp pass-through, bench/bare_proxy.py, and an
nginx hop when installed), saturated in turn with `wrk -t2 -c64` and the proxy bench's chat
bodies (body identities, 100 identities), the order rotating per repeat; then the same with
three limits per request (bench/limits-policy.toml). Reports the median requests/s and CPU per
request of each, on / off, and each sidecar's ratio to the references, taken per repeat.
Everything started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from bench.lib import cli, config, rounds
from bench.lib.processes import Launcher
from bench.lib.report import spread_text
from bench.lib.wrk import Load

MODULE = "bench.metrics_bench"
VARIANTS = ("plain", "limits")
SETTINGS = ("on", "off")


def variant(
    launcher: Launcher, rig: rounds.Rig, name: str, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    sidecars = []
    for metrics in SETTINGS:
        side = f"{name}-{metrics}"
        overrides = {"server": {"metrics": metrics == "on"}} | config.limits(name == "limits")
        path, _ = config.sidecar_config(launcher.folder(side), overrides=overrides)
        sidecars.append(launcher.sidecar(side, path, redis_url, rig.upstream, rig.probe))
    measured = rounds.measure(
        rig, sidecars, repeats=args.repeats, duration=args.duration, warmup=3, load=Load()
    )
    for target in sidecars:
        launcher.stop(target.name)
    runs = measured["runs"]
    rps = {m: [float(r[f"{name}-{m}"]["requests_per_s"]) for r in runs] for m in SETTINGS}
    cpu = {m: [r[f"{name}-{m}"]["cpu"]["proxy_us_per_request"] for r in runs] for m in SETTINGS}
    on, off = statistics.median(rps["on"]), statistics.median(rps["off"])
    return {
        **measured,
        "requests_per_s": rps,
        "cpu_us_per_request": cpu,
        "median_on": on,
        "median_off": off,
        "on_over_off": round(on / off, 3),
        "on_over_off_per_repeat": rounds.ratio_of(measured, f"{name}-on", f"{name}-off"),
        "cpu_median_on": round(statistics.median(cpu["on"])),
        "cpu_median_off": round(statistics.median(cpu["off"])),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    cli.wrk_arguments(p, repeats=5, duration=10, connections=False)
    args = p.parse_args(argv)

    def measure() -> cli.Outcome:
        result: dict[str, Any] = {"duration_s": args.duration, "repeats": args.repeats}
        lines: list[str] = []
        with Launcher("metrics-bench-") as launcher:
            rig = rounds.rig(launcher, 100)
            redis = launcher.redis()
            for name in VARIANTS:
                out = result[name] = variant(launcher, rig, name, redis.url, args)
                lines += [
                    f"{name}: metrics on / off **{spread_text(out['on_over_off_per_repeat'], 2)}**"
                    f" (on {out['median_on']:,.0f} requests/s, off {out['median_off']:,.0f}; CPU "
                    f"per request {out['cpu_median_on']} / {out['cpu_median_off']} us)",
                    "",
                    *rounds.table(out, rig),
                ]
        return cli.Outcome(result, "\n".join(lines))

    return cli.run(MODULE, "Inline proxy with /metrics on and off", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
