"""Throughput of the inline proxy with `[server] metrics` on and off, in one run.

    .venv/bin/python -m bench.metrics_bench [--duration 10] [--repeats 5]

Two sidecars (metrics on, metrics off) on one private redis-server in front of one mock
upstream, saturated in turn with `wrk -t2 -c64` and the proxy bench's chat bodies (body
identities, 100 identities), the order alternating per repeat; then the same with three limits
per request (bench/limits-policy.toml). Reports the median requests/s and CPU per request of
each, and on / off. Everything started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.proxy_bench import (
    CHAT_PATH,
    ROOT,
    Options,
    probe_metered,
    run_wrk,
    scenarios,
    start_mock,
    start_sidecar,
    tree_cpu_seconds,
)
from sidecar.testing.redis_server import RedisServer


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(duration: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"duration_s": duration, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        mock, upstream_port = start_mock(work)
        stack.callback(mock.stop)
        redis = RedisServer(work)
        redis.start()
        stack.callback(redis.kill)
        opts = Options(duration=duration)
        chat = scenarios(opts)["chat_body_identity"]
        bodies = work / "bodies.jsonl"
        bodies.write_bytes(b"".join(chat.request(i).body + b"\n" for i in range(opts.identities)))
        for variant in ("plain", "limits"):
            ports: dict[str, int] = {}
            pids: dict[str, int] = {}
            with contextlib.ExitStack() as sidecars:
                for metrics in ("on", "off"):
                    folder = work / f"{variant}-{metrics}"
                    folder.mkdir()
                    config = folder / "config.toml"
                    text = f"[server]\nmetrics = {'true' if metrics == 'on' else 'false'}\n"
                    if variant == "limits":
                        policy = ROOT / "bench" / "limits-policy.toml"
                        text += f'[policies]\npaths = ["{policy}"]\n'
                    config.write_text(text)
                    side = start_sidecar(
                        Options(sidecar_config=str(config)), folder, upstream_port, redis.url
                    )
                    if side.proc is None or side.port is None:
                        raise RuntimeError(f"sidecar did not start: {side.reason}")
                    sidecars.callback(side.proc.stop)
                    problem = probe_metered(side.port, chat)
                    if problem is not None:
                        raise RuntimeError(problem)
                    ports[metrics], pids[metrics] = side.port, side.proc.pid
                    run_wrk(side.port, CHAT_PATH, bodies, opts, 3)  # warm-up
                rps: dict[str, list[float]] = {"on": [], "off": []}
                cpu: dict[str, list[float]] = {"on": [], "off": []}
                for i in range(repeats):
                    for metrics in ("on", "off") if i % 2 == 0 else ("off", "on"):
                        before = tree_cpu_seconds(pids[metrics])
                        figures, _ = run_wrk(ports[metrics], CHAT_PATH, bodies, opts, duration)
                        used = tree_cpu_seconds(pids[metrics]) - before
                        rps[metrics].append(float(figures["requests_per_s"]))
                        cpu[metrics].append(used / max(1, int(figures["requests"])) * 1e6)
                        log(
                            f"{variant}, metrics {metrics}, run {i + 1}: "
                            f"{rps[metrics][-1]:,.0f} req/s, {cpu[metrics][-1]:.0f} us CPU/request"
                        )
            on, off = statistics.median(rps["on"]), statistics.median(rps["off"])
            out[variant] = {
                "requests_per_s": rps,
                "cpu_us_per_request": cpu,
                "median_on": on,
                "median_off": off,
                "on_over_off": round(on / off, 3),
                "cpu_median_on": round(statistics.median(cpu["on"])),
                "cpu_median_off": round(statistics.median(cpu["off"])),
            }
            log(f"{variant}: on {on:,.0f} req/s, off {off:,.0f} req/s, on/off {on / off:.3f}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_bench", description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per setting")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.duration, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
