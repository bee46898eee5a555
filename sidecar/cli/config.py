"""`sidecar check-config`, and the config and admin token every command starts from."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any

from sidecar.settings import ConfigError, Settings, load

TOKEN_FILE = "admin_token"  # noqa: S105 (a file name)


def load_checked(path: str | None) -> Settings:
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


def check_config(args: argparse.Namespace) -> int:
    from sidecar.quota import loader

    settings = load_checked(args.config)
    policies = loader.load(settings.policies.paths, settings.base_dir)
    print(f"{settings.source}: ok")
    for file in policies.files:
        names = [p.name for p in policies.policies if p.source == file]
        print(f"{file}: ok ({', '.join(names) or 'no policies'})")
    return 0


def add_commands(commands: Any) -> None:
    p = commands.add_parser("check-config", help="validate the config and every policy file")
    p.add_argument("--config", help="config file (default ./config.toml when present)")
    p.set_defaults(run=check_config)
