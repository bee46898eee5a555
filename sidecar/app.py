from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.response import Response
from redis.exceptions import RedisError
from ulid import ULID

from sidecar import __version__
from sidecar.api.errors import error_response, handle_exception
from sidecar.api.identities import IdentityController
from sidecar.errors import RequestTimeout
from sidecar.identity.store import IdentityStore
from sidecar.proxy.attribution import Attribution
from sidecar.proxy.hooks import HookController, RawAuthorize
from sidecar.proxy.inline import InlineProxy, Runtime
from sidecar.quota.limiter import Limiter
from sidecar.quota.service import Quota
from sidecar.settings import Settings
from sidecar.store.connect import RedisClient, connect
from sidecar.store.keys import Keys
from sidecar.usage.pricing import Pricer
from sidecar.usage.recorder import Recorder
from sidecar.usage.spool import Spool

log = logging.getLogger("sidecar")

Clock = Callable[[], float]


class Health(msgspec.Struct):
    status: str
    policies: int = 0
    policy_reloads: int = 0
    policy_reload_errors: int = 0  # reloads refused: the last good policies stayed
    usage_waiting: int = 0  # identity-hours in memory, not yet written
    spool_bytes: int = 0  # usage on disk waiting for Redis (this process's)
    usage_dropped: int = 0  # identity-hours given up since start (memory or spool full)


@get("/healthz", operation_id="health", tags=["ops"], sync_to_thread=False)
def healthz(state: State) -> Health:
    quota = state.runtime.quota
    recorder = state.runtime.attribution.recorder
    return Health(
        "ok",
        len(quota.policies),
        quota.reloads,
        quota.reload_errors,
        recorder.waiting,
        recorder.spool.bytes if recorder.spool is not None else 0,
        recorder.dropped,
    )


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


# Paths the sidecar answers itself; everything else is forwarded upstream.
OWNED_PREFIXES = ("/v2/identities", "/v2/usage", "/hooks/", "/schema", "/ui")
OWNED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


def _body_deadline(receive: Any, seconds: float) -> Any:
    """`receive`, giving up on the request body `seconds` after the request began (a 408 from
    the routes' error handler); once the body is in, it waits as long as the server does."""
    deadline = asyncio.get_running_loop().time() + seconds
    done = False

    async def bounded() -> Any:
        nonlocal done
        if done:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(f"request body not received within {seconds:g} s") from None
        done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return bounded


AUTHORIZE = "/hooks/authorize"
AUTHORIZE_PREFIX = AUTHORIZE + "/"  # Envoy's ext_authz appends the original path


def owned(path: str) -> bool:
    return path in OWNED_PATHS or path.startswith(OWNED_PREFIXES)


class Sidecar:
    """The ASGI app: the proxy for traffic, Litestar for the sidecar's own endpoints."""

    def __init__(
        self, api: Litestar, proxy: InlineProxy, authorize: RawAuthorize, body_timeout_s: float
    ) -> None:
        self.api = api
        self.proxy = proxy
        self.authorize = authorize
        self.body_timeout_s = body_timeout_s

    @property
    def state(self) -> State:
        return self.api.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        path: str = scope["path"]
        if not owned(path):
            await self.proxy(scope, receive, send)
        elif scope["method"] == "POST" and (path == AUTHORIZE or path.startswith(AUTHORIZE_PREFIX)):
            await self.authorize(scope, receive, send)
        elif scope["method"] in _NO_BODY:
            await self.api(scope, receive, send)
        else:
            await self.api(scope, _body_deadline(receive, self.body_timeout_s), send)


def create_app(
    settings: Settings,
    *,
    admin_token: str,
    redis: RedisClient | None = None,
    clock: Clock = time.time,
) -> Sidecar:
    """The service. Connections open in the lifespan, never at import or build time."""
    runtime = Runtime()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        client = redis
        if client is None:
            if settings.redis.url is None:
                raise RuntimeError("no store URL: `sidecar serve` starts the embedded store")
            # Only limit checks must give up after timeout_ms, and they do so themselves. Every
            # other command waits longer: a write that times out after Redis applied it would
            # be written again, and counted twice.
            client = connect(settings.redis.url, timeout_ms=max(settings.redis.timeout_ms, 5000))
        keys = Keys(settings.redis.key_prefix)
        store = IdentityStore(client, keys, clock)
        spool = Spool(settings.data_path / "spool", str(ULID()), settings.metering.spool_max_bytes)
        recorder = Recorder(client, keys, clock, spool=spool)
        try:
            await store.load_scripts()
            await recorder.load_scripts()
        except (RedisError, OSError) as exc:
            log.warning("store not reachable at start-up (%s); scripts load on first use", exc)
        runtime.attribution = Attribution(
            settings, store, recorder, Pricer(settings.pricing.models), clock
        )
        limiter = Limiter(
            client,
            keys,
            timeout_ms=settings.redis.timeout_ms,
            on_error=settings.redis.on_error,
            # A lease outlives the longest request, then frees its slot if nobody did.
            lease_s=settings.upstream.timeout_s + 30,
            clock=clock,
        )
        with contextlib.suppress(RedisError, OSError):  # logged above; loaded on first use
            await limiter.load_scripts()
        runtime.quota = Quota(
            settings, limiter, store, clock, on_reload=runtime.attribution.use_keys
        )
        runtime.attribution.on_profile = runtime.quota.remember_profile
        watcher = asyncio.create_task(runtime.quota.watch())
        runtime.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, ttl_dns_cache=300, keepalive_timeout=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
        app.state.redis = client
        app.state.identity_store = store
        app.state.runtime = runtime
        recorder.start()  # replays what earlier processes left in the spool
        try:
            yield
        finally:
            watcher.cancel()
            if runtime.tasks:
                await asyncio.wait(list(runtime.tasks), timeout=10)
            # What Redis does not take within a few seconds waits in the spool for the next
            # process with this data dir.
            await recorder.close(grace_s=5.0)
            await runtime.session.close()
            if redis is None:
                await client.aclose()

    api = Litestar(
        route_handlers=[IdentityController, HookController, healthz, readyz],
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
        request_max_body_size=2 * 1_048_576,
        logging_config=None,
        debug=False,
    )
    return Sidecar(
        api,
        InlineProxy(settings, runtime),
        RawAuthorize(settings, runtime, admin_token),
        settings.server.body_timeout_s,
    )
