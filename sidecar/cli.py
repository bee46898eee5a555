from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sidecar import logs
from sidecar.settings import ConfigError, Settings, load

if TYPE_CHECKING:
    from sidecar.store.embedded import EmbeddedRedis

log = logging.getLogger("sidecar")

TOKEN_FILE = "admin_token"  # noqa: S105 (a file name)


def _settings(path: str | None) -> Settings:
    """The config and its policy files, checked; every problem printed, then exit 2."""
    from sidecar.quota import loader

    try:
        settings = load(path)
        loader.load(settings.policies.paths, settings.base_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def stored_token(settings: Settings) -> str | None:
    file = settings.data_path / TOKEN_FILE
    try:
        return file.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def admin_token(settings: Settings, *, create: bool) -> str:
    """The configured token, else the one stored under the data dir, else (create) a new one."""
    if settings.admin.token:
        return settings.admin.token
    token = stored_token(settings)
    if token:
        return token
    if not create:
        raise SystemExit("no admin token configured and none stored; run `sidecar serve` once")
    settings.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    file = settings.data_path / TOKEN_FILE
    token = "sk-sidecar-" + secrets.token_urlsafe(32)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token + "\n")
    # Printed once, now; later starts read the file and print only where it is.
    print(f"admin token (stored in {file}, shown once): {token}", flush=True)
    return token


def _logging(settings: Settings, *secret: str | None) -> None:
    logs.configure(
        settings.server.log_format,
        settings.server.log_level,
        secrets=[settings.admin.token, settings.admin.hook_token, *secret],
    )


def app_from_env() -> object:
    """Factory for each server worker: settings from the environment `serve` prepared."""
    from sidecar.app import create_app
    from sidecar.store.embedded import embedded, socket_path

    settings = _settings(None)
    token = admin_token(settings, create=False)
    _logging(settings, token)  # a worker is a new process: its logging is not set up yet
    store = None
    if settings.redis.url == f"unix://{socket_path(settings.data_path)}":
        store = embedded(settings.data_path)  # for /healthz; `serve` runs and watches it
    return create_app(settings, admin_token=token, embedded=store)


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(args: argparse.Namespace) -> int:
    from sidecar.store.embedded import EmbeddedStoreError, embedded

    settings = _settings(args.config)
    _logging(settings)
    if args.config:
        os.environ["SIDECAR_CONFIG"] = str(Path(args.config).resolve())
    # uvicorn handles SIGTERM (draining), then raises it again once it has shut down, for a
    # supervisor to see; that second one must not kill this process before it has left the
    # embedded store below.
    signal.signal(signal.SIGTERM, _stopped)
    store: EmbeddedRedis | None = None
    if settings.redis.url is None:
        try:
            store = embedded(settings.data_path)
            started = store.open()
        except EmbeddedStoreError as exc:
            print(f"sidecar serve: {exc}", file=sys.stderr)
            return 2
        os.environ["SIDECAR_REDIS_URL"] = store.url
        log.info(
            "no [redis] url: %s the embedded Redis at %s (data in %s)",
            "started" if started else "sharing",
            store.url,
            store.data_dir,
        )
    try:
        if store is not None:
            settings = _settings(args.config)
        if not settings.admin.token and stored_token(settings):
            log.info("admin token read from %s", settings.data_path / TOKEN_FILE)
        token = admin_token(settings, create=True)
        logs.redact(token)
        _run_server(settings, token, store)
    finally:
        if store is not None and store.close():
            log.info("embedded Redis stopped")
    return 0


def _run_server(settings: Settings, token: str, store: EmbeddedRedis | None) -> None:
    import uvicorn

    from sidecar.app import create_app

    app: Any = "sidecar.cli:app_from_env"
    if settings.server.workers == 1:
        app = create_app(settings, admin_token=token, embedded=store)
    print(f"sidecar listening on http://{settings.server.host}:{settings.server.port}", flush=True)
    uvicorn.run(
        app,
        factory=settings.server.workers > 1,
        workers=settings.server.workers if settings.server.workers > 1 else None,
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http="httptools",
        access_log=False,  # the sidecar writes its own, when [server] access_log is true
        proxy_headers=False,  # the sidecar reads no X-Forwarded-*; the middleware costs per request
        log_config=None,  # uvicorn's loggers propagate to the sidecar's handler (sidecar.logs)
        log_level="error" if settings.server.log_level == "error" else "warning",
        timeout_keep_alive=int(settings.server.keepalive_s),
        timeout_graceful_shutdown=int(settings.server.drain_s),
    )


def check_config(args: argparse.Namespace) -> int:
    from sidecar.quota import loader

    settings = _settings(args.config)
    policies = loader.load(settings.policies.paths, settings.base_dir)
    print(f"{settings.source}: ok")
    for file in policies.files:
        names = [p.name for p in policies.policies if p.source == file]
        print(f"{file}: ok ({', '.join(names) or 'no policies'})")
    return 0


def mock_upstream(args: argparse.Namespace) -> int:
    from sidecar import mock

    return mock.run(args)


# -- sidecar identities: the identity API from a terminal -----------------------------------

DEFAULT_URL = "http://127.0.0.1:8080"
SORTS = ("cost", "requests", "error_rate")


class CliError(Exception):
    """Printed on stderr; the command exits 2."""


