"""Sidecar saturation throughput on one Redis server and on a Redis Cluster, in the same run.

    .venv/bin/python -m bench.cluster_bench [--repeats 2] [--duration 5] [--connections 64] \\
        [--json FILE] [--markdown FILE]

Two `sidecar serve` processes (inline mode, one worker each) in front of one mock upstream:
one on a private redis-server, one on a private 3-master Redis Cluster (3 replicas, made by
`redis-cli --cluster create`; tests/redis_cluster.py). Both stores run with `appendonly yes`,
so the topology is the only difference. Each repeat runs `wrk` (bench/wrk/post_json.lua, the
chat completion with a body identity that bench/proxy_bench.py sends, cycled over 100
identities) against one sidecar, then the other, the order alternating; the ratio is
cluster / single per repeat, reported as the median.

Everything started is stopped on exit, error or Ctrl-C; load goes only to 127.0.0.1. JSON goes
to stdout (or --json FILE), progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.proxy_bench import (
    CHAT_PATH,
    Options,
    attribution_check,
    command_line,
    cpu_seconds,
    log,
    metadata,
    probe_metered,
    run_wrk,
    scenarios,
    start_mock,
    start_sidecar,
    wrk_binary,
)
from sidecar.testing.redis_cluster import LocalCluster
from sidecar.testing.redis_server import RedisServer

STORES = ("single", "cluster")


def _pids_cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def measure(
    port: int, redis_pids: Sequence[int], bodies: Path, opts: Options, duration: int
) -> dict[str, Any]:
    before = _pids_cpu(redis_pids)
    figures, _ = run_wrk(port, CHAT_PATH, bodies, opts, duration)
    wall = max(float(figures.get("duration_s") or duration), 1e-3)
    figures["redis_cores"] = round((_pids_cpu(redis_pids) - before) / wall, 2)
    return figures


def run_benchmark(opts: Options, warmup: int) -> dict[str, Any]:
    if wrk_binary() is None:
        raise FileNotFoundError("wrk is required (apt-get install wrk)")
    result: dict[str, Any] = {"meta": metadata(opts)}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cluster-bench-")))
        mock, upstream_port = start_mock(workdir)
        stack.callback(mock.stop)

        single = RedisServer(workdir, "--appendonly", "yes")
        stack.callback(single.kill)
        single.start()
        assert single.process is not None
        cluster = LocalCluster(workdir / "redis-cluster")
        stack.callback(cluster.stop)
        log("starting a 3-master cluster with 3 replicas")
        cluster.start()
        stores = {
            "single": (single.url, [single.process.pid]),
            "cluster": (
                cluster.url,
                [n.popen.pid for n in cluster.nodes.values() if n.popen is not None],
            ),
        }

        all_scenarios = scenarios(opts)
        probe = all_scenarios["chat_body_identity"]
        ports: dict[str, int] = {}
        for name, (url, _) in stores.items():
            (workdir / name).mkdir()
            sidecar = start_sidecar(opts, workdir / name, upstream_port, url)
            if sidecar.proc is not None:
                stack.callback(sidecar.proc.stop)
            if not sidecar.available or sidecar.port is None:
                raise RuntimeError(f"sidecar on the {name} store: {sidecar.reason}")
            if reason := probe_metered(sidecar.port, probe):
                raise RuntimeError(f"sidecar on the {name} store: {reason}")
            ports[name] = sidecar.port
            log(f"sidecar on the {name} store: 127.0.0.1:{sidecar.port} ({url})")

        bodies = workdir / "chat-bodies.jsonl"
        bodies.write_bytes(b"".join(r.body + b"\n" for r in probe.requests))
        for name in STORES if warmup else ():
            log(f"warm-up: wrk -d{warmup}s against the sidecar on the {name} store")
            run_wrk(ports[name], CHAT_PATH, bodies, opts, warmup)

        runs = []
        for index in range(opts.repeats):
            order = STORES if index % 2 == 0 else STORES[::-1]
            run: dict[str, Any] = {"index": index, "order": list(order)}
            for name in order:
                log(f"run {index + 1}: wrk -c{opts.connections} -d{opts.duration}s, {name} store")
                run[name] = measure(ports[name], stores[name][1], bodies, opts, opts.duration)
            run["ratio"] = round(
                run["cluster"]["requests_per_s"] / run["single"]["requests_per_s"], 3
            )
            runs.append(run)
        result["runs"] = runs
        result["summary"] = {
            name: {
                "requests_per_s_median": statistics.median(r[name]["requests_per_s"] for r in runs),
                "p50_ms_median": statistics.median(r[name]["p50_ms"] for r in runs),
                "p99_ms_median": statistics.median(r[name]["p99_ms"] for r in runs),
                "redis_cores_median": statistics.median(r[name]["redis_cores"] for r in runs),
                "errors": sum(r[name]["http_errors"] + r[name]["socket_errors"] for r in runs),
            }
            for name in STORES
        }
        result["summary"]["ratio_cluster_over_single_median"] = statistics.median(
            r["ratio"] for r in runs
        )
        time.sleep(1.0)  # recording is off the response path: let the last writes land
        result["attribution"] = {
            name: attribution_check(ports[name], opts.identities) for name in STORES
        }
    return result


def render_markdown(result: dict[str, Any]) -> str:
    meta, summary = result["meta"], result["summary"]
    opts = meta["options"]
    lines = [
        f"# Sidecar on one Redis vs a 3-master Redis Cluster ({meta['date_utc']}, "
        f"commit {meta['commit']})",
        "",
        f"`{meta['command']}`: wrk -c{opts['connections']} -t{opts['threads']}, "
        f"{opts['duration']} s x {opts['repeats']} repeats, chat completion with a body identity "
        f"over {opts['identities']} identities; {meta['machine']['nproc']} CPUs.",
        "",
        "| store | requests/s | p50 ms | p99 ms | Redis cores | errors |",
        "|---|---|---|---|---|---|",
    ]
    for name in STORES:
        s = summary[name]
        lines.append(
            f"| {name} | {s['requests_per_s_median']:.0f} | {s['p50_ms_median']:.2f} | "
            f"{s['p99_ms_median']:.2f} | {s['redis_cores_median']:.2f} | {s['errors']} |"
        )
    lines += [
        "",
        f"Cluster / single throughput (median of per-repeat ratios): "
        f"**{summary['ratio_cluster_over_single_median']:.2f}** "
        f"(runs: {', '.join(str(r['ratio']) for r in result['runs'])}).",
    ]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.cluster_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeats", type=int, default=2, help="wrk runs per store (default 2)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of wrk per store first")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--identities", type=int, default=100, help="bench identities cycled through")
    p.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--markdown", default=None, help="write the Markdown summary here")
    return p


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if min(args.repeats, args.duration, args.connections, args.threads, args.identities) < 1:
        raise SystemExit("--repeats, --duration, --connections, --threads, --identities: >= 1")
    opts = Options(
        repeats=args.repeats,
        duration=args.duration,
        connections=args.connections,
        threads=args.threads,
        identities=args.identities,
        command=command_line(argv).replace("bench.proxy_bench", "bench.cluster_bench"),
    )
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_benchmark(opts, max(args.warmup, 0))
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
        log(f"JSON written to {args.json}")
    else:
        print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render_markdown(result), encoding="utf-8")
        log(f"Markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
