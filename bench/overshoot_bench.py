"""Token and cost limits under concurrency: how far the admitted total goes past a limit.

    .venv/bin/python -m bench.overshoot_bench [--repeats 3] [--delay-ms 300] \\
        [--concurrency 1 20 200] [--cases policy-tokens policy-cost budget-tokens budget-cost]

Starts a private redis-server, the mock upstream and one `sidecar serve` (one worker,
`[redis] timeout_ms = 1000` so that no check fails open under a burst of 200, the shipped
`[limits] default_output_reserve` of 1,024). Four kinds of limit, each on fresh identities:
a policy's `tokens = ["N/day"]`, a policy's `cost_usd = ["X/day"]` (calendar windows: nothing
slides out during a run), and an identity budget (`/v2/budgets`, one-time) with `token_limit`,
and one with `amount_usd`. Two kinds of request, every one the same (gpt-4o-mini, the identity
in a header, the usage set by `x-mock-input-tokens` / `x-mock-output-tokens`):

- under: `max_tokens` 256, 160 output tokens used: the estimate is above the actual;
- over: no `max_tokens` (the estimate reserves the default 1,024), an answer of 1,500 output
  tokens asked of the mock. With `[limits] cap_output` (the default) the sidecar forwards the
  request with `max_completion_tokens` 1,024 and the upstream (the mock, as a real one) stops
  there: the estimate is an upper bound again. With `--no-cap-output` the request goes as sent
  and 1,500 are used: the estimate is below the actual, by one error per request in flight.

Per limit, request kind and `--concurrency` (1: sequential; else waves of that many requests at
once, each held `--delay-ms` upstream), requests go until a whole wave is refused. Then, once the
usage is written: the admitted total read back from the identity's daily metrics (policies) or
the budget's consumption, checked against the 200s counted here times one request's usage; the
overshoot (admitted - limit, negative when under); one request's estimate error (estimate -
actual, from the sidecar's own estimator and price table); and whether the overshoot stayed
within one request's estimate error. The limits are sized for a few waves: --size requests'
worth of actual usage, plus half of one. The JSON goes to stdout and bench/out/ (or --json
FILE), the tables to stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from bench.lib import cli
from bench.lib.client import metric
from bench.lib.config import sidecar_config
from bench.lib.payloads import ADMIN_TOKEN, CHAT_PATH, IDENTITY_HEADER
from bench.lib.processes import Launcher
from bench.lib.report import log, spread, spread_text, table
from sidecar.usage import estimate
from sidecar.usage.model import Kind, Usage
from sidecar.usage.pricing import Pricer

MODULE = "bench.overshoot_bench"
MODEL = "gpt-4o-mini"
DEFAULT_OUTPUT_RESERVE = 1024  # the shipped default, set explicitly in the config
CASES = ("policy-tokens", "policy-cost", "budget-tokens", "budget-cost")
MAX_WAVES = 400  # a bound whatever the sidecar does
PROMPT = (
    "Summarise the following meeting notes for the team in a short paragraph, keeping the "
    "decisions and the owners of each follow-up: the launch moves to the second week of the "
    "month; the pricing page needs a review by finance; support asks for a runbook."
)


@dataclass(frozen=True)
class Shape:
    """One kind of request: its body, and the usage the mock answers with."""

    name: str
    body: bytes
    input_tokens: int
    output_tokens: int
    estimate_tokens: int
    estimate_nanos: int
    actual_nanos: int

    @property
    def actual_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def actual(self, dimension: str) -> int:
        return self.actual_tokens if dimension == "tokens" else self.actual_nanos

    def estimated(self, dimension: str) -> int:
        return self.estimate_tokens if dimension == "tokens" else self.estimate_nanos

    def headers(self, who: str, delay_ms: int) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            IDENTITY_HEADER: who,
            "x-mock-input-tokens": str(self.input_tokens),
            "x-mock-output-tokens": str(self.output_tokens),
            "x-mock-latency-ms": str(delay_ms),
        }


def shape(name: str, max_tokens: int | None, output_tokens: int, pricer: Pricer) -> Shape:
    """A request, priced and estimated by the sidecar's own code (usage/estimate.py and the
    price table), as it reserves at admission and settles at completion."""
    fields: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    body = json.dumps(fields, separators=(",", ":")).encode()
    input_tokens = len(body) // 4  # about what a tokenizer makes of English JSON
    est_in, est_out = estimate.tokens(Kind.CHAT, fields, len(body), DEFAULT_OUTPUT_RESERVE)
    at = datetime.now(UTC)

    def nanos(i: int, o: int) -> int:
        usage = Usage(input_tokens=i, output_tokens=o)
        cost = pricer.cost(model=MODEL, usage=usage, kind=Kind.CHAT, at=at)
        if not cost.priced:
            raise RuntimeError(f"{MODEL} is not in the price table")
        return cost.nanos

    return Shape(
        name,
        body,
        input_tokens,
        output_tokens,
        est_in + est_out,
        nanos(est_in, est_out),
        nanos(input_tokens, output_tokens),
    )


def shapes(cap_output: bool = True) -> dict[str, Shape]:
    """`cap_output`: the sidecar's (the "over" request is then answered within the cap)."""
    pricer = Pricer()
    over = min(1500, DEFAULT_OUTPUT_RESERVE) if cap_output else 1500
    return {
        "under": shape("under", 256, 160, pricer),
        "over": shape("over", None, over, pricer),
    }


