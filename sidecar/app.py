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

from sidecar import __version__, logs
from sidecar.api.errors import error_response, handle_exception
from sidecar.api.identities import IdentityController
from sidecar.api.usage import UsageController
from sidecar.errors import RequestTimeout
from sidecar.identity.store import IdentityStore
from sidecar.metrics import CONTENT_TYPE, Metrics, Sample
from sidecar.proxy.attribution import Attribution
from sidecar.proxy.hooks import HookController, RawAuthorize
from sidecar.proxy.inline import InlineProxy, Runtime
from sidecar.quota.limiter import Limiter
from sidecar.quota.service import Quota
from sidecar.settings import Settings
from sidecar.store.connect import RedisClient, connect
from sidecar.store.embedded import EmbeddedRedis, StoreHealth
from sidecar.store.keys import Keys
from sidecar.ui.controller import DashboardController
from sidecar.usage.pricing import Pricer
from sidecar.usage.recorder import Recorder
from sidecar.usage.spool import Spool

log = logging.getLogger("sidecar")
access = logging.getLogger("sidecar.access")

Clock = Callable[[], float]


class Health(msgspec.Struct):
    status: str
    policies: int = 0
    policy_reloads: int = 0
    policy_reload_errors: int = 0  # reloads refused: the last good policies stayed
    usage_waiting: int = 0  # identity-hours in memory, not yet written
    spool_bytes: int = 0  # usage on disk waiting for Redis (this process's)
    usage_dropped: int = 0  # identity-hours given up since start (memory or spool full)
    # Its restarts, when the store is the embedded one (absent with any other).
    embedded_store: StoreHealth | msgspec.UnsetType = msgspec.UNSET


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
        state.embedded.health() if state.embedded is not None else msgspec.UNSET,
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
METRICS = "/metrics"


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
    """The ASGI app: the proxy for traffic, Litestar for the sidecar's own endpoints."""

    def __init__(
        self,
        api: Litestar,
        proxy: InlineProxy,
        authorize: RawAuthorize,
        body_timeout_s: float,
        *,
        metrics: Metrics | None = None,
        access_log: bool = False,
    ) -> None:
        self.api = api
        self.proxy = proxy
        self.authorize = authorize
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics
        self.access_log = access_log

    @property
    def state(self) -> State:
        return self.api.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        app: Any
        if not owned(path):
            app, route = self.proxy, "proxy"
        elif method == "POST" and (path == AUTHORIZE or path.startswith(AUTHORIZE_PREFIX)):
            app, route = self.authorize, "hooks_authorize"
        elif path == METRICS and self.metrics is not None and method in ("GET", "HEAD"):
            app, route = self.serve_metrics, "ops"
        else:
            route = route_class(path)
            app = self.api
            if method not in _NO_BODY:
                receive = _body_deadline(receive, self.body_timeout_s)
        logged = self.access_log and route == "proxy"
        if self.metrics is None and not logged:
            await app(scope, receive, send)
            return
        await self._observed(app, route, logged, scope, receive, send)

    async def _observed(
        self, app: Any, route: str, logged: bool, scope: Any, receive: Any, send: Any
    ) -> None:
        """`app`, counting its answer's status (and writing the access line)."""
        status = 0

        async def observed_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

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
            if self.metrics is not None:
                self.metrics.request(route, status)
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

    async def serve_metrics(self, scope: Any, receive: Any, send: Any) -> None:
        assert self.metrics is not None
        body = self.metrics.render(self._samples())
        headers = [
            (b"content-type", CONTENT_TYPE.encode()),
            (b"content-length", b"%d" % len(body)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["method"] == "HEAD":
            body = b""
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _samples(self) -> list[Sample]:
        """What other parts count themselves, read when scraped."""
        runtime: Runtime | None = getattr(self.state, "runtime", None)
        if runtime is None:  # not started
            return []
        quota = runtime.quota
        recorder = runtime.attribution.recorder
        spool = recorder.spool
        return [
            Sample(
                "sidecar_redis_limit_check_errors_total",
                "counter",
                "Limit checks (with the identity lookup before them) Redis did not answer in "
                "time; on_error decided them",
                quota.limiter.errors,
            ),
            Sample(
                "sidecar_redis_usage_write_errors_total",
                "counter",
                "Usage writes that failed; their entries waited in memory or the spool",
                recorder.write_errors,
            ),
            Sample(
                "sidecar_usage_waiting_entries",
                "gauge",
                "Usage entries (identity-hours) in memory, not yet written",
                recorder.waiting,
            ),
            Sample(
                "sidecar_usage_spool_bytes",
                "gauge",
                "Usage waiting on disk for Redis (this process's spool files)",
                spool.bytes if spool is not None else 0,
            ),
            Sample(
                "sidecar_usage_spooled_entries_total",
                "counter",
                "Usage entries written to the spool",
                spool.appended if spool is not None else 0,
            ),
            Sample(
                "sidecar_usage_replayed_entries_total",
                "counter",
                "Usage entries replayed from spool files into Redis",
                spool.replayed if spool is not None else 0,
            ),
            Sample(
                "sidecar_ranking_index_errors_total",
                "counter",
                "Updates of the top-spenders index that failed (it orders the list only)",
                recorder.index_errors,
            ),
            Sample(
                "sidecar_usage_dropped_total",
                "counter",
                "Usage entries given up (memory or spool full)",
                recorder.dropped,
            ),
            Sample("sidecar_policies", "gauge", "Policies in force", len(quota.policies)),
            Sample(
                "sidecar_policy_reloads_total",
                "counter",
                "Policy reloads: ok, or refused (the last good policies stayed)",
                quota.reloads,
                (("result", "ok"),),
            ),
            Sample(
                "sidecar_policy_reloads_total",
                "counter",
                "",
                quota.reload_errors,
                (("result", "refused"),),
            ),
            Sample(
                "sidecar_build_info",
                "gauge",
                "The sidecar's version",
                1,
                (("version", __version__),),
            ),
        ]


def create_app(
    settings: Settings,
    *,
    admin_token: str,
    redis: RedisClient | None = None,
    clock: Clock = time.time,
    embedded: EmbeddedRedis | None = None,
) -> Sidecar:
    """The service. Connections open in the lifespan, never at import or build time."""
    runtime = Runtime()
    metrics = Metrics() if settings.server.metrics else None
    runtime.metrics = metrics

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
        recorder.metrics = metrics
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
        limiter.metrics = metrics
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
        route_handlers=[
            IdentityController,
            UsageController,
            HookController,
            DashboardController,
            healthz,
            readyz,
        ],
        dependencies={"store": Provide(provide_store, sync_to_thread=False)},
        exception_handlers={Exception: handle_exception},
        lifespan=[lifespan],
        state=State({"admin_token": admin_token, "settings": settings, "embedded": embedded}),
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
        metrics=metrics,
        access_log=settings.server.access_log,
    )
