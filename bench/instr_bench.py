"""Instructions per request, counted by callgrind: the sidecar against the bare pass-through.

    .venv/bin/python -m bench.instr_bench [--requests 300] [--repeats 2] \\
        [--sidecar-config bench/limits-prefetch.toml] [--baseline REV|DIR] [--redis]

Timing on a shared machine drifts by more than most single changes move (bench.paired_bench's
A/A floor is 1-3%); instructions executed do not. The bare pass-through and the sidecar (and,
with `--baseline`, the sidecar at another revision or checkout, exported as bench.paired_bench
does) each run under `valgrind --tool=callgrind` with counting off, in front of one mock upstream
that runs normally, on a private Redis. Per target and repeat: warm-up requests uncounted, then
counting on, `--requests` sequential requests on one keep-alive connection, `--pause-ms` apart
(so that what each sets off in the background is over before the next: the count repeats to a
fraction of a percent, where requests back to back overlap their timers differently each run), the
count dumped (`callgrind_control`), counting off again. The figure is the process's instructions
over the requests answered, all of its work included: the event loop, the HTTP server, the
upstream client, and what the sidecar does in the background for those requests. With `--redis`
the private Redis runs under callgrind too, and is counted over each sidecar's window: what that
sidecar's requests cost the store shared by every sidecar (the bare pass-through uses none).

What it is not: a latency or a throughput. Under callgrind a process runs some 50 times slower
while timers keep their wall-clock periods, so work that runs on a timer (the usage writer's
100 ms flush) is paid once per request, as under light traffic, where under load many requests
share it. Cache misses and system calls weigh nothing here. Use it to tell whether a
change does less work, to a fraction of a percent, and the timed benchmarks for what it is worth.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lib import cli
from bench.lib.client import ClientError, LeanClient, Target
from bench.lib.config import ROOT
from bench.lib.meta import bare_description
from bench.lib.payloads import Scenario, scenario_named
from bench.lib.processes import Launcher
from bench.lib.report import log, ratio, spread, spread_text, table
from bench.paired_bench import baseline_tree

MODULE = "bench.instr_bench"
START_TIMEOUT_S = 300.0  # python and the sidecar's imports, fifty times slower
REQUEST_TIMEOUT_S = 60.0
_TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.MULTILINE)


def parser() -> argparse.ArgumentParser:
    p = cli.parser(MODULE, __doc__)
    p.add_argument("--sidecar-config", help="the config TOML the sidecar(s) start from")
    p.add_argument("--baseline", help="also the sidecar at a git revision, or a checkout's folder")
    p.add_argument("--scenario", default="chat_body_identity", help="the requests sent")
    p.add_argument("--requests", type=cli.positive, default=300, help="counted, per target")
    p.add_argument("--warmup", type=cli.non_negative, default=200, help="uncounted, per target")
    p.add_argument("--repeats", type=cli.positive, default=2, help="counts per target")
    p.add_argument(
        "--pause-ms",
        type=float,
        default=30.0,
        help="between counted requests, so that what a request sets off ends before the next",
    )
    p.add_argument("--identities", type=cli.positive, default=100, help="bench identities")
    p.add_argument(
        "--redis", action="store_true", help="count Redis's instructions per request too"
    )
    return p


def require_callgrind() -> None:
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not found: apt-get install valgrind")


def callgrind(folder: Path) -> list[str]:
    """The command a counted process runs under: counting off until callgrind_control turns
    it on, one dump file per `callgrind_control -d` in `folder`."""
    out = folder / "callgrind.out.%p"
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def control(pid: int, *flags: str) -> None:
    subprocess.run(
        ["callgrind_control", *flags, str(pid)], check=True, capture_output=True, timeout=120
    )


def send(
    client: LeanClient, scenario: Scenario, start: int, count: int, pause_s: float = 0.0
) -> None:
    for i in range(start, start + count):
        if pause_s:
            time.sleep(pause_s)
        request = scenario.request(i)
        status, _ = client.post(scenario.path, request.body, request.headers)
        if status != 200:
            raise SystemExit(f"{scenario.path} answered {status} on port {client.port}")


def latest_total(folder: Path, pid: int, before: set[Path]) -> int:
    """Instructions in the dump callgrind_control -d just wrote for `pid`."""
    for _ in range(100):
        dumps = set(folder.glob(f"callgrind.out.{pid}.*")) - before
        if dumps:
            text = max(dumps, key=lambda p: p.stat().st_mtime).read_text(errors="replace")
            found = _TOTALS.findall(text)
            if found:
                return int(found[-1])
        time.sleep(0.1)
    raise SystemExit(f"no callgrind dump for process {pid} in {folder}")


def count(
    target: Target,
    folder: Path,
    scenario: Scenario,
    args: argparse.Namespace,
    store: int | None = None,
) -> tuple[int, int | None]:
    """Instructions per request of one counted run against `target`, and, when `store` (the
    pid of a Redis under callgrind) is given, of that Redis over the same run."""
    client = LeanClient(target.port, timeout=REQUEST_TIMEOUT_S)
    pids = [target.pid] if store is None else [target.pid, store]
    try:
        send(client, scenario, 0, args.warmup)
        time.sleep(0.5)  # what the warm-up left to do in the background, done uncounted
        before = {pid: set(folder.glob(f"callgrind.out.{pid}.*")) for pid in pids}
        for pid in pids:
            control(pid, "--instr=on")
            control(pid, "--zero")
        send(client, scenario, args.warmup, args.requests, args.pause_ms / 1000)
        if store is not None:
            time.sleep(1.5)  # the last usage write and index update, counted
        for pid in pids:
            control(pid, "--dump")
            control(pid, "--instr=off")
        requests: int = args.requests
        totals = [round(latest_total(folder, pid, before[pid]) / requests) for pid in pids]
        return totals[0], totals[1] if store is not None else None
    except ClientError as exc:
        raise SystemExit(f"port {target.port}: {type(exc).__name__}: {exc}") from exc
    finally:
        client.close()


def summary(result: dict[str, Any]) -> str:
    per = result["instructions_per_request"]
    rows = [
        [name, f"{spread(values)['median'] / 1000:,.0f}k", ", ".join(f"{v:,}" for v in values)]
        for name, values in per.items()
    ]
    for name, values in result.get("redis_instructions_per_request", {}).items():
        rows.append(
            [
                f"Redis, for {name}",
                f"{spread(values)['median'] / 1000:,.0f}k",
                ", ".join(f"{v:,}" for v in values),
            ]
        )
    lines = table(["target", "instructions / request", "per repeat"], rows)
    for name, values in result["ratios"].items():
        lines.append(f"{name}: {spread_text(spread(values), 4)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    require_callgrind()

    def measure() -> cli.Outcome:
        with tempfile.TemporaryDirectory(prefix="instr-bench-src-") as scratch:
            sides: list[tuple[str, Path]] = [("sidecar", ROOT)]
            described = None
            if args.baseline:
                tree, described = baseline_tree(args.baseline, Path(scratch))
                sides.insert(0, ("baseline", tree))
            with Launcher("instr-bench-") as launcher:
                upstream = launcher.mock()
                scenario = scenario_named(args.identities, args.scenario)
                probe = scenario_named(args.identities, "chat_body_identity")
                launcher.checked(upstream, "the mock upstream", probe)
                dumps = launcher.folder("callgrind")
                wrap = callgrind(dumps)
                log("starting the bare pass-through and the sidecar(s) under callgrind")
                targets = [launcher.bare(upstream, None, wrap, START_TIMEOUT_S)]
                store = (
                    launcher.redis(wrap=callgrind(dumps), timeout=START_TIMEOUT_S)
                    if args.redis
                    else None
                )
                targets += launcher.sidecars(
                    sides,
                    args.sidecar_config,
                    store or launcher.redis(),
                    upstream,
                    None,
                    wrap,
                    START_TIMEOUT_S,
                )
                per: dict[str, list[int]] = {t.name: [] for t in targets}
                in_redis: dict[str, list[int]] = {name: [] for name, _ in sides}
                pid = store.process.pid if store and store.process else None
                for repeat in range(args.repeats):
                    for target in targets:
                        own, redis = count(
                            target, dumps, scenario, args, pid if target.name != "bare" else None
                        )
                        per[target.name].append(own)
                        if redis is not None:
                            in_redis[target.name].append(redis)
                        log(
                            f"repeat {repeat + 1}: {target.name} {own:,}"
                            + (f", Redis {redis:,}" if redis is not None else "")
                        )
        ratios = {
            f"{name} / bare": [ratio(v, b, 4) for v, b in zip(per[name], per["bare"], strict=True)]
            for name, _ in sides
        }
        if args.baseline:
            ratios["sidecar / baseline"] = [
                ratio(v, b, 4) for v, b in zip(per["sidecar"], per["baseline"], strict=True)
            ]
        result: dict[str, Any] = {
            "baseline": described,
            "bare": bare_description(),
            "scenario": args.scenario,
            "instructions_per_request": per,
            "ratios": ratios,
        }
        if args.redis:
            result["redis_instructions_per_request"] = in_redis
            if args.baseline:
                ratios["Redis: sidecar / baseline"] = [
                    ratio(v, b, 4)
                    for v, b in zip(in_redis["sidecar"], in_redis["baseline"], strict=True)
                ]
        return cli.Outcome(result, summary(result))

    return cli.run(MODULE, "Instructions per request (callgrind)", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