class Column:
    def __init__(self, title: str, value: Any, *, right: bool = False) -> None:
        self.title = title
        self.value = value  # row -> text
        self.right = right


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def table(rows: Sequence[Any], columns: Sequence[Column]) -> str:
    cells = [[_cell(c.value(row)) for c in columns] for row in rows]
    widths = [max([len(c.title)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = []
    for texts in [[c.title for c in columns], *cells]:
        parts = [
            t.rjust(w) if c.right else t.ljust(w)
            for t, w, c in zip(texts, widths, columns, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def money(dollars: float) -> str:
    whole, _, fraction = f"{dollars:.6f}".rstrip("0").partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


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


class Api:
    """The identity API of a running sidecar, every failure as a CliError."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {token}"}, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            response = self.http.get(path, params=params)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the sidecar at {self.url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 200:
            if body is None:
                raise CliError(f"{self.url}{path}: the answer is not JSON; is this a sidecar?")
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            error = {"message": response.text[:200].strip() or response.reason_phrase}
        if response.status_code == 401:
            raise CliError(
                f"the sidecar at {self.url} refused the admin token: {error.get('message')} "
                "(pass --token, or set SIDECAR_ADMIN_TOKEN)"
            )
        raise ApiError(response.status_code, error)


class ApiError(CliError):
    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(f"the sidecar answered {status}: {error.get('message')}")
        self.status = status
        self.param = error.get("param")


def _token(args: argparse.Namespace) -> str:
    token: str | None = args.token or os.environ.get("SIDECAR_ADMIN_TOKEN")
    if token:
        return token
    try:
        settings = load(args.config)
    except ConfigError as exc:
        raise CliError("; ".join(exc.problems)) from None
    token = settings.admin.token or stored_token(settings)
    if not token:
        raise CliError(
            "no admin token: pass --token, set SIDECAR_ADMIN_TOKEN, or run where "
            f"{settings.data_path / TOKEN_FILE} is readable"
        )
    return token


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


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
        _print_json(page)
        return
    print(table(page["data"], LIST_COLUMNS))
    if page.get("has_more") and page["data"]:
        print(f"(more: --after {page['data'][-1]['_id']})", file=sys.stderr)


def _segment(ref: str) -> str:
    encoded = quote(ref, safe="")
    # Clients collapse "." and ".." segments: an id that is one of them goes encoded.
    return encoded.replace(".", "%2E") if encoded in (".", "..") else encoded


def identities_get(api: Api, args: argparse.Namespace) -> None:
    try:
        identity = api.get(f"/v2/identities/{_segment(args.id)}", {"include_metrics": "true"})
    except ApiError as exc:
        if exc.status == 404:
            raise CliError(f"no identity with _id or external_id {args.id!r}") from None
        raise
    if args.json:
        _print_json(identity)
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
        print(f"{name.ljust(width)}  {_cell(value)}".rstrip())


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
        _print_json(page)
        return
    rank = {id(identity): n for n, identity in enumerate(page["data"], 1)}
    columns = [Column("#", lambda i: rank[id(i)], right=True), *LIST_COLUMNS]
    print(table(page["data"], columns))


def identities(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per call is not for users
    url = args.url or os.environ.get("SIDECAR_URL") or DEFAULT_URL
    try:
        api = Api(url, _token(args))
        try:
            {"list": identities_list, "get": identities_get, "top": identities_top}[args.action](
                api, args
            )
        finally:
            api.close()
    except CliError as exc:
        print(f"sidecar identities: {exc}", file=sys.stderr)
        return 2
    return 0


def _limit(highest: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 1 <= value <= highest:
            raise argparse.ArgumentTypeError(f"must be 1-{highest}")
        return value

    return parse


def _add_identities(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"the sidecar (default $SIDECAR_URL, else {DEFAULT_URL})")
    common.add_argument(
        "--token",
        help="admin token (default $SIDECAR_ADMIN_TOKEN, else the config's, else "
        "<data_dir>/admin_token)",
    )
    common.add_argument("--config", help="config file, to find the token (as for serve)")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    p = commands.add_parser(
        "identities", help="list, show and rank identities through a running sidecar's API"
    )
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser(
        "list", parents=[common], help="identities, newest first, with 30-day metrics"
    )
    a.add_argument("--search", help="substring of external id, display name or email")
    a.add_argument("--tag", action="append", help="with this tag (repeat: any of them)")
    a.add_argument("--limit", type=_limit(200), default=20, help="1-200 (default 20)")
    a.add_argument("--after", metavar="_ID", help="the page after this identity")
    a = actions.add_parser(
        "get", parents=[common], help="one identity's profile and 30-day metrics"
    )
    a.add_argument("id", help="_id or external id")
    a = actions.add_parser(
        "top", parents=[common], help="the identities with the most, over 30 days"
    )
    a.add_argument("--by", choices=SORTS, default="cost", help="what to rank by (default cost)")
    a.add_argument("--limit", type=_limit(200), default=10, help="1-200 (default 10)")
    p.set_defaults(run=identities)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="LLM identity sidecar")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the service")
    p.add_argument("--config", help="config file (default ./config.toml when present)")
    p.set_defaults(run=serve)

    p = commands.add_parser("check-config", help="validate the config and every policy file")
    p.add_argument("--config", help="config file (default ./config.toml when present)")
    p.set_defaults(run=check_config)

    from sidecar import mock

    p = commands.add_parser("mock-upstream", help="a fake OpenAI/Anthropic upstream")
    mock.add_arguments(p)
    p.set_defaults(run=mock_upstream)

    _add_identities(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
