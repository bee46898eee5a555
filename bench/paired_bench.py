"""Two versions of the sidecar served at once and measured side by side: is a change faster?

    .venv/bin/python -m bench.paired_bench --baseline HEAD~1 \\
        [--sidecar-config bench/limits-prefetch.toml] [--repeats 3] [--requests 3000] \\
        [--duration 6] [--wrk-repeats 4]

On a shared machine whose speed drifts by more than a change moves, ratios of whole benchmark
runs taken an hour apart cannot tell a few percent. Here both versions run in the same minutes:
`--baseline` (a git revision, whose tree is exported to a temporary folder, or a folder holding
another checkout) and this checkout, each a `sidecar serve` with the same config, before the same
mock upstream, each on its own database of one private Redis, beside the bare pass-through.

- Sequential: a Python keep-alive client (as users' SDKs call), one connection per target, the
  targets interleaved in blocks of `--block` requests, their order rotating each block; the p50
  and p90 added over the upstream, per repeat.
- Streams (`--streams N`): sequential SSE streams of 20 chunks 5 ms apart, blocks of 10
  alternating; the time to the first body byte added over the upstream's, per repeat.
- Saturation: wrk with 64 connections against each sidecar in turn (the order alternating),
  requests/s and the CPU each sidecar spent per request (its process tree's CPU time over the
  requests answered: the steadiest of these figures when the machine is busy).

The summary gives, per repeat, this checkout's figure over the baseline's; the spread of those
ratios is the evidence. Everything started is stopped on exit; load goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lib import cli
from bench.lib.client import Target, measure_sequential, measure_streams, rotated
from bench.lib.config import ROOT
from bench.lib.meta import bare_description
from bench.lib.payloads import API_KEY, CHAT_PATH, scenario_named, scenarios
from bench.lib.processes import Launcher
from bench.lib.report import log, ratio, rnd, spread, spread_text, table
from bench.lib.sampling import CpuMeter
from bench.lib.wrk import Load, require_wrk, saturate

MODULE = "bench.paired_bench"
NAMES = ("baseline", "change")


def parser() -> argparse.ArgumentParser:
    p = cli.parser(MODULE, __doc__)
    p.add_argument("--baseline", required=True, help="a git revision, or a checkout's folder")
    p.add_argument("--sidecar-config", help="the config TOML both sidecars start from")
    p.add_argument("--scenario", default="chat_body_identity", help="the sequential requests")
    p.add_argument("--repeats", type=cli.positive, default=3, help="sequential measurements")
    p.add_argument("--requests", type=cli.positive, default=3000, help="per target and repeat")
    p.add_argument("--warmup", type=cli.non_negative, default=300, help="per target and repeat")
    p.add_argument("--block", type=cli.positive, default=100, help="requests before switching")
    p.add_argument("--streams", type=cli.non_negative, default=0, help="per target and repeat")
    p.add_argument("--wrk-repeats", type=cli.non_negative, default=4, help="saturation rounds")
    p.add_argument("--duration", type=cli.positive, default=6, help="seconds of each wrk run")
    p.add_argument("--connections", type=cli.positive, default=64, help="wrk connections")
    p.add_argument("--identities", type=cli.positive, default=100, help="bench identities")
    return p


def baseline_tree(spec: str, scratch: Path) -> tuple[Path, str]:
    """The baseline's source tree and what it is: a folder as given, else the git revision's
    tree exported (not checked out: this checkout's state is left alone)."""
    folder = Path(spec)
    if folder.is_dir():
        return folder.resolve(), f"the checkout in {folder.resolve()}"
    rev = subprocess.run(
        ["git", "rev-parse", "--short", f"{spec}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if rev.returncode != 0:
        raise SystemExit(f"--baseline {spec!r} is neither a folder nor a git revision")
    commit = rev.stdout.strip()
    archive = scratch / "baseline.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", commit], cwd=ROOT, stdout=out, check=True)
    tree = scratch / "baseline"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree, f"commit {commit}"


def answered_ok(name: str, entry: dict[str, Any]) -> None:
    """Every request answered 2xx (a keep-alive connection the server closed while the other
    targets ran is only opened again; an incomplete stream or an error status is fatal)."""
    fatal = {k: n for k, n in entry.get("error_kinds", {}).items() if "Error" not in k}
    if fatal:
        raise RuntimeError(f"{name} answered errors: {fatal}")


def with_ratios(run: dict[str, Any], figure: str, suffix: str) -> None:
    """Add to `run` (a figure per target) this checkout's over the baseline's and each
    sidecar's over the bare pass-through's."""
    run[f"change_over_baseline_{suffix}"] = ratio(run["change"][figure], run["baseline"][figure])
    for name in NAMES:
        run[f"{name}_over_bare_{suffix}"] = ratio(run[name][figure], run["bare"][figure])


def sequential(
    targets: list[Target], args: argparse.Namespace, scenario: Any
) -> list[dict[str, Any]]:
    runs = []
    for index in range(args.repeats):
        log(f"sequential {index + 1}/{args.repeats}: {args.requests} requests per target")
        figures = measure_sequential(targets, scenario, args.requests, args.warmup, args.block)
        direct = figures["direct"]
        run: dict[str, Any] = {}
        for name, entry in figures.items():
            if name == "direct":
                continue
            answered_ok(name, entry)
            run[name] = {q: rnd(entry[f"{q}_ms"] - direct[f"{q}_ms"]) for q in ("p50", "p90")}
        with_ratios(run, "p50", "p50")
        log(
            f"  added p50 ms: bare {run['bare']['p50']}, baseline {run['baseline']['p50']}, "
            f"change {run['change']['p50']} (change/baseline {run['change_over_baseline_p50']})"
        )
        runs.append(run)
    return runs


def streams(targets: list[Target], args: argparse.Namespace, scenario: Any) -> list[dict[str, Any]]:
    runs = []
    for index in range(args.repeats if args.streams else 0):
        log(f"streams {index + 1}/{args.repeats}: {args.streams} per target")
        figures = measure_streams(targets, scenario, args.streams, 5, 10)
        direct = figures["direct"]["ttfb"]["p50_ms"]
        run: dict[str, Any] = {}
        for name, entry in figures.items():
            if name != "direct":
                answered_ok(name, entry)
                run[name] = {"ttfb_p50": rnd(entry["ttfb"]["p50_ms"] - direct)}
        with_ratios(run, "ttfb_p50", "ttfb")
        log(
            f"  stream first byte added, ms: bare {run['bare']['ttfb_p50']}, baseline "
            f"{run['baseline']['ttfb_p50']}, change {run['change']['ttfb_p50']}"
        )
        runs.append(run)
    return runs


def saturation(
    sides: list[Target], args: argparse.Namespace, env: dict[str, str]
) -> list[dict[str, Any]]:
    runs = []
    for index in range(args.wrk_repeats):
        order = rotated(sides, index)
        run: dict[str, Any] = {"order": [t.name for t in order]}
        for target in order:
            meter = CpuMeter(trees={"proxy": target.pid})
            figures = saturate(
                target, CHAT_PATH, args.duration, Load(2, args.connections), env, meter
            )
            if figures.get("http_errors"):
                raise RuntimeError(f"{target.name} answered {figures['http_errors']} errors")
            run[target.name] = {
                "requests_per_s": figures["requests_per_s"],
                "p99_ms": figures["p99_ms"],
                "cpu_us_per_request": figures["cpu"]["proxy_us_per_request"],
            }
        for key in ("requests_per_s", "p99_ms", "cpu_us_per_request"):
            run[f"change_over_baseline_{key}"] = ratio(run["change"][key], run["baseline"][key])
        log(
            f"saturation {index + 1}/{args.wrk_repeats}: requests/s "
            f"{run['baseline']['requests_per_s']:,.0f} / {run['change']['requests_per_s']:,.0f}, "
            f"CPU per request {run['baseline']['cpu_us_per_request']} / "
            f"{run['change']['cpu_us_per_request']} us (baseline / change)"
        )
        runs.append(run)
    return runs


def summary(result: dict[str, Any]) -> str:
    rows: list[list[str]] = []

    def row(what: str, values: Sequence[float | None]) -> None:
        given = [v for v in values if v is not None]
        rows.append([what, spread_text(spread(given)) if given else "-"])

    seq, sat = result["sequential"], result["saturation"]
    row("added p50, change / baseline", [r["change_over_baseline_p50"] for r in seq])
    row("added p50, baseline / bare", [r["baseline_over_bare_p50"] for r in seq])
    row("added p50, change / bare", [r["change_over_bare_p50"] for r in seq])
    for run_key, what in (
        ("change_over_baseline_ttfb", "stream first byte added, change / baseline"),
        ("baseline_over_bare_ttfb", "stream first byte added, baseline / bare"),
        ("change_over_bare_ttfb", "stream first byte added, change / bare"),
    ):
        if result["streams"]:
            row(what, [r[run_key] for r in result["streams"]])
    if sat:
        for key, what in (
            ("requests_per_s", "saturation requests/s"),
            ("cpu_us_per_request", "CPU per request at saturation"),
            ("p99_ms", "p99 at saturation"),
        ):
            row(f"{what}, change / baseline", [r[f"change_over_baseline_{key}"] for r in sat])
    lines = [f"baseline: {result['baseline']}; change: this checkout"]
    lines += table(["figure", "median (range over repeats)"], rows)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    require_wrk()

    def measure() -> cli.Outcome:
        with tempfile.TemporaryDirectory(prefix="paired-bench-src-") as scratch:
            tree, described = baseline_tree(args.baseline, Path(scratch))
            with Launcher("paired-bench-") as launcher:
                upstream = launcher.mock()
                chosen = scenarios(args.identities)
                scenario = scenario_named(args.identities, args.scenario)
                launcher.checked(upstream, "the mock upstream", scenario)
                bare = launcher.bare(upstream, scenario)
                trees = [("baseline", tree), ("change", ROOT)]
                sides = launcher.sidecars(
                    trees, args.sidecar_config, launcher.redis(), upstream, scenario
                )
                bodies = chosen["chat_body_identity"].write_bodies(
                    launcher.workdir / "bodies.jsonl"
                )
                env = {"WRK_BODIES": str(bodies), "WRK_API_KEY": API_KEY}
                result: dict[str, Any] = {
                    "baseline": described,
                    "bare": bare_description(),
                    "sequential": sequential([upstream, bare, *sides], args, scenario),
                    "streams": streams([upstream, bare, *sides], args, chosen["stream_chat"]),
                    "saturation": saturation(sides, args, env),
                }
        return cli.Outcome(result, summary(result))

    return cli.run(
        MODULE, "Paired comparison: this checkout against a baseline", args, argv, measure
    )


if __name__ == "__main__":
    raise SystemExit(main())
