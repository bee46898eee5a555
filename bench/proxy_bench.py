"""Inline proxy overhead: added latency, saturation, stream time to first byte, worker RSS.

    .venv/bin/python -m bench.proxy_bench [--repeats 3] [--duration 10] [--workers 1] [--soak 0] \\
        --markdown bench/out/proxy.md

Four targets, all in one run so that ratios come from the same conditions:

- direct:  the mock upstream (`sidecar mock-upstream`),
- nginx:   one nginx worker proxying to that mock (the floor for a proxy hop), when installed,
- bare:    `bench/bare_proxy.py`, a raw ASGI pass-through on the sidecar's stack (uvicorn,
           uvloop, httptools, one pooled aiohttp session) in front of that mock: the floor for
           any Python proxy on this machine,
- sidecar: `sidecar serve` in inline mode in front of that mock, on a private redis-server.

Per repeat: sequential requests on one keep-alive connection per target (chat completion with a
body identity, the same with the identity header, an embedding), interleaved in blocks so that
drift on a shared machine hits every target alike; the same with wrk as the client
(`--wrk-sequential`); sequential SSE streams (time to first and last body byte); then `wrk` at
64 connections against each target in turn, sampling the sidecar's RSS. `--soak SECONDS` adds
one long `wrk` run against the sidecar with RSS sampled every second.

Everything started here is stopped on exit, error or Ctrl-C; load goes only to 127.0.0.1. The
summary table (the sidecar against the references, as ratios) and progress go to stderr, the
JSON to stdout and bench/out/ (or --json FILE).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bench.lib import cli
from bench.lib.config import parse_env_pairs
from bench.lib.proxy import TARGETS, Options, run_benchmark
from bench.lib.proxy_report import render_markdown, summary_table

MODULE = "bench.proxy_bench"


# The numeric flags: name, type, default, help.
NUMBERS: tuple[tuple[str, Callable[[str], Any], int | float | None, str], ...] = (
    ("--requests", cli.positive, 2000, "sequential requests per target and request kind"),
    ("--warmup", cli.non_negative, 200, "warm-up requests per target before each measurement"),
    ("--block", cli.positive, 100, "requests per target before switching to the next"),
    ("--streams", cli.positive, 200, "streams per target per run"),
    ("--stream-chunks", cli.non_negative, 20, "x-mock-chunks for the streams"),
    ("--chunk-delay-ms", float, 5.0, "x-mock-chunk-delay-ms for the streams"),
    ("--threads", cli.positive, 2, "wrk threads"),
    ("--identities", cli.positive, 100, "bench identities cycled through"),
    ("--workers", cli.positive, None, "sidecar [server] workers (default: the config's, else 1)"),
    ("--soak", cli.non_negative, 0, "seconds of wrk on the sidecar, RSS and Redis memory sampled"),
    ("--wrk-sequential", cli.non_negative, 5, "seconds of wrk -c1 per target and run (0: skip)"),
    ("--rss-interval", cli.interval, 1.0, "seconds between RSS samples"),
)


def parser() -> argparse.ArgumentParser:
    p = cli.parser(MODULE, __doc__)
    cli.wrk_arguments(p, repeats=3, duration=10)
    for flag, kind, default, text in NUMBERS:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument(
        "--server", choices=["uvicorn", "granian"], help="SIDECAR_SERVER for the sidecar"
    )
    p.add_argument("--sidecar-config", help="a sidecar config TOML to start from (policies, ...)")
    p.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the sidecar (repeatable)",
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of direct,nginx,bare,sidecar (direct is required)",
    )
    p.add_argument("--log-dir", help="keep the targets' logs and configs under this folder")
    return p


def options(args: argparse.Namespace, argv: Sequence[str]) -> Options:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target(s): {', '.join(unknown)}")
    try:
        parse_env_pairs(args.sidecar_env)  # fail before starting anything
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    fields = {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "targets")}
    return Options(**fields, targets=targets, command=cli.command_line(MODULE, argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    opts = options(args, argv)

    def measure() -> cli.Outcome:
        result = run_benchmark(opts)
        summary = summary_table(result)
        return cli.Outcome(result, "\n".join(summary), render_markdown(result))

    return cli.run(MODULE, "Inline proxy benchmark", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
