"""Hook-mode decisions per second: /hooks/authorize with three limits checked per decision.

    .venv/bin/python -m bench.hooks_bench [--repeats 3] [--duration 10] [--connections 64] \
        [--prefetch 32]

Starts a private redis-server and a `sidecar serve` with bench/limits-policy.toml; wrk drives
POST /hooks/authorize for 100 identities (header source). In the same run, /healthz on the
same server gives the floor (the HTTP stack alone) for the ratio, taken per repeat. The hooks
forward nothing, so the proxy's references (bare pass-through, nginx) have no part here.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from bench.lib import cli, config
from bench.lib.payloads import ADMIN_TOKEN, IDENTITY_HEADER
from bench.lib.processes import Launcher
from bench.lib.report import compare, compare_table, log
from bench.lib.wrk import Load, require_wrk, run_wrk

MODULE = "bench.hooks_bench"
BODY = '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}\n'


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    cli.wrk_arguments(p, repeats=3, duration=10)
    p.add_argument(
        "--prefetch",
        type=cli.non_negative,
        default=0,
        help="[limits] prefetch of the sidecar (0: every check at Redis)",
    )
    args = p.parse_args(argv)
    load = Load(2, args.connections)

    def measure() -> cli.Outcome:
        require_wrk()
        with Launcher("hooks-bench-") as launcher:
            redis = launcher.redis()
            overrides = config.limits()
            if args.prefetch:
                overrides["limits"] = {"prefetch": args.prefetch}
            path, _ = config.sidecar_config(launcher.folder("sidecar"), overrides=overrides)
            sidecar = launcher.sidecar("sidecar", path, redis.url)
            work = launcher.workdir
            (work / "body.jsonl").write_text(BODY)
            token = f"x-sidecar-token: {ADMIN_TOKEN}"
            lines = (f"{token}\t{IDENTITY_HEADER}: hook-user-{k}\n" for k in range(100))
            (work / "headers.txt").write_text("".join(lines))
            env = {"WRK_BODIES": str(work / "body.jsonl"), "WRK_HEADERS": str(work / "headers.txt")}
            base = f"http://127.0.0.1:{sidecar.port}"
            run_wrk(base + "/hooks/authorize", 2, load, env=env)  # the identities exist after it
            runs: list[dict[str, Any]] = []
            for index in range(args.repeats):
                authorize, _ = run_wrk(base + "/hooks/authorize", args.duration, load, env=env)
                floor, _ = run_wrk(base + "/healthz", args.duration, load, script=None)
                runs.append({"index": index, "authorize": authorize, "healthz": floor})
                log(
                    f"run {index + 1}: {authorize['requests_per_s']:,.0f} decisions/s, "
                    f"/healthz {floor['requests_per_s']:,.0f} requests/s"
                )
        rates = [r["authorize"]["requests_per_s"] for r in runs]
        floors = [r["healthz"]["requests_per_s"] for r in runs]
        summary = compare(runs, "requests_per_s", ["authorize"], ["healthz"])
        result: dict[str, Any] = {
            "authorize": [r["authorize"] for r in runs],
            "healthz_floor": [r["healthz"] for r in runs],
            "authorize_per_s_median": statistics.median(rates),
            "authorize_per_s_range": [min(rates), max(rates)],
            "authorize_over_healthz": round(
                statistics.median(rates) / statistics.median(floors), 3
            ),
            "summary": summary,
            "load_average": list(os.getloadavg()),
        }
        text = [
            f"wrk -t2 -c{args.connections}, {args.duration} s x {args.repeats}: POST "
            "/hooks/authorize for 100 header identities, three limits each; /healthz on the same "
            "server as the floor. Median (min-max) over the repeats.",
            "",
            *compare_table(summary, "requests_per_s", "requests/s", ["healthz"]),
        ]
        return cli.Outcome(result, "\n".join(text))

    return cli.run(MODULE, "Hook decisions", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
