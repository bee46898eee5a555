"""`sidecar identities list|get|top|merge`: the identity API from a terminal."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sidecar.cli.client import (
    Api,
    ApiError,
    CliError,
    Column,
    api_options,
    cell,
    count,
    money,
    print_json,
    run_action,
    segment,
    table,
)

SORTS = ("cost", "requests", "error_rate")


def _metric(name: str) -> Any:
    def value(identity: dict[str, Any]) -> Any:
        metrics = identity.get("metrics") or {}
        if name == "total_cost":
            return money(metrics.get("total_cost", 0.0))
        if name == "error_rate":
            return f"{metrics.get('error_rate', 0.0) * 100:.1f}%"
        return metrics.get(name, 0)

    return value


LIST_COLUMNS = [
    Column("_ID", lambda i: i["_id"]),
    Column("EXTERNAL_ID", lambda i: i["external_id"]),
    Column("NAME", lambda i: i.get("display_name")),
    Column("TAGS", lambda i: ",".join(i.get("tags") or [])),
    Column("REQUESTS", _metric("total_requests"), right=True),
    Column("COST_USD", _metric("total_cost"), right=True),
    Column("TOKENS", _metric("total_tokens"), right=True),
    Column("ERRORS", _metric("error_rate"), right=True),
]


def identities_list(api: Api, args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"limit": args.limit, "include_metrics": "true"}
    if args.search:
        params["search"] = args.search
    if args.tag:
        params["filter_by.tags"] = args.tag
    if args.after:
        params["starting_after"] = args.after
    page = api.get("/v2/identities", params)
    if args.json:
        print_json(page)
        return
    print(table(page["data"], LIST_COLUMNS))
    if page.get("has_more") and page["data"]:
        print(f"(more: --after {page['data'][-1]['_id']})", file=sys.stderr)


def identities_get(api: Api, args: argparse.Namespace) -> None:
    try:
        identity = api.get(f"/v2/identities/{segment(args.id)}", {"include_metrics": "true"})
    except ApiError as exc:
        if exc.status == 404:
            raise CliError(f"no identity with _id or external_id {args.id!r}") from None
        raise
    if args.json:
        print_json(identity)
        return
    metrics = identity.get("metrics") or {}
    rows = [
        ("_id", identity["_id"]),
        ("external_id", identity["external_id"]),
        ("display_name", identity.get("display_name")),
        ("email", identity.get("email")),
        ("avatar_url", identity.get("avatar_url")),
        ("tags", ", ".join(identity.get("tags") or [])),
        ("metadata", json.dumps(identity.get("metadata") or {}, ensure_ascii=False)),
        ("created", identity.get("created")),
        ("updated", identity.get("updated")),
        ("", ""),
        ("last 30 days", ""),
        ("requests", metrics.get("total_requests", 0)),
        ("error_rate", _metric("error_rate")(identity)),
        ("cost_usd", _metric("total_cost")(identity)),
        ("tokens", metrics.get("total_tokens", 0)),
        ("input_tokens", metrics.get("input_tokens", 0)),
        ("output_tokens", metrics.get("output_tokens", 0)),
        ("rate_limited", metrics.get("rate_limited_requests", 0)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {cell(value)}".rstrip())


def identities_top(api: Api, args: argparse.Namespace) -> None:
    params = {"sort": args.by, "include_metrics": "true", "limit": args.limit}
    try:
        page = api.get("/v2/identities", params)
    except ApiError as exc:
        if exc.status == 400 and exc.param in ("sort", None):
            raise CliError(
                f"this sidecar cannot rank identities by {args.by} ({exc}); "
                "`top` needs a sidecar whose GET /v2/identities takes `sort`"
            ) from None
        raise
    if args.json:
        print_json(page)
        return
    rank = {id(identity): n for n, identity in enumerate(page["data"], 1)}
    columns = [Column("#", lambda i: rank[id(i)], right=True), *LIST_COLUMNS]
    print(table(page["data"], columns))


def identities_merge(api: Api, args: argparse.Namespace) -> None:
    try:
        survivor = api.post(f"/v2/identities/{segment(args.into)}/merge", {"from": args.source})
    except ApiError as exc:
        if exc.status == 404:
            missing = args.source if exc.param == "from" else args.into
            raise CliError(f"no identity with _id or external_id {missing!r}") from None
        raise
    if args.json:
        print_json(survivor)
        return
    merged = ", ".join(survivor.get("merged_from") or [])
    print(f"{survivor['_id']}  {survivor['external_id']}  (merged from: {merged})")


_ACTIONS = {
    "list": identities_list,
    "get": identities_get,
    "top": identities_top,
    "merge": identities_merge,
}


def identities(args: argparse.Namespace) -> int:
    return run_action("identities", _ACTIONS, args)


def add_commands(commands: Any) -> None:
    common = api_options()
    p = commands.add_parser(
        "identities", help="list, show and rank identities through a running sidecar's API"
    )
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser(
        "list", parents=[common], help="identities, newest first, with 30-day metrics"
    )
    a.add_argument("--search", help="substring of external id, display name or email")
    a.add_argument("--tag", action="append", help="with this tag (repeat: any of them)")
    a.add_argument("--limit", type=count(200), default=20, help="1-200 (default 20)")
    a.add_argument("--after", metavar="_ID", help="the page after this identity")
    a = actions.add_parser(
        "get", parents=[common], help="one identity's profile and 30-day metrics"
    )
    a.add_argument("id", help="_id or external id")
    a = actions.add_parser(
        "top", parents=[common], help="the identities with the most, over 30 days"
    )
    a.add_argument("--by", choices=SORTS, default="cost", help="what to rank by (default cost)")
    a.add_argument("--limit", type=count(200), default=10, help="1-200 (default 10)")
    a = actions.add_parser(
        "merge",
        parents=[common],
        help="merge one identity into another: its usage, limits and budgets move, its "
        "external id becomes an alias",
    )
    a.add_argument("into", help="the surviving identity: _id or external id")
    a.add_argument("source", metavar="from", help="the identity merged into it")
    p.set_defaults(run=identities)