def policy_toml(request: str, concurrency: int, limits: dict[str, int]) -> str:
    """The two policies of one request kind and concurrency level, by id glob (a run's
    identity names them); the budget cases' identities match none."""
    dollars = f"{limits['cost'] / 1e9:.9f}".rstrip("0")
    level = f"{request}-c{concurrency}"
    return (
        f'[[policy]]\nname = "tokens-{level}"\n'
        f'match = {{ ids = ["ovs-policy-tokens-{level}-*"] }}\n'
        f'tokens = ["{limits["tokens"]}/day"]\n\n'
        f'[[policy]]\nname = "cost-{level}"\n'
        f'match = {{ ids = ["ovs-policy-cost-{level}-*"] }}\n'
        f'cost_usd = ["{dollars}/day"]\n\n'
    )


class Api:
    """The sidecar's HTTP API and proxy, through one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path, headers=self.admin) as r:
            if r.status != 200:
                raise RuntimeError(f"GET {path} answered {r.status}: {await r.text()}")
            return await r.json()

    async def budget(self, who: str, dimension: str, amount: int) -> tuple[str, int]:
        """A one-time budget on `who`: its _id and its limit as the sidecar holds it."""
        body: dict[str, Any] = {
            "scope": {"kind": "identity", "target": who},
            "period": "one_time",
        }
        if dimension == "tokens":
            body["token_limit"] = amount
        else:
            body["amount_usd"] = amount / 1e9
        async with self.session.post(self.base + "/v2/budgets", json=body, headers=self.admin) as r:
            if r.status != 201:
                raise RuntimeError(f"POST /v2/budgets answered {r.status}: {await r.text()}")
            made = await r.json()
        held = made["token_limit"] if dimension == "tokens" else round(made["amount_usd"] * 1e9)
        return str(made["_id"]), int(held)

    async def chat(self, request: Shape, who: str, delay_ms: int) -> int:
        async with self.session.post(
            self.base + CHAT_PATH, data=request.body, headers=request.headers(who, delay_ms)
        ) as r:
            await r.read()
            return r.status

    async def admitted(self, who: str, dimension: str, budget: str | None) -> int:
        """What the identity's limit counts now: the budget's consumption, or the identity's
        usage of the day from its metrics (exact nano-dollars)."""
        if budget is not None:
            used = (await self.get(f"/v2/budgets/{budget}"))["consumption"]
            return int(used["tokens"]) if dimension == "tokens" else round(used["cost_usd"] * 1e9)
        metrics = await self.get(f"/v2/identities/{who}/metrics?granularity=day")
        points = metrics["series"]["points"]
        key = "total_tokens" if dimension == "tokens" else "cost_nanos"
        return sum(int(p[key]) for p in points)


async def drive(
    api: Api, request: Shape, who: str, concurrency: int, delay_ms: int
) -> dict[str, int]:
    """Waves of `concurrency` requests until a whole wave is refused."""
    admitted = refused = other = waves = 0
    while waves < MAX_WAVES:
        waves += 1
        statuses = await asyncio.gather(
            *(api.chat(request, who, delay_ms) for _ in range(concurrency))
        )
        ok = statuses.count(200)
        admitted += ok
        refused += statuses.count(429)
        other += len(statuses) - statuses.count(200) - statuses.count(429)
        if ok == 0:
            break
    return {"waves": waves, "admitted_requests": admitted, "refused": refused, "other": other}


async def one_run(
    api: Api,
    case: str,
    request: Shape,
    concurrency: int,
    repeat: int,
    limits: dict[str, int],
    delay_ms: int,
) -> dict[str, Any]:
    kind, dimension = case.split("-")
    dimension = "tokens" if dimension == "tokens" else "cost"
    who = f"ovs-{case}-{request.name}-c{concurrency}-r{repeat}-{int(time.time() * 1000)}"
    budget: str | None = None
    limit = limits[dimension]
    if kind == "budget":
        budget, limit = await api.budget(who, dimension, limit)
    delay = delay_ms if concurrency > 1 else 0
    started = time.monotonic()
    driven = await drive(api, request, who, concurrency, delay)
    seconds = time.monotonic() - started
    await asyncio.sleep(1.0)  # usage is written within 300 ms of each answer
    read_back = await api.admitted(who, dimension, budget)
    actual = request.actual(dimension)
    error = request.estimated(dimension) - actual  # > 0: the estimate is above the actual
    overshoot = read_back - limit
    return {
        "case": case,
        "request": request.name,
        "concurrency": concurrency,
        "repeat": repeat,
        "identity": who,
        "budget": budget,
        "unit": "tokens" if dimension == "tokens" else "nano-dollars",
        "limit": limit,
        "admitted": read_back,
        "admitted_by_client": driven["admitted_requests"] * actual,
        "overshoot": overshoot,
        "estimate_error": error,
        "within_one_error": overshoot <= abs(error),
        # What holds when every request in flight is estimated low: one error per request.
        "within_in_flight_errors": overshoot <= abs(error) * concurrency,
        "seconds": round(seconds, 2),
        **driven,
    }


async def run(args: Any, requests: dict[str, Shape], port: int) -> list[dict[str, Any]]:
    chosen = [requests[name] for name in args.requests]
    out: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=max(args.concurrency) + 8)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        api = Api(session, port)
        for repeat in range(args.repeats):
            for case in args.cases:
                for request in chosen:
                    for concurrency in args.concurrency:
                        limits = sized(request, concurrency, args.size)
                        row = await one_run(
                            api, case, request, concurrency, repeat, limits, args.delay_ms
                        )
                        log(
                            f"repeat {repeat + 1}, {case}, {request.name}, c={concurrency}: "
                            f"limit {row['limit']:,}, admitted {row['admitted']:,} "
                            f"({row['admitted_requests']} requests in {row['waves']} waves), "
                            f"overshoot {row['overshoot']:,}, estimate error "
                            f"{row['estimate_error']:,}"
                        )
                        out.append(row)
    return out


def sized(request: Shape, concurrency: int, size: Sequence[int]) -> dict[str, int]:
    """A run's limits: `size` requests' worth of the request's actual usage (per concurrency
    level), plus half of one, so that the end never falls on a request's edge."""
    worth = size[0 if concurrency == 1 else 1 if concurrency <= 20 else 2]
    tokens, nanos = request.actual_tokens, request.actual_nanos
    return {"tokens": worth * tokens + tokens // 2, "cost": worth * nanos + nanos // 2}


def summarise(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["request"], row["concurrency"]), []).append(row)
    summary = []
    lines = []
    for (case, request, concurrency), runs in groups.items():
        overshoots = [r["overshoot"] for r in runs]
        worst = max(runs, key=lambda r: r["overshoot"])
        summary.append(
            {
                "case": case,
                "request": request,
                "concurrency": concurrency,
                "unit": runs[0]["unit"],
                "limit": spread([r["limit"] for r in runs]),
                "admitted": spread([r["admitted"] for r in runs]),
                "admitted_requests": spread([r["admitted_requests"] for r in runs]),
                "overshoot": spread(overshoots),
                "worst_overshoot": worst["overshoot"],
                "estimate_error": runs[0]["estimate_error"],
                "within_one_error": all(r["within_one_error"] for r in runs),
                "within_in_flight_errors": all(r["within_in_flight_errors"] for r in runs),
                "read_back_matches_client": all(
                    r["admitted"] == r["admitted_by_client"] for r in runs
                ),
                "other_statuses": sum(r["other"] for r in runs),
            }
        )

    def same(entry: dict[str, Any]) -> str:
        """The one value every repeat gave, else its median and range."""
        return f"{entry['median']:,.0f}" if entry["min"] == entry["max"] else spread_text(entry, 0)

    for s in summary:
        mode = "sequential" if s["concurrency"] == 1 else f"{s['concurrency']} at once"
        error = s["estimate_error"]
        lines.append(
            [
                s["case"],
                s["request"],
                mode,
                s["unit"],
                same(s["limit"]),
                same(s["admitted"]),
                same(s["admitted_requests"]),
                same(s["overshoot"]),
                f"{s['worst_overshoot']:,}",
                f"{error:+,}",
                f"{s['worst_overshoot'] / abs(error):.2f}"
                if error and s["worst_overshoot"] > 0
                else "-",
                "yes" if s["within_one_error"] else "**no**",
                "yes" if s["within_in_flight_errors"] else "**no**",
            ]
        )
    header = [
        "limit",
        "request",
        "mode",
        "unit",
        "limit",
        "admitted",
        "requests",
        "overshoot",
        "worst",
        "estimate - actual",
        "worst / error",
        "<= one error",
        "<= concurrency x error",
    ]
    return summary, "\n".join(table(header, lines))


