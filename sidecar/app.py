"""`create_app(settings)`: the service, its routes and their dependencies."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Router, get
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.response import Response

from sidecar import __version__
from sidecar.api.budgets import BudgetController
from sidecar.api.errors import error_response, handle_exception
from sidecar.api.hooks import HookController
from sidecar.api.identities import IdentityController
from sidecar.api.usage.controller import UsageController
from sidecar.dispatch import Sidecar, current
from sidecar.errors import StoreUnavailable
from sidecar.identity.indexer import IndexStatus
from sidecar.proxy.upstream import Upstream
from sidecar.services import build
from sidecar.settings import Settings
from sidecar.store.connect import RedisClient, connect
from sidecar.store.embedded import EmbeddedRedis, StoreHealth
from sidecar.store.errors import call
from sidecar.ui.budgets import BudgetPages
from sidecar.ui.controller import DashboardController
from sidecar.ui.templating import template_config

Clock = Callable[[], float]


SidecarDep = NamedDependency[Sidecar]


class Health(msgspec.Struct):
    status: str
    policies: int = 0
    policy_reloads: int = 0
    policy_reload_errors: int = 0  # reloads refused: the last good policies stayed
    usage_waiting: int = 0  # identity-hour-models in memory, not yet written
    spool_bytes: int = 0  # usage on disk waiting for Redis (this process's)
    usage_dropped: int = 0  # identity-hour-models given up since start (memory or spool full)
    # Its restarts, when the store is the embedded one (absent with any other).
    embedded_store: StoreHealth | msgspec.UnsetType = msgspec.UNSET
    # The search index as this process last checked it (once a minute); absent before that.
    search_index: IndexStatus | msgspec.UnsetType = msgspec.UNSET


@get("/healthz", operation_id="health", tags=["ops"], sync_to_thread=False)
def healthz(sidecar: SidecarDep) -> Health:
    live, recorder = sidecar.services.live, sidecar.services.recorder
    spool = recorder.backlog.spool
    return Health(
        "ok",
        len(live.policies),
        live.reloads,
        live.reload_errors,
        recorder.waiting,
        spool.bytes if spool is not None else 0,
        recorder.dropped,
        sidecar.embedded.health() if sidecar.embedded is not None else msgspec.UNSET,
        sidecar.services.search_index.last or msgspec.UNSET,
    )


@get("/readyz", operation_id="ready", tags=["ops"])
async def readyz(sidecar: SidecarDep) -> Response[Any]:
    try:
        await call(sidecar.services.redis.ping())
    except StoreUnavailable as exc:
        return error_response(503, exc.message, code="store_unavailable")
    return Response(Health("ready"))


def _provide(service: str) -> Provide:
    """A dependency: one of the services of the app the request came through."""

    def provide() -> Any:
        return getattr(current.get().services, service)

    return Provide(provide, sync_to_thread=False)


def _provide_sidecar() -> Sidecar:
    return current.get()


async def _admin_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: Any) -> None:
    await current.get().services.admin_guard(connection, handler)


async def _hook_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: Any) -> None:
    await current.get().services.hook_guard(connection, handler)


@functools.cache
def routes() -> Litestar:
    """The sidecar's own routes. They hold nothing of an app's own: a request finds its
    services and tokens through the Sidecar it came through (`dispatch.current`), so one
    Litestar app serves every app of the process. Registering the routes (Litestar parses and
    copies every handler's signature) costs tens of milliseconds; a process building several
    apps (the tests build hundreds) pays it once."""
    services = (
        "catalog",
        "merger",
        "usage_counters",
        "quota",
        "limiter",
        "sessions",
        "settlement",
        "authorizer",
        "budgets",
    )
    dependencies = {name: _provide(name) for name in services}
    dependencies["sidecar"] = Provide(_provide_sidecar, sync_to_thread=False)
    admin = Router(
        "/",
        route_handlers=[IdentityController, UsageController, BudgetController],
        guards=[_admin_guard],
    )
    hooks = Router("/", route_handlers=[HookController], guards=[_hook_guard])
    return Litestar(
        route_handlers=[admin, hooks, DashboardController, BudgetPages, healthz, readyz],
        dependencies=dependencies,
        exception_handlers={Exception: handle_exception},
        openapi_config=OpenAPIConfig(
            title="LLM identity sidecar",
            version=__version__,
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        template_config=template_config(),
        request_max_body_size=2 * 1_048_576,
        logging_config=None,
        debug=False,
    )


def create_app(
    settings: Settings,
    *,
    admin_token: str,
    redis: RedisClient | None = None,
    clock: Clock = time.time,
    embedded: EmbeddedRedis | None = None,
    started: Callable[[], None] | None = None,
) -> Sidecar:
    """The service. Nothing here opens a connection: the lifespan does, and then calls
    `started` (the serving process's own set-up: sidecar.cli.serve.settle_heap)."""
    # Only limit checks must give up after timeout_ms, and they do so themselves. Every other
    # command waits longer: a write that times out after Redis applied it would be written
    # again, and counted twice.
    if redis is None and settings.redis.url is None:
        raise RuntimeError("no store URL: `sidecar serve` starts the embedded store")
    client = redis or connect(
        settings.redis.url or "", timeout_ms=max(settings.redis.timeout_ms, 5000)
    )
    upstream = Upstream(settings.upstream.url, settings.upstream.timeout_s)
    services = build(
        settings, redis=client, upstream=upstream, clock=clock, admin_token=admin_token
    )

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await services.open()
        if started is not None:
            started()
        try:
            yield
        finally:
            await services.close()
            if redis is None:  # ours to close
                await client.aclose()

    return Sidecar(routes(), services, lifespan, embedded)
