"""Memory under a flood of distinct identities: every request a new external id.

    .venv/bin/python -m bench.flood_bench --identities 1000000 [--connections 32] [--source header]

Starts a private redis-server, the mock upstream and a `sidecar serve` in front of it (with
bench/limits-policy.toml, so the limit checks and their profile cache are on the path), sends
one POST /v1/chat/completions per identity over keep-alive connections, samples the sidecar's
RSS and Redis's used_memory while it runs, and stops everything it started. The sidecar's
per-process caches are bounded in entries, so its RSS must level off once they are full, whatever
the number of identities; Redis grows by the bytes each identity keeps there. `--source body`
sends a body identity with a profile instead of the header (the costlier case: the process
remembers what it wrote).

First, the same flood (up to --reference-identities ids) goes through the references in front of
the same mock: the bare aiohttp pass-through (bench/bare_proxy.py) and, when installed, an nginx
hop; the sidecar's requests/s is reported as a ratio to theirs, its RSS growth beside theirs.
The JSON goes to stdout and bench/out/ (or --json FILE), the table and progress to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bench.lib import cli, flood

MODULE = "bench.flood_bench"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    add = p.add_argument
    add("--identities", type=int, default=100_000, help="distinct ids to send")
    add("--connections", type=int, default=32, help="keep-alive connections")
    add("--source", choices=("header", "body"), default="header")
    add("--interval", type=float, default=2.0, help="seconds between samples")
    add("--max-seconds", type=float, default=3600.0, help="stop sending after this long")
    add("--no-policies", action="store_true", help="no limit checks")
    add(
        "--big-profiles",
        action="store_true",
        help="with --source body: every profile field at its limit (about 15 kB of JSON)",
    )
    add(
        "--reference-identities",
        type=cli.non_negative,
        default=20_000,
        help="ids sent through each reference first (0: no references)",
    )
    args = p.parse_args(argv)
    if args.identities < 1 or args.connections < 1 or args.interval <= 0:
        p.error("--identities, --connections and --interval must be positive")
    if args.big_profiles and args.source != "body":
        p.error("--big-profiles needs --source body")
    spec = flood.Flood(
        args.identities,
        args.connections,
        args.source,
        args.big_profiles,
        args.interval,
        args.max_seconds,
    )

    def measure() -> cli.Outcome:
        result = flood.benchmark(spec, args.reference_identities, policies=not args.no_policies)
        return cli.Outcome(result, flood.summary(result))

    return cli.run(MODULE, "A flood of distinct identities", args, argv, measure)


if __name__ == "__main__":
    sys.exit(main())
