"""uvicorn against granian: the same apps under both ASGI servers, in one run.

    PYTHONPATH=/tmp/granian .venv/bin/python -m bench.server_bench [--repeats 3] [--duration 8] \\
        [--requests 1500] [--workers 1] [--markdown bench/out/server.md]

granian is not a dependency of the sidecar: install it anywhere importable first (`pip install
--target /tmp/granian granian`, then PYTHONPATH as above). Started here, on loopback, and
stopped on exit, whatever happens:

- direct: the mock upstream; nginx: one nginx worker in front of it (when installed);
- bare: bench/bare_proxy.py under uvicorn (uvloop, httptools), the floor of a Python proxy and
  the reference; bare-granian: the same app under granian;
- for `plain` (no limits) and `limits` (three limits per request, bench/limits-policy.toml):
  the sidecar under uvicorn (`sidecar serve`) and under granian (`granian --interface asgi
  --factory sidecar.cli.serve:app_from_env`: the factory `serve` gives its uvicorn workers;
  uvloop, HTTP/1, the single-threaded runtime), all four on one private redis-server.

Each repeat: sequential chat completions with body identities (100 identities) over one
keep-alive connection per target from a Python client (`http.client`, TCP_NODELAY), every target
interleaved in blocks, so drift hits all alike: the p50 each adds over direct and its ratio to
bare's. Then rounds of `wrk -t2 -c64` against every target in turn, the order rotating: requests/s,
and its ratio to bare's and nginx's in the same round. At the end: the RSS of each sidecar's
processes, and the Redis connections each sidecar opened (its pool warmed at start). Summary to
stderr, JSON to stdout and bench/out/.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import redis as redis_sync

from bench.bare_proxy import UPSTREAM_ENV
from bench.lib import cli, config, rounds
from bench.lib.client import Target, measure_sequential
from bench.lib.payloads import ADMIN_TOKEN
from bench.lib.processes import Launcher, clean_env, http_ok, port_open, wait_for
from bench.lib.report import log, ratio, spread, spread_text, table
from bench.lib.sampling import process_role, process_tree, rss_kb
from bench.lib.wrk import Load
from sidecar.testing.redis_server import free_port

MODULE = "bench.server_bench"
SERVERS = ("uvicorn", "granian")
VARIANTS = ("plain", "limits")


def granian_args(app: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--loop", "uvloop", "--http", "1", "--no-ws", "--runtime-mode", "st",
        "--log-level", "warning", "--no-access-log", app,
    ]  # fmt: skip


def bare_granian(launcher: Launcher, rig: rounds.Rig) -> Target:
    port = free_port()
    env = clean_env() | {UPSTREAM_ENV: f"http://127.0.0.1:{rig.upstream.port}"}
    proc = launcher.start("bare-granian", granian_args("bench.bare_proxy:from_env", port, 1), env)
    wait_for("bare-granian", proc, lambda: port_open(port))
    target = Target("bare-granian", port, proc.pid)
    return launcher.checked(target, "the bare pass-through under granian", rig.probe)


def sidecar(
    launcher: Launcher, rig: rounds.Rig, server: str, variant: str, redis_url: str, workers: int
) -> Target:
    name = f"sidecar-{server}-{variant}"
    path, _ = config.sidecar_config(
        launcher.folder(name), workers=workers, overrides=config.limits(variant == "limits")
    )
    if server == "uvicorn":
        return launcher.sidecar(name, path, redis_url, rig.upstream, rig.probe)
    port = free_port()
    env = clean_env() | {
        "SIDECAR_CONFIG": str(path),
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{rig.upstream.port}",
        "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN,
        "SIDECAR_DATA_DIR": str(launcher.folder(name) / "data"),
    }
    args = granian_args("sidecar.cli.serve:app_from_env", port, workers)
    proc = launcher.start(name, args, env)
    wait_for(name, proc, lambda: http_ok(port, "/readyz"))
    return launcher.checked(Target(name, port, proc.pid), "the sidecar under granian", rig.probe)


def clients(url: str) -> int:
    with redis_sync.Redis.from_url(url) as client:
        return int(client.info("clients")["connected_clients"])


def memory(target: Target) -> list[dict[str, Any]]:
    """RSS of each process of a target's tree (the server's own, its workers, helpers)."""
    out = []
    for pid in process_tree(target.pid):
        kb = rss_kb(pid)
        if kb is not None:
            out.append({"pid": pid, "role": process_role(pid, target.pid), "rss_kb": kb})
    return out


def sequential(
    targets: Sequence[Target], rig: rounds.Rig, repeats: int, requests: int
) -> list[dict[str, Any]]:
    """Per repeat, per target: p50 and p99 (ms), the p50 added over direct and its ratio to
    bare's."""
    runs = []
    for index in range(repeats):
        log(f"run {index + 1}: {requests} sequential requests per target, interleaved")
        stats = measure_sequential(targets, rig.probe, requests, min(200, requests), 100)
        direct = float(stats["direct"]["p50_ms"])
        bare = float(stats["bare"]["p50_ms"]) - direct
        run: dict[str, Any] = {}
        for name, figures in stats.items():
            added = float(figures["p50_ms"]) - direct
            run[name] = {
                "p50_ms": figures["p50_ms"],
                "p99_ms": figures["p99_ms"],
                "errors": figures.get("errors", 0),
                "added_p50_ms": round(added, 4),
                "added_over_bare": ratio(added, bare, 2) if name != "direct" else None,
            }
        runs.append(run)
    return runs


