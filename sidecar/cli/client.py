"""What the commands that talk to a running sidecar share: their options, the admin API client,
and plain-text tables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from sidecar.cli.config import TOKEN_FILE, stored_token
from sidecar.settings import ConfigError, load

DEFAULT_URL = "http://127.0.0.1:8080"


class CliError(Exception):
    """Printed on stderr; the command exits 2."""


class ApiError(CliError):
    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(f"the sidecar answered {status}: {error.get('message')}")
        self.status = status
        self.param = error.get("param")


class Api:
    """The admin API of a running sidecar, every failure as a CliError."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {token}"}, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._call("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self._call("POST", path, json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the sidecar at {self.url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code in (200, 201):
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


def segment(ref: str) -> str:
    """`ref` as one path segment of an API URL."""
    encoded = quote(ref, safe="")
    # Clients collapse "." and ".." segments: an id that is one of them goes encoded.
    return encoded.replace(".", "%2E") if encoded in (".", "..") else encoded


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


Action = Callable[[Api, argparse.Namespace], None]


def run_action(group: str, actions: Mapping[str, Action], args: argparse.Namespace) -> int:
    """`sidecar <group> <action>`: the action against the sidecar the options name."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per call is not for users
    url = args.url or os.environ.get("SIDECAR_URL") or DEFAULT_URL
    try:
        api = Api(url, _token(args))
        try:
            actions[args.action](api, args)
        finally:
            api.close()
    except CliError as exc:
        print(f"sidecar {group}: {exc}", file=sys.stderr)
        return 2
    return 0


# -- options ---------------------------------------------------------------------------------


def api_options() -> argparse.ArgumentParser:
    """The options of every action that calls the API, as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"the sidecar (default $SIDECAR_URL, else {DEFAULT_URL})")
    common.add_argument(
        "--token",
        help="admin token (default $SIDECAR_ADMIN_TOKEN, else the config's, else "
        "<data_dir>/admin_token)",
    )
    common.add_argument("--config", help="config file, to find the token (as for serve)")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    return common


def count(highest: int) -> Callable[[str], int]:
    """An argument type: a whole number from 1 to `highest`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 1 <= value <= highest:
            raise argparse.ArgumentTypeError(f"must be 1-{highest}")
        return value

    return parse


# -- output ----------------------------------------------------------------------------------


class Column:
    def __init__(self, title: str, value: Any, *, right: bool = False) -> None:
        self.title = title
        self.value = value  # row -> text
        self.right = right


def cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def table(rows: Sequence[Any], columns: Sequence[Column]) -> str:
    cells = [[cell(c.value(row)) for c in columns] for row in rows]
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


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))
