"""Sidecar saturation throughput on one Redis server and on a Redis Cluster, in the same run.

    .venv/bin/python -m bench.cluster_bench [--repeats 2] [--duration 5] [--connections 64] \\
        [--json FILE] [--markdown FILE]

Two `sidecar serve` processes (inline mode, one worker each) in front of one mock upstream:
one on a private redis-server, one on a private 3-master Redis Cluster (3 replicas, made by
`redis-cli --cluster create`; sidecar/testing/redis_cluster.py). Both stores run with
`appendonly yes`, so the topology is the only difference. Beside them, the references: the bare
aiohttp pass-through (bench/bare_proxy.py) and, when installed, an nginx hop, in front of the
same mock. Each repeat runs `wrk` (bench/wrk/post_json.lua, the chat completion with a body
identity, cycled over 100 identities) against every target in turn, the order rotating; the
ratios (cluster / single, each sidecar / each reference) are taken per repeat and reported as
their median (min-max).

Everything started is stopped on exit, error or Ctrl-C; load goes only to 127.0.0.1. The table
and progress go to stderr, the JSON to stdout and bench/out/ (or --json FILE).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.lib import cli, rounds
from bench.lib.client import attribution_check
from bench.lib.config import sidecar_config
from bench.lib.processes import Launcher
from bench.lib.report import spread_text
from bench.lib.wrk import Load

MODULE = "bench.cluster_bench"
STORES = ("single", "cluster")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    cli.wrk_arguments(p, repeats=2, duration=5)
    p.add_argument("--warmup", type=cli.non_negative, default=2, help="seconds per sidecar first")
    p.add_argument("--threads", type=cli.positive, default=2, help="wrk threads")
    p.add_argument("--identities", type=cli.positive, default=100, help="bench identities")
    args = p.parse_args(argv)
    load = Load(args.threads, args.connections)

    def measure() -> cli.Outcome:
        result: dict[str, Any] = {}
        with Launcher("cluster-bench-") as launcher:
            rig = rounds.rig(launcher, args.identities)
            single = launcher.redis("redis", "--appendonly", "yes")
            cluster = launcher.cluster()
            assert single.process is not None
            stores = {
                "single": (single.url, [single.process.pid]),
                "cluster": (cluster.url, [n.popen.pid for n in cluster.nodes.values() if n.popen]),
            }
            sidecars = []
            for name, (url, pids) in stores.items():
                config, _ = sidecar_config(launcher.folder(name))
                sidecars.append(launcher.sidecar(name, config, url, rig.upstream, rig.probe))
                rig.redis_pids[name] = pids
            measured = rounds.measure(
                rig,
                sidecars,
                repeats=args.repeats,
                duration=args.duration,
                warmup=args.warmup,
                load=load,
            )
            result |= measured
            result["cluster_over_single"] = rounds.ratio_of(measured, "cluster", "single")
            time.sleep(1.0)  # recording is off the response path: let the last writes land
            result["attribution"] = {
                t.name: attribution_check(t.port, args.identities) for t in sidecars
            }
        lines = [
            f"wrk -t{args.threads} -c{args.connections}, {args.duration} s x {args.repeats} "
            f"repeats, chat completion with a body identity over {args.identities} identities; "
            "median (min-max) over the repeats, ratios taken within each repeat.",
            "",
            *rounds.table(measured, rig),
            f"Cluster / single: **{spread_text(result['cluster_over_single'], 2)}**.",
            "",
            *rounds.details(measured, [*STORES, *rig.reference_names], rounds.DETAILS),
        ]
        return cli.Outcome(result, "\n".join(lines) + "\n")

    title = "Sidecar on one Redis and on a 3-master Redis Cluster"
    return cli.run(MODULE, title, args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
