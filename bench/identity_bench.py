"""Identity store and API at scale: upsert rate, memory per identity, GET/list/search latency.

    .venv/bin/python -m bench.identity_bench [--identities 100000] [--repeats 3]

Starts a private redis-server and a `sidecar serve` process on it; nothing else is touched. The
API's latencies stand beside two references of the same run: /healthz on the same server and a
raw Redis round trip. The table and progress go to stderr, the JSON to stdout and bench/out/
(or --json FILE).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bench.lib import cli, identity

MODULE = "bench.identity_bench"


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(MODULE, __doc__)
    p.add_argument("--identities", type=cli.positive, default=100_000)
    p.add_argument("--repeats", type=cli.positive, default=3)
    p.add_argument("--concurrency", type=cli.positive, default=32)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)

    def measure() -> cli.Outcome:
        result = identity.benchmark(args.identities, args.repeats, args.concurrency)
        return cli.Outcome(result, identity.render(result))

    return cli.run(MODULE, "Identity store and API", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
