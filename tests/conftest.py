from __future__ import annotations

import functools
import gc
import importlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from sidecar.app import create_app
from sidecar.mock import MockServer, start_mock
from sidecar.settings import Settings, parse
from sidecar.store.connect import MAX_CONNECTIONS
from sidecar.testing.redis_server import RedisServer
from sidecar.testing.serving import ApiClient, serve
from tests.support.auth import ADMIN_TOKEN, AUTH
from tests.support.clock import FakeClock
from tests.support.env import Env, MakeEnv

if TYPE_CHECKING:
    from sidecar.testing.otlp import OtlpReceiver

# Every test starts its own app: one store connection warmed at start-up rather than the default
# 64 (tests/test_services.py and the cluster tests check the warm pool itself).
WARM = 1


def pytest_collection_finish(session: pytest.Session) -> None:
    # What collecting imported (the SDKs, litellm, hypothesis, schemathesis) lives as long as
    # the run: out of the garbage collector's way, full collections cost half as much.
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def _one_tls_context() -> Iterator[None]:
    """httpx (and httpx2, anthropic's) loads the whole CA bundle into a new TLS context for every
    client it builds (~40 ms), and the tests build hundreds (theirs, the SDKs'), all for plain
    HTTP to local servers: every client without a context of its own shares the first one."""
    with pytest.MonkeyPatch.context() as patch:
        for package in ("httpx", "httpx2"):
            try:
                transports = importlib.import_module(f"{package}._transports.default")
            except ImportError:
                continue
            build = transports.create_ssl_context
            patch.setattr(transports, "create_ssl_context", _sharing_defaults(build))
        yield


@pytest.fixture(scope="session", autouse=True)
def _redis_version_read_once() -> Iterator[None]:
    """redis-py reads its own version from the installed package's metadata for every
    connection it makes (to name itself to the server); the tests make thousands."""
    import redis.utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(redis.utils, "get_lib_version", functools.cache(redis.utils.get_lib_version))
        yield


def _sharing_defaults(build: Callable[..., ssl.SSLContext]) -> Callable[..., ssl.SSLContext]:
    shared = functools.cache(lambda trust_env: build(verify=True, trust_env=trust_env))

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is True and cert is None:
            return shared(trust_env)
        return build(verify=verify, cert=cert, trust_env=trust_env)

    return create_ssl_context


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, max_connections=MAX_CONNECTIONS)  # as connect()'s
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data_dir = str(tmp_path_factory.mktemp("data"))
    redis = {"url": redis_server.url, "warm_connections": WARM}
    return parse({"redis": redis, "server": {"data_dir": data_dir}})


@pytest.fixture
async def api(redis: Redis, settings: Settings, clock: FakeClock) -> AsyncIterator[ApiClient]:
    app = create_app(settings, admin_token=ADMIN_TOKEN, redis=redis, clock=clock)
    async with serve(app) as url, ApiClient(base_url=url, headers=AUTH) as client:
        client.app = app
        yield client


@pytest.fixture
async def make_env(
    redis: Redis,
    redis_server: RedisServer,
    clock: FakeClock,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[MakeEnv]:
    opened: list[Any] = []

    async def make(
        upstream_url: str | None = None,
        real_clock: bool = False,
        redis_client: Redis | None = None,
        **config: Any,
    ) -> Env:
        mock = await start_mock()
        opened.append(mock)
        # Checks get time to answer on a busy test machine instead of failing open (the outage
        # tests set their own short timeout).
        raw: dict[str, Any] = {
            "redis": {"url": redis_server.url, "timeout_ms": 2000, "warm_connections": WARM}
        }
        raw["server"] = {"data_dir": str(tmp_path_factory.mktemp("data"))}  # the spool
        raw["upstream"] = {"url": upstream_url or mock.url, "timeout_s": 5}
        for section, values in config.items():
            # Arrays of tables ([[api_keys]], [[notifiers]]) as given; tables merged.
            raw[section] = (
                values if isinstance(values, list) else {**raw.get(section, {}), **values}
            )
        app = create_app(
            parse(raw),
            admin_token=ADMIN_TOKEN,
            redis=redis_client or redis,
            clock=time.time if real_clock else clock,
        )
        context = serve(app)
        url = await context.__aenter__()
        opened.append(context)
        api = ApiClient(base_url=url, headers=AUTH)
        opened.append(api)
        return Env(url=url, mock=mock, app=app, api=api, redis=redis)

    yield make
    for item in reversed(opened):
        if isinstance(item, ApiClient):
            await item.aclose()
        elif isinstance(item, MockServer):
            await item.close()
        else:
            await item.__aexit__(None, None, None)


@pytest.fixture
async def env(make_env: MakeEnv) -> Env:
    made: Env = await make_env()
    return made


@pytest.fixture
async def otlp() -> AsyncIterator[OtlpReceiver]:
    """An OTLP/HTTP traces receiver on loopback (a collector, for the telemetry tests)."""
    from sidecar.testing.otlp import OtlpReceiver

    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.close()