def measure(args: Any) -> cli.Outcome:
    requests = shapes(args.cap_output)
    with Launcher("overshoot") as launcher:
        redis = launcher.redis()
        upstream = launcher.mock()
        folder = launcher.folder("sidecar")
        policy = folder / "policies.toml"
        policy.write_text(
            "".join(
                policy_toml(name, c, sized(request, c, args.size))
                for name, request in requests.items()
                for c in args.concurrency
            )
        )
        overrides: dict[str, dict[str, Any]] = {
            "policies": {"paths": [str(policy)]},
            "limits": {
                "default_output_reserve": DEFAULT_OUTPUT_RESERVE,
                "cap_output": args.cap_output,
            },
            "redis": {"timeout_ms": 1000},
        }
        config, _ = sidecar_config(folder, overrides=overrides)
        sidecar = launcher.sidecar("sidecar", config, redis.url, upstream)
        errors_before = metric(sidecar.port, "sidecar_redis_limit_check_errors")
        rows = asyncio.run(run(args, requests, sidecar.port))
        failed = int(metric(sidecar.port, "sidecar_redis_limit_check_errors") - errors_before)
    summary, text = summarise(rows)
    estimates = {
        name: {
            "body_bytes": len(s.body),
            "actual_tokens": s.actual_tokens,
            "estimate_tokens": s.estimate_tokens,
            "actual_nanos": s.actual_nanos,
            "estimate_nanos": s.estimate_nanos,
        }
        for name, s in requests.items()
    }
    held = all(s["within_one_error"] for s in summary)
    held_under = all(s["within_one_error"] for s in summary if s["request"] == "under")
    matches = all(s["read_back_matches_client"] for s in summary)
    verdict = "the bound held in every case"
    if not held:
        verdict = (
            "the bound held wherever the estimate was above the actual, NOT where it was below"
            if held_under
            else "the bound was broken where the estimate was above the actual"
        )
    lines = [
        text,
        f"limit checks that failed (each admitted unchecked): {failed}",
        "read back = 200s x one request's usage in every run"
        if matches
        else "READ BACK DIFFERS from the 200s counted",
        verdict,
    ]
    result = {
        "requests": estimates,
        "failed_limit_checks": failed,
        "bound_held": held,
        "read_back_matches_client": matches,
        "summary": summary,
        "runs": rows,
    }
    return cli.Outcome(result, "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    add = p.add_argument
    add("--repeats", type=cli.positive, default=3)
    add("--delay-ms", type=cli.non_negative, default=300, help="upstream delay, concurrent runs")
    add("--concurrency", type=cli.positive, nargs="+", default=[1, 20, 200])
    add("--cases", nargs="+", choices=CASES, default=list(CASES))
    add("--requests", nargs="+", choices=("under", "over"), default=["under", "over"])
    add(
        "--size",
        type=cli.positive,
        nargs=3,
        default=[20, 50, 300],
        metavar=("SEQUENTIAL", "C20", "C200"),
        help="a limit's size in requests' worth of actual usage, per concurrency level",
    )
    add(
        "--no-cap-output",
        dest="cap_output",
        action="store_false",
        help="[limits] cap_output = false: requests without max_tokens go as sent",
    )
    args = p.parse_args(argv)
    return cli.run(MODULE, "Overshoot of token and cost limits", args, argv, lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