def over(runs: Sequence[Mapping[str, Any]], key: str, a: str, b: str) -> dict[str, Any] | None:
    values = [ratio(r[a].get(key), r[b].get(key)) for r in runs if a in r and b in r]
    kept = [v for v in values if v is not None]
    return spread(kept) if kept else None


def report(result: Mapping[str, Any], names: Sequence[str]) -> str:
    seq, sat = result["sequential"], result["saturation"]
    rows = []
    for name in names:
        rows.append(
            [
                name,
                spread_text(spread([r[name]["added_p50_ms"] for r in seq]), 3),
                spread_text(over(seq, "added_p50_ms", name, "bare"), 2)
                if name not in ("direct", "bare")
                else "",
                spread_text(sat["summary"].get(name, {}).get(rounds.KEY), 0),
                spread_text(sat["summary"].get(name, {}).get("over_bare"), 2),
                spread_text(sat["summary"].get(name, {}).get("over_nginx"), 2),
            ]
        )
    lines = table(
        ["target", "added p50 ms", "/ bare", "wrk -c64 requests/s", "/ bare", "/ nginx"], rows
    )
    pairs = [("bare-granian", "bare")] + [
        (f"sidecar-granian-{v}", f"sidecar-uvicorn-{v}") for v in VARIANTS
    ]
    ratio_rows = [
        [
            f"{a} / {b}",
            spread_text(over(seq, "added_p50_ms", a, b), 2),
            spread_text(over(sat["runs"], rounds.KEY, a, b), 2),
        ]
        for a, b in pairs
    ]
    lines += table(["granian / uvicorn", "added p50", "requests/s"], ratio_rows)
    mem_rows = [
        [
            name,
            ", ".join(f"{p['role']} {p['rss_kb'] / 1024:.0f} MB" for p in info["processes"]),
            str(info["redis_connections"]),
        ]
        for name, info in result["sidecars"].items()
    ]
    lines += table(["sidecar", "RSS after the load", "Redis connections opened"], mem_rows)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    cli.wrk_arguments(p, repeats=3, duration=8, connections=False)
    p.add_argument("--requests", type=cli.positive, default=1500, help="sequential, per target")
    p.add_argument("--workers", type=cli.positive, default=1, help="each sidecar's workers")
    args = p.parse_args(argv)
    if importlib.util.find_spec("granian") is None:
        p.error("granian is not importable: pip install --target DIR granian; PYTHONPATH=DIR")

    def measure() -> cli.Outcome:
        with Launcher("server-bench-") as launcher:
            rig = rounds.rig(launcher, 100)
            extra = [bare_granian(launcher, rig)]
            redis = launcher.redis()
            sidecars: dict[str, Any] = {}
            for variant in VARIANTS:
                for server in SERVERS:
                    before = clients(redis.url)
                    target = sidecar(launcher, rig, server, variant, redis.url, args.workers)
                    rig.redis_pids[target.name] = [redis.process.pid] if redis.process else []
                    sidecars[target.name] = {"redis_connections": clients(redis.url) - before}
                    extra.append(target)
            targets = [rig.upstream, *rig.references, *extra]
            result: dict[str, Any] = {
                "workers": args.workers,
                "sequential": sequential(targets, rig, args.repeats, args.requests),
            }
            result["saturation"] = rounds.measure(
                rig, extra, repeats=args.repeats, duration=args.duration, warmup=2, load=Load()
            )
            for target in extra[1:]:
                sidecars[target.name]["processes"] = memory(target)
            result["sidecars"] = sidecars
            names = [t.name for t in targets]
        log(f"median sidecar RSS: {statistics.median(_rss(sidecars)) / 1024:.0f} MB")
        return cli.Outcome(result, report(result, names))

    return cli.run(MODULE, "The sidecar under uvicorn and under granian", args, argv, measure)


def _rss(sidecars: Mapping[str, Any]) -> list[float]:
    return [p["rss_kb"] for s in sidecars.values() for p in s["processes"] if p["role"] != "helper"]


if __name__ == "__main__":
    raise SystemExit(main())
