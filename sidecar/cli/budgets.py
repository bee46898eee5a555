"""`sidecar budgets list|create|reset`: runtime budgets through a running sidecar's API."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sidecar.cli.client import (
    Api,
    ApiError,
    CliError,
    Column,
    api_options,
    count,
    money,
    print_json,
    run_action,
    segment,
    table,
)

KINDS = ("identity", "tag", "api_key_owner")
PERIODS = ("daily", "weekly", "monthly", "yearly", "one_time")


def _used(key: str) -> Any:
    def value(budget: dict[str, Any]) -> Any:
        used = (budget.get("consumption") or {}).get(key)
        if used is None:
            return "-"
        return money(used) if key == "cost_usd" else used

    return value


def _limit(budget: dict[str, Any], key: str) -> Any:
    value = budget.get(key)
    if value is None:
        return "-"
    return money(value) if key == "amount_usd" else value


COLUMNS = [
    Column("_ID", lambda b: b["_id"]),
    Column("SCOPE", lambda b: f"{b['scope']['kind']}:{b['scope']['target']}"),
    Column("PERIOD", lambda b: b["period"]),
    Column("USED_USD", _used("cost_usd"), right=True),
    Column("AMOUNT_USD", lambda b: _limit(b, "amount_usd"), right=True),
    Column("USED_TOKENS", _used("tokens"), right=True),
    Column("TOKEN_LIMIT", lambda b: _limit(b, "token_limit"), right=True),
    Column("RPM", lambda b: _limit(b, "requests_per_minute"), right=True),
    Column("ALERTS", lambda b: ",".join(f"{a['threshold_percent']}%" for a in b["alerts"])),
    Column("ACTIVE", lambda b: "yes" if b["is_active"] else "no"),
    Column("RESETS_AT", lambda b: (b.get("consumption") or {}).get("resets_at") or "never"),
]


def _show(budgets: list[dict[str, Any]]) -> None:
    print(table(budgets, COLUMNS))


def budgets_list(api: Api, args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"limit": args.limit}
    if args.kind:
        params["scope_kind"] = args.kind
    if args.target:
        params["scope_target"] = args.target
    if args.active is not None:
        params["is_active"] = "true" if args.active else "false"
    if args.after:
        params["starting_after"] = args.after
    page = api.get("/v2/budgets", params)
    if args.json:
        print_json(page)
        return
    _show(page["data"])
    if page.get("has_more") and page["data"]:
        print(f"(more: --after {page['data'][-1]['_id']})", file=sys.stderr)


def budgets_create(api: Api, args: argparse.Namespace) -> None:
    scopes = (("identity", args.identity), ("tag", args.tag), ("api_key_owner", args.owner))
    kind, target = next((kind, value) for kind, value in scopes if value is not None)
    body: dict[str, Any] = {"scope": {"kind": kind, "target": target}, "period": args.period}
    for key, value in (
        ("amount_usd", args.amount_usd),
        ("token_limit", args.token_limit),
        ("requests_per_minute", args.rpm),
        ("expires_at", args.expires_at),
    ):
        if value is not None:
            body[key] = value
    body["alerts"] = [{"threshold_percent": p} for p in args.alert or []]
    body["is_active"] = not args.inactive
    made = api.post("/v2/budgets", body)
    if args.json:
        print_json(made)
        return
    _show([made])


def budgets_reset(api: Api, args: argparse.Namespace) -> None:
    try:
        budget = api.post(f"/v2/budgets/{segment(args.id)}/reset")
    except ApiError as exc:
        if exc.status == 404:
            raise CliError(f"no budget with _id {args.id!r}") from None
        raise
    if args.json:
        print_json(budget)
        return
    _show([budget])


_ACTIONS = {"list": budgets_list, "create": budgets_create, "reset": budgets_reset}


def budgets(args: argparse.Namespace) -> int:
    return run_action("budgets", _ACTIONS, args)


def _dollars(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected dollars, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def add_commands(commands: Any) -> None:
    common = api_options()
    p = commands.add_parser(
        "budgets", help="list, create and reset runtime budgets through a running sidecar's API"
    )
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser(
        "list", parents=[common], help="budgets, newest first, with this period's consumption"
    )
    a.add_argument("--kind", choices=KINDS, help="of this scope kind")
    a.add_argument("--target", help="of this scope target (an external id, tag or key owner)")
    state = a.add_mutually_exclusive_group()
    state.add_argument("--active", dest="active", action="store_true", default=None)
    state.add_argument("--inactive", dest="active", action="store_false")
    a.add_argument("--limit", type=count(200), default=25, help="1-200 (default 25)")
    a.add_argument("--after", metavar="_ID", help="the page after this budget")
    a = actions.add_parser("create", parents=[common], help="a budget; prints it")
    scope = a.add_mutually_exclusive_group(required=True)
    scope.add_argument("--identity", metavar="EXTERNAL_ID", help="one identity's")
    scope.add_argument("--tag", help="shared by every identity with this tag")
    scope.add_argument("--owner", metavar="KEY_OWNER", help="every request with its keys")
    a.add_argument("--period", choices=PERIODS, default="monthly", help="(default monthly)")
    a.add_argument("--amount-usd", type=_dollars, metavar="DOLLARS")
    a.add_argument("--token-limit", type=count(10**15), metavar="N")
    a.add_argument("--rpm", type=count(10**9), metavar="N", help="requests per minute")
    a.add_argument(
        "--alert", type=count(100), action="append", metavar="PERCENT",
        help="alert when cost or tokens reach this percent (repeat)",
    )  # fmt: skip
    a.add_argument("--expires-at", metavar="RFC3339", help="e.g. 2027-01-01T00:00:00Z")
    a.add_argument("--inactive", action="store_true", help="created switched off")
    a = actions.add_parser("reset", parents=[common], help="this period's consumption back to zero")
    a.add_argument("id", help="the budget's _id")
    p.set_defaults(run=budgets)
