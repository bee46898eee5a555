from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from sidecar.settings import ConfigError, Settings, load

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


def app_from_env() -> object:
    """Factory for each server worker: settings from the environment `serve` prepared."""
    from sidecar.app import create_app

    settings = _settings(None)
    return create_app(settings, admin_token=admin_token(settings, create=False))


def serve(args: argparse.Namespace) -> int:
    from sidecar.store.connect import embedded

    settings = _settings(args.config)
    if args.config:
        os.environ["SIDECAR_CONFIG"] = str(Path(args.config).resolve())
    store = None
    if settings.redis.url is None:
        store = embedded(settings.data_path)
        store.start()
        os.environ["SIDECAR_REDIS_URL"] = store.url
        log.info(
            "no [redis] url: using the embedded Redis at %s (data in %s)", store.url, store.data_dir
        )
        settings = _settings(args.config)
    if not settings.admin.token and stored_token(settings):
        log.info("admin token read from %s", settings.data_path / TOKEN_FILE)
    token = admin_token(settings, create=True)
    try:
        _run_server(settings, token)
    finally:
        if store is not None and store.process is not None:
            store.stop()
            log.info("embedded Redis stopped")
    return 0


def _run_server(settings: Settings, token: str) -> None:
    import uvicorn

    from sidecar.app import create_app

    app: Any = "sidecar.cli:app_from_env"
    if settings.server.workers == 1:
        app = create_app(settings, admin_token=token)
    print(f"sidecar listening on http://{settings.server.host}:{settings.server.port}", flush=True)
    uvicorn.run(
        app,
        factory=settings.server.workers > 1,
        workers=settings.server.workers if settings.server.workers > 1 else None,
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        proxy_headers=False,  # the sidecar reads no X-Forwarded-*; the middleware costs per request
        log_level="warning",
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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

    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
