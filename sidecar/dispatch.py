"""The ASGI app users reach: the proxy for traffic, raw routes for the hot hooks and the
metrics, Litestar for the sidecar's own endpoints."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

from litestar.enums import ScopeType

from sidecar import logs
from sidecar.asgi import send_json, with_body_deadline
from sidecar.observe.prometheus import CONTENT_TYPE

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.types import (
        ASGIApp,
        HTTPScope,
        LifeSpanReceive,
        LifeSpanSend,
        Receive,
        Scope,
        Send,
    )

    from sidecar.services import Services
    from sidecar.store.embedded import EmbeddedRedis

access = logging.getLogger("sidecar.access")

# Paths the sidecar answers itself; everything else is forwarded upstream.
OWNED_PREFIXES = ("/v2/identities", "/v2/usage", "/v2/budgets", "/hooks/", "/schema", "/ui")
OWNED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
AUTHORIZE = "/hooks/authorize"
AUTHORIZE_PREFIX = AUTHORIZE + "/"  # Envoy's ext_authz appends the original path
METRICS = "/metrics"
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})
# The Sidecar a request to the sidecar's own routes came through: the routes are built once per
# process (app.py), and their dependencies and guards find this app's services and tokens here.
# Set before each such request enters Litestar, in the request's own task (a scope key would do
# too, but a dependency reading the scope costs Litestar a validation per request).
current: ContextVar[Sidecar] = ContextVar("sidecar")

Lifespan = Callable[[], AbstractAsyncContextManager[None]]


def owned(path: str) -> bool:
    return path in OWNED_PATHS or path.startswith(OWNED_PREFIXES)


def route_class(path: str) -> str:
    """The `route` label of an owned path (the proxy's and the hooks' are set apart)."""
    if path.startswith("/hooks/"):
        return "hooks_usage" if path == "/hooks/usage" else "api"
    if path.startswith("/ui"):
        return "ui"
    if path in OWNED_PATHS or path.startswith("/schema"):
        return "ops"
    return "api"


class Sidecar:
    def __init__(
        self,
        api: Litestar,
        services: Services,
        lifespan: Lifespan,
        embedded: EmbeddedRedis | None = None,
    ) -> None:
        self.api = api
        self.services = services
        self.lifespan = lifespan  # entered at the server's start-up, left at its shutdown
        self.embedded = embedded  # the store, when it is the embedded one (for /healthz)
        self.proxy = services.proxy
        self.authorize = services.raw_authorize
        self.counters = services.counters
        self.body_timeout_s = services.settings.server.body_timeout_s
        self.access_log = services.settings.server.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if cast("dict[str, Any]", scope)["type"] == "lifespan":  # none of Litestar's Scope types
            await self.serve_lifespan(cast("LifeSpanReceive", receive), cast("LifeSpanSend", send))
            return
        if scope["type"] != ScopeType.HTTP:
            current.set(self)
            await self.api(scope, receive, send)
            return
        path = scope["path"]
        method = scope["method"]
        app: Any
        if not owned(path):
            app, route = self.proxy, "proxy"
        elif method == "POST" and (path == AUTHORIZE or path.startswith(AUTHORIZE_PREFIX)):
            app, route = self.authorize, "hooks_authorize"
        elif path == METRICS and self.counters is not None and method in ("GET", "HEAD"):
            app, route = self.serve_metrics, "ops"
        else:
            route = route_class(path)
            app = self.api
            current.set(self)
            if method not in _NO_BODY:
                receive = with_body_deadline(receive, self.body_timeout_s)
        logged = self.access_log and route == "proxy"
        if self.counters is None and not logged:
            await app(scope, receive, send)
            return
        await self._observed(app, route, logged, scope, receive, send)

    async def _observed(
        self,
        app: ASGIApp,
        route: str,
        logged: bool,
        scope: HTTPScope,
        receive: Receive,
        send: Send,
    ) -> None:
        """`app`, counting its answer's status (and writing the access line)."""
        status = 0

        def observed_send(message: Any) -> Awaitable[None]:
            # Not a coroutine of its own: the server's send is awaited directly (one frame
            # fewer on each of a stream's sends).
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        started = 0.0
        if logged:
            started = time.perf_counter()
            logs.begin()
        try:
            await app(scope, receive, observed_send)
        except BaseException:
            status = status or 500  # the server answers 500 when nothing was sent
            raise
        finally:
            if self.counters is not None:
                self.counters.request(route, status)
            if logged:
                duration_ms = round((time.perf_counter() - started) * 1000, 3)
                fields = {
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": duration_ms,
                }
                access.info(
                    "%s %s %d %.1f ms",
                    scope["method"],
                    scope["path"],
                    status,
                    duration_ms,
                    extra={"fields": fields},
                )

    async def serve_lifespan(self, receive: LifeSpanReceive, send: LifeSpanSend) -> None:
        """The ASGI lifespan protocol, answered as Litestar answers it, around `self.lifespan`
        (the routes' Litestar app is shared, so its own lifespan is not run)."""
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except BaseException:
            message = traceback.format_exc()
            if started:
                await send({"type": "lifespan.shutdown.failed", "message": message})
            else:
                await send({"type": "lifespan.startup.failed", "message": message})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    async def serve_metrics(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        exposition = self.services.exposition
        assert exposition is not None
        await send_json(
            send,
            200,
            exposition.render(),
            content_type=CONTENT_TYPE.encode(),
            head=scope["method"] == "HEAD",
        )
