"""`sidecar serve`: the service, on the configured Redis or the embedded one."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar import logs
from sidecar.cli.config import TOKEN_FILE, admin_token, load_checked, stored_token
from sidecar.settings import Settings

if TYPE_CHECKING:
    from sidecar.store.embedded import EmbeddedRedis

log = logging.getLogger("sidecar")

# Allocations (net of frees) between two young-generation collections, against CPython's 700.
# A request frees what it made by reference counting, but with tens of requests in flight
# the net count crosses 700 every dozen requests, and each collection walks every in-flight
# request's objects: 7% of the worker's CPU at saturation (gc.callbacks, bench.proxy_bench's
# load), for nothing found. At this threshold the same load ran 30 s without one collection.
GC_YOUNG = 50_000


def _logging(settings: Settings, *secret: str | None) -> None:
    logs.configure(
        settings.server.log_format,
        settings.server.log_level,
        secrets=[
            settings.admin.token,
            settings.admin.hook_token,
            # A collector's credentials; short values (a tenant name) would blank out too much.
            *(v for v in settings.telemetry.headers.values() if len(v) >= 8),
            *secret,
        ],
    )


def app_from_env() -> object:
    """Factory for each server worker: settings from the environment `serve` prepared."""
    from sidecar.app import create_app
    from sidecar.store.embedded import embedded, socket_path

    settings = load_checked(None)
    token = admin_token(settings, create=False)
    _logging(settings, token)  # a worker is a new process: its logging is not set up yet
    store = None
    if settings.redis.url == f"unix://{socket_path(settings.data_path)}":
        store = embedded(settings.data_path)  # for /healthz; `serve` runs and watches it
    return create_app(settings, admin_token=token, embedded=store, started=settle_heap)


def settle_heap() -> None:
    """Once the service has started: what start-up made (modules, routes, the app, about
    100,000 objects) leaves the collector's view for good (gc.freeze), so that an older
    generation's collection walks only what came later; young collections run at GC_YOUNG.
    bench/RESULTS.md, "the garbage collector": +20-25% requests per second at saturation."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, older, oldest)


def protected_mode(settings: Settings) -> str | None:
    """Why `serve` must not start (protected mode), or None: any caller could claim any
    identity, on an address others can reach."""
    identity = settings.identity
    if identity.trust is not None or identity.trusted_networks or _loopback(settings.server.host):
        return None
    return (
        f"refusing to listen on {settings.server.host}: with the default [identity] trust, "
        "any caller that reaches this address can claim any identity, and so walk around "
        "every limit. Choose one:\n"
        '  1. [identity] trust = "keys" and [[api_keys]] with may_assert (SIDECAR_TRUST=keys):'
        " only listed keys claim, and only the ids they may assert;\n"
        '  2. [identity] trusted_networks = ["10.0.0.0/8", ...] (SIDECAR_TRUSTED_NETWORKS): '
        "only your gateway's network claims;\n"
        '  3. [identity] trust = "any" written out (SIDECAR_TRUST=any), if nothing untrusted '
        "can reach this address.\n"
        "See docs/trust.md."
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(args: argparse.Namespace) -> int:
    from sidecar.store.embedded import EmbeddedStoreError, embedded

    if args.workers is not None:  # through the environment: each worker reads its settings
        os.environ["SIDECAR_WORKERS"] = str(args.workers)
    settings = load_checked(args.config)
    _logging(settings)
    refused = protected_mode(settings)
    if refused is not None:
        print(f"sidecar serve: {refused}", file=sys.stderr)
        return 2
    if settings.identity.trust == "any" and not settings.identity.trusted_networks:
        log.warning(
            'identity trust = "any": every caller that reaches %s may claim any identity '
            "(docs/trust.md)",
            settings.server.host,
        )
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
            settings = load_checked(args.config)
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
    from sidecar.connections import ConnectionGuard

    app: Any = "sidecar.cli.serve:app_from_env"
    if settings.server.workers == 1:
        app = create_app(settings, admin_token=token, embedded=store, started=settle_heap)
    print(f"sidecar listening on http://{settings.server.host}:{settings.server.port}", flush=True)
    uvicorn.run(
        app,
        factory=settings.server.workers > 1,
        workers=settings.server.workers if settings.server.workers > 1 else None,
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        # httptools, with a header deadline and a connection cap (uvicorn's limit_concurrency
        # would answer 503 to requests instead; see sidecar.connections).
        http=ConnectionGuard(
            settings.server.header_timeout_s, settings.server.max_connections
        ).protocol,
        access_log=False,  # the sidecar writes its own, when [server] access_log is true
        # Not uvicorn's X-Forwarded-For rewrite: it would trust any local peer's header. The
        # sidecar reads it itself, and only from `trusted_networks` (identity/caller.py).
        proxy_headers=False,
        log_config=None,  # uvicorn's loggers propagate to the sidecar's handler (sidecar.logs)
        log_level="error" if settings.server.log_level == "error" else "warning",
        timeout_keep_alive=int(settings.server.keepalive_s),
        timeout_graceful_shutdown=int(settings.server.drain_s),
    )


def add_commands(commands: Any) -> None:
    p = commands.add_parser("serve", help="run the service")
    p.add_argument("--config", help="config file (default ./config.toml when present)")
    p.add_argument(
        "--workers",
        type=_count,
        metavar="N",
        help="server worker processes on the one port (default: [server] workers, else 1)",
    )
    p.set_defaults(run=serve)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value
