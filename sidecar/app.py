from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.response import Response
from redis.exceptions import RedisError

from sidecar import __version__
from sidecar.api.errors import error_response, handle_exception
from sidecar.api.identities import IdentityController
from sidecar.identity.store import IdentityStore
from sidecar.settings import Settings
from sidecar.store.connect import RedisClient, connect
from sidecar.store.keys import Keys

log = logging.getLogger("sidecar")

Clock = Callable[[], float]


class Health(msgspec.Struct):
    status: str


@get("/healthz", operation_id="health", tags=["ops"], sync_to_thread=False)
def healthz() -> Health:
    return Health("ok")


@get("/readyz", operation_id="ready", tags=["ops"])
async def readyz(state: State) -> Response[Any]:
    try:
        await state.redis.ping()
    except (RedisError, OSError) as exc:
        return error_response(
            503, f"store unreachable: {type(exc).__name__}", code="store_unavailable"
        )
    return Response(Health("ready"))


def provide_store(state: State) -> IdentityStore:
    store: IdentityStore = state.identity_store
    return store


def create_app(
    settings: Settings,
    *,
    admin_token: str,
    redis: RedisClient | None = None,
    clock: Clock = time.time,
) -> Litestar:
    """The service. Connections open in the lifespan, never at import or build time."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        client = redis
        if client is None:
            if settings.redis.url is None:
                raise RuntimeError("no store URL: `sidecar serve` starts the embedded store")
            client = connect(settings.redis.url, timeout_ms=settings.redis.timeout_ms)
        store = IdentityStore(client, Keys(settings.redis.key_prefix), clock)
        try:
            await store.load_scripts()
        except (RedisError, OSError) as exc:
            log.warning("store not reachable at start-up (%s); scripts load on first use", exc)
        app.state.redis = client
        app.state.identity_store = store
        try:
            yield
        finally:
            if redis is None:
                await client.aclose()

    app = Litestar(
        route_handlers=[IdentityController, healthz, readyz],
        dependencies={"store": Provide(provide_store, sync_to_thread=False)},
        exception_handlers={Exception: handle_exception},
        lifespan=[lifespan],
        state=State({"admin_token": admin_token, "settings": settings}),
        openapi_config=OpenAPIConfig(
            title="LLM identity sidecar",
            version=__version__,
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        request_max_body_size=1_048_576 * 2,
        logging_config=None,
        debug=False,
    )
    return app
