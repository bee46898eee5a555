"""Admission with a policy and two budgets: store calls per request, added latency, saturation.

    .venv/bin/python -m bench.admission_bench [--repeats 3] [--requests 2000] [--duration 10] \\
        [--count 1000] [--prefetch 32]

Three sidecars, each on its own private redis-server, in front of one mock upstream, beside the
references measured in the same run (the mock itself, `bench/bare_proxy.py`, and an nginx hop
when installed):

- plain:    no limits;
- policy:   bench/limits-policy.toml, three limits per request (requests, tokens, cost), set
            high enough never to refuse;
- budgets:  the same policy, plus an identity budget on each of the 100 bench identities and a
            tag budget on their tag `bench` (`/v2/budgets`, monthly, `amount_usd` and
            `token_limit`, never reached): every request is checked against the policy and
            two budgets, and settles in all three;
- policy-prefetch, budgets-prefetch (with `--prefetch N`): the same two with `[limits]
            prefetch = N` (docs/policies.md), most requests admitted and settled in the process.

Every request is the proxy bench's chat completion with a body identity (100 identities).
First, per sidecar: `--count` sequential requests with Redis's `INFO commandstats` read before
and after (after `CONFIG RESETSTAT`), and the same span idle, so that what the sidecar does in
the background (budget reloads, scans) is taken out: the commands per request, by name. Then per
repeat: sequential requests (`http.client`, one keep-alive connection per target, interleaved in
blocks, `--requests` per target) and each target's added p50 over direct, as a ratio to the bare
pass-through's and nginx's; and `wrk -t2 -c64` against every target in turn, each sidecar's
requests/s as a ratio to the bare pass-through's. The JSON goes to stdout and bench/out/ (or
--json FILE), the tables to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from redis import Redis

from bench.lib import cli, config, rounds
from bench.lib.client import LeanClient, Target, measure_sequential
from bench.lib.payloads import ADMIN_TOKEN, chat
from bench.lib.processes import Launcher
from bench.lib.report import compare_table, log, spread, spread_text, table
from bench.lib.wrk import Load

MODULE = "bench.admission_bench"
IDENTITIES = 100
VARIANTS = ("plain", "policy", "budgets")
PREFETCHING = ("policy-prefetch", "budgets-prefetch")  # with --prefetch N: the same, prefetching


def variants(prefetch: int) -> tuple[str, ...]:
    return VARIANTS + (PREFETCHING if prefetch else ())


NEVER = {"amount_usd": 1_000_000.0, "token_limit": 1_000_000_000_000}


async def make_budgets(port: int) -> list[str]:
    """An identity budget on each bench identity and a tag budget on `bench`."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    scopes = [{"kind": "identity", "target": f"bench-user-{k}"} for k in range(IDENTITIES)]
    scopes.append({"kind": "tag", "target": "bench"})
    made = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for scope in scopes:
            body = {"scope": scope, "period": "monthly", **NEVER}
            async with session.post(f"http://127.0.0.1:{port}/v2/budgets", json=body) as r:
                if r.status != 201:
                    raise RuntimeError(f"POST /v2/budgets answered {r.status}: {await r.text()}")
                made.append(str((await r.json())["_id"]))
    return made


def commandstats(client: Redis) -> dict[str, int]:
    info: Mapping[str, Any] = client.info("commandstats")
    return {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in info.items()
        if isinstance(value, dict)
    }


def count_commands(target: Target, redis_url: str, n: int) -> dict[str, Any]:
    """Commands Redis received per request over `n` sequential requests, less what it received
    over as long a span with no request."""
    scenario = chat(IDENTITIES)
    client = Redis.from_url(redis_url)
    lean = LeanClient(target.port)
    try:
        for i in range(50):  # warm: every identity known, connections open
            request = scenario.request(i)
            lean.post(scenario.path, request.body, request.headers)
        time.sleep(0.5)  # the warm-up's usage is written
        client.config_resetstat()
        began = time.monotonic()
        failed = 0
        for i in range(n):
            request = scenario.request(i)
            status, _ = lean.post(scenario.path, request.body, request.headers)
            failed += status != 200
        elapsed = time.monotonic() - began
        time.sleep(0.5)  # usage is written behind, within 300 ms
        busy = commandstats(client)
        client.config_resetstat()
        time.sleep(elapsed + 0.5)
        idle = commandstats(client)
    finally:
        lean.close()
        client.close()
    # Less what was written to read them (INFO, CONFIG) and the idle span's background.
    for name in ("info", "config|resetstat", "config"):
        busy.pop(name, None)
        idle.pop(name, None)
    net = {k: (busy.get(k, 0) - idle.get(k, 0)) / n for k in sorted(busy.keys() | idle.keys())}
    return {
        "requests": n,
        "failed": failed,
        "seconds": round(elapsed, 2),
        "busy": busy,
        "idle": idle,
        "per_request": {k: round(v, 3) for k, v in net.items() if abs(v) >= 0.0005},
        "evalsha_per_request": round(net.get("evalsha", 0.0) + net.get("eval", 0.0), 3),
        "all_per_request": round(sum(net.values()), 3),
    }


def added(
    latency: Mapping[str, Mapping[str, Any]], names: Sequence[str], sidecars: Sequence[str]
) -> dict[str, Any]:
    """Each target's p50 less direct's, and each sidecar's over the references'."""
    direct = float(latency["direct"]["p50_ms"])
    out: dict[str, Any] = {}
    for name in names:
        if "p50_ms" in latency.get(name, {}):
            out[f"{name}_added_p50_ms"] = round(float(latency[name]["p50_ms"]) - direct, 4)
    for name in sidecars:
        for ref in ("bare", "nginx"):
            mine, theirs = out.get(f"{name}_added_p50_ms"), out.get(f"{ref}_added_p50_ms")
            if mine is not None and theirs is not None and theirs > 0:
                out[f"{name}_over_{ref}"] = round(mine / theirs, 3)
    return out


