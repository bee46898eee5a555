"""Identity search at scale: the search index against the scan it replaces, in the store.

    .venv/bin/python -m bench.search_bench [--identities 100000 1000000] [--repeats 3]

Per size, a private redis-server gets that many identities with realistic names, emails and
external ids (bench/lib/people.py), written through the record scripts as a version without
the search index wrote them; the list, a tag filter and a search are read through the scan;
the index is built as a starting sidecar builds it; then the same reads and searches of every
kind (no match, one match, a few, many, two characters, with a tag) go through the index.
Reports p50 / p99 per kind, bytes of Redis per identity with and without the index, the
build's time, and the Redis CPU a create, a rename and an erasure cost. Nothing else is
touched. The table and progress go to stderr, the JSON to stdout and bench/out/ (or --json).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bench.lib import cli, search

MODULE = "bench.search_bench"


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(MODULE, __doc__)
    p.add_argument("--identities", type=cli.positive, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--repeats", type=cli.positive, default=3, help="rounds of every query")
    p.add_argument("--queries", type=cli.positive, default=30, help="queries of each drawn kind")
    p.add_argument("--scan-queries", type=cli.positive, default=3, help="searches through the scan")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)

    def measure() -> cli.Outcome:
        result = search.benchmark(args.identities, args.repeats, args.queries, args.scan_queries)
        return cli.Outcome(result, search.render(result))

    return cli.run(MODULE, "Identity search", args, argv, measure)


if __name__ == "__main__":
    raise SystemExit(main())
