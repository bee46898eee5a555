"""Throughput of the inline proxy with `[telemetry]` on and off, in one run.

    .venv/bin/python -m bench.telemetry_bench [--duration 10] [--repeats 5] [--sample-ratio 1]

Two sidecars (telemetry on, with a span per request exported over OTLP/HTTP to a receiver on
loopback, `python -m sidecar.testing.otlp`; telemetry off) on one private redis-server in front
of one mock upstream, beside the references (the bare aiohttp pass-through, bench/bare_proxy.py,
and an nginx hop when installed), saturated in turn with `wrk -t2 -c64` and the proxy bench's
chat bodies (body identities, 100 identities), the order rotating per repeat. Reports the
median requests/s and CPU per request of each, on / off, and how many spans the receiver got
against the requests answered. Everything started here is stopped on exit.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lib import cli, config, rounds
from bench.lib.processes import Launcher
from bench.lib.report import log, spread_text
from bench.lib.sampling import process_tree
from bench.lib.wrk import Load

MODULE = "bench.telemetry_bench"
EXPORTER = b"sidecar.observe.otel_export"
SETTINGS = ("on", "off")


def received(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as answer:
        counts: dict[str, int] = json.load(answer)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    cli.wrk_arguments(p, repeats=5, duration=10, connections=False)
    p.add_argument(
        "--sample-ratio",
        type=cli.between(0, 1, name="ratio"),
        default=1.0,
        help="[telemetry] sample_ratio",
    )
    p.add_argument("--limits", action="store_true", help="three limits per request")
    args = p.parse_args(argv)

    def measure() -> cli.Outcome:
        with Launcher("telemetry-bench-") as launcher:
            rig = rounds.rig(launcher, 100)
            redis = launcher.redis()
            otlp_port = launcher.otlp()
            sidecars = []
            for setting in SETTINGS:
                telemetry = {
                    "enabled": setting == "on",
                    "endpoint": f"http://127.0.0.1:{otlp_port}/v1/traces",
                    "sample_ratio": args.sample_ratio,
                }
                overrides = {"telemetry": telemetry} | config.limits(args.limits)
                path, _ = config.sidecar_config(launcher.folder(setting), overrides=overrides)
                sidecars.append(launcher.sidecar(setting, path, redis.url, rig.upstream, rig.probe))
            # The span exporter process the worker started, measured apart too (it is in
            # the worker's process tree, whose CPU is the `proxy` figure).
            exporters = [
                pid
                for pid in process_tree(sidecars[0].pid)
                if EXPORTER in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            rig.extra_pids["on"] = {"exporter": exporters}
            measured = rounds.measure(
                rig, sidecars, repeats=args.repeats, duration=args.duration, warmup=3, load=Load()
            )
            launcher.stop("on")  # its last spans go out as it shuts down
            time.sleep(0.5)
            spans = received(otlp_port)
        runs = measured["runs"]
        rps = {s: [float(r[s]["requests_per_s"]) for r in runs] for s in SETTINGS}
        cpu = {s: [r[s]["cpu"]["proxy_us_per_request"] for r in runs] for s in SETTINGS}
        exporter_us = [
            round(r["on"]["cpu"].get("exporter_cores", 0) / r["on"]["requests_per_s"] * 1e6, 1)
            for r in runs
        ]
        answered = sum(int(r["on"]["requests"]) for r in runs)
        on, off = statistics.median(rps["on"]), statistics.median(rps["off"])
        per_repeat = rounds.ratio_of(measured, "on", "off")
        result: dict[str, Any] = {
            "duration_s": args.duration,
            "repeats": args.repeats,
            "sample_ratio": args.sample_ratio,
            "limits": args.limits,
            **measured,
            "requests_per_s": rps,
            "cpu_us_per_request": cpu,
            "median_on": on,
            "median_off": off,
            "on_over_off": round(on / off, 3),
            "on_over_off_per_repeat": per_repeat,
            "cpu_median_on": round(statistics.median(cpu["on"])),
            "cpu_median_off": round(statistics.median(cpu["off"])),
            "exporter_pids": exporters,
            "exporter_us_per_request": exporter_us,
            "exporter_median_us": round(statistics.median(exporter_us)),
            # wrk's requests during the measured rounds; the receiver also got the warm-up's
            # and the probe's spans.
            "measured_requests_on": answered,
            "received": spans,
        }
        log(f"receiver: {spans['spans']:,} spans in {spans['exports']:,} exports")
        lines = [
            f"telemetry on / off **{spread_text(per_repeat, 2)}** (on {on:,.0f} requests/s, "
            f"off {off:,.0f}; CPU per request {result['cpu_median_on']} / "
            f"{result['cpu_median_off']} us, of which the span exporter process "
            f"{result['exporter_median_us']} us; sample_ratio {args.sample_ratio})",
            f"spans received: {spans['spans']:,} (in {spans['exports']:,} exports) for "
            f"{answered:,} requests measured with telemetry on, plus the warm-up",
            "",
            *rounds.table(measured, rig),
        ]
        return cli.Outcome(result, "\n".join(lines))

    return cli.run(MODULE, "Inline proxy with [telemetry] on and off", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