def measure(args: argparse.Namespace) -> cli.Outcome:
    result: dict[str, Any] = {}
    with Launcher("admission-bench-") as launcher:
        rig = rounds.rig(launcher, IDENTITIES)
        sidecars: list[Target] = []
        redis_urls: dict[str, str] = {}
        for name in variants(args.prefetch):
            redis = launcher.redis(f"redis-{name}")
            assert redis.process is not None
            rig.redis_pids[name] = [redis.process.pid]
            redis_urls[name] = redis.url
            overrides = config.limits(name != "plain")
            if name.endswith("-prefetch"):
                overrides["limits"] = {"prefetch": args.prefetch}
            path, _ = config.sidecar_config(launcher.folder(name), overrides=overrides)
            sidecar = launcher.sidecar(name, path, redis.url, rig.upstream, rig.probe)
            if name.startswith("budgets"):
                made = asyncio.run(make_budgets(sidecar.port))
                log(f"{len(made)} budgets made on the budgets sidecar")
            sidecars.append(sidecar)
        result["commands"] = {}
        for sidecar in sidecars:
            counted = count_commands(sidecar, redis_urls[sidecar.name], args.count)
            result["commands"][sidecar.name] = counted
            log(f"{sidecar.name}: {counted['per_request']} commands per request")
        targets = [rig.upstream, *rig.references, *sidecars]
        names = [t.name for t in targets]
        scenario = rig.probe
        sequential = []
        for index in range(args.repeats):
            log(f"run {index + 1}: sequential, {args.requests} requests per target")
            latency = measure_sequential(targets, scenario, args.requests, args.warmup, args.block)
            sequential.append(
                {"latency": latency, "added": added(latency, names, variants(args.prefetch))}
            )
            log(f"run {index + 1}: {sequential[-1]['added']}")
        result["sequential"] = sequential
        result["saturation"] = rounds.measure(
            rig,
            sidecars,
            repeats=args.repeats,
            duration=args.duration,
            warmup=2,
            load=Load(2, args.connections),
        )
        result["references"] = rig.reference_names
        result["variants"] = list(variants(args.prefetch))
        result["connections"] = args.connections
    return cli.Outcome(result, "\n".join(report(result)))


def report(result: Mapping[str, Any]) -> list[str]:
    counted = result["commands"]
    # Commands the scripts run count in commandstats too: evalsha is what the sidecar sent.
    names = sorted({k for c in counted.values() for k in c["per_request"]} - {"evalsha", "eval"})
    lines = [
        "Redis commands per request (INFO commandstats over the sequential requests, less as "
        "long idle; those run inside scripts count too):",
        "",
        *table(
            ["sidecar", "**evalsha**", *names],
            [
                [
                    name,
                    f"**{c['evalsha_per_request']:.2f}**",
                    *(f"{c['per_request'].get(k, 0):.2f}" for k in names),
                ]
                for name, c in counted.items()
            ],
        ),
    ]
    runs = [s["added"] for s in result["sequential"]]
    rows = []
    sidecars = result.get("variants", VARIANTS)
    for name in ("nginx", "bare", *sidecars):
        key = f"{name}_added_p50_ms"
        values = [r[key] for r in runs if key in r]
        if not values:
            continue
        row = [name, spread_text(spread(values), 3)]
        for ref in ("bare", "nginx"):
            ratios = [r[f"{name}_over_{ref}"] for r in runs if f"{name}_over_{ref}" in r]
            row.append(spread_text(spread(ratios), 2) if ratios else "-")
        rows.append(row)
    lines += [
        "Sequential, Python keep-alive client, interleaved: added p50 over direct",
        "",
        *table(["target", "added p50 ms", "/ bare", "/ nginx"], rows),
        f"Saturation, wrk -t2 -c{result['connections']}: requests/s, and over the references",
        "",
        *compare_table(
            result["saturation"]["summary"], rounds.KEY, "requests/s", result["references"]
        ),
    ]
    sat = result["saturation"]["summary"]
    if all(n in sat for n in VARIANTS):
        steps = []
        pairs = [("policy", "plain"), ("budgets", "policy"), ("budgets", "plain")]
        pairs += [(f"{n}-prefetch", n) for n in ("policy", "budgets") if f"{n}-prefetch" in sat]
        pairs += [("budgets-prefetch", "plain")] if "budgets-prefetch" in sat else []
        for subject, base in pairs:
            ratios = [
                r[subject]["requests_per_s"] / r[base]["requests_per_s"]
                for r in result["saturation"]["runs"]
            ]
            steps.append(f"{subject} / {base} {spread_text(spread(ratios), 2)}")
        lines.append("requests/s, same rounds: " + "; ".join(steps))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    cli.wrk_arguments(p, repeats=3, duration=10)
    add = p.add_argument
    add("--requests", type=cli.positive, default=2000, help="sequential requests per target")
    add("--warmup", type=cli.non_negative, default=200, help="warm-up requests per target")
    add("--block", type=cli.positive, default=100, help="requests per target per block")
    add("--count", type=cli.positive, default=1000, help="requests over which commands count")
    add(
        "--prefetch",
        type=cli.non_negative,
        default=0,
        help="also run the policy and budgets sidecars with [limits] prefetch = N",
    )
    args = p.parse_args(argv)
    return cli.run(
        MODULE, "Admission with a policy and two budgets", args, argv, lambda: measure(args)
    )


if __name__ == "__main__":
    sys.exit(main())
