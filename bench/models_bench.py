"""Usage by model: Redis bytes per identity per day, and the time to stream the usage export
by model over many identities.

    .venv/bin/python -m bench.models_bench [--part memory|export|both]
        [--memory-identities 2000] [--days 30] [--models 3]
        [--identities 100000] [--repeats 3]

`memory`: a private redis-server, identities created through the store, then `--days` days of
`--models` models each written through the recorder's script (lua/record.lua); the Redis
bytes per identity per day are the `INFO used_memory` delta over identities x days (hour
buckets, kept 72 hours and not by model, left out). Run at a commit before usage by model, it
gives the figure without the by-model hashes. `export`: `--identities` identities with 30
days of three models written straight into the store's layout, then a `sidecar serve` on it
and `GET /v2/usage` streamed to its end by model (`--repeats` times, and once as CSV), then
once each by identity and model, by identity and by a metadata key, as references; every
answer is checked against what was written. The table and progress go to stderr, the
JSON to stdout and bench/out/ (or --json FILE).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from bench.lib import cli, models
from bench.lib.processes import Launcher

MODULE = "bench.models_bench"


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(MODULE, __doc__)
    p.add_argument("--part", choices=("memory", "export", "both"), default="both")
    p.add_argument("--memory-identities", type=cli.positive, default=2_000)
    p.add_argument("--days", type=cli.positive, default=30)
    p.add_argument("--models", type=cli.positive, default=3)
    p.add_argument("--identities", type=cli.positive, default=100_000)
    p.add_argument("--repeats", type=cli.positive, default=3)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)

    def measure() -> cli.Outcome:
        result: dict[str, Any] = {}
        if args.part in ("memory", "both"):
            with Launcher("models-memory-") as launcher:
                server = launcher.redis()
                result["memory"] = asyncio.run(
                    models.memory(server.url, args.memory_identities, args.days, args.models)
                )
        if args.part in ("export", "both"):
            result["export"] = models.export(args.identities, args.days, args.repeats)
        return cli.Outcome(result, models.render(result))

    return cli.run(MODULE, "Usage by model", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
