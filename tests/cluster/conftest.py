from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.app import create_app
from sidecar.mock import MockServer, start_mock
from sidecar.settings import parse
from sidecar.testing.redis_cluster import LocalCluster, SentinelSet
from sidecar.testing.serving import ApiClient, serve
from tests.support.auth import ADMIN_TOKEN, AUTH
from tests.support.clock import FakeClock
from tests.support.cluster import MakeSide, Side


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is slow: each needs the session's Redis Cluster (six servers, ~2 s to
    start) or a module's Sentinels."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    made = LocalCluster(tmp_path_factory.mktemp("cluster"))
    made.start()
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def fresh_cluster(cluster: LocalCluster) -> LocalCluster:
    cluster.wait_healthy()
    cluster.flushall()
    return cluster


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    made = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    made.start()
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
async def make_side(
    clock: FakeClock, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MakeSide]:
    opened: list[Any] = []

    async def make(store_url: str, real_clock: bool = False, **config: Any) -> Side:
        mock = await start_mock()
        opened.append(mock)
        raw: dict[str, Any] = {
            # Limit checks get time to answer on a busy test machine instead of failing open.
            "redis": {"url": store_url, "timeout_ms": 2000},
            "upstream": {"url": mock.url, "timeout_s": 5},
            "server": {"data_dir": str(tmp_path_factory.mktemp("data"))},  # the usage spool
        }
        for section, values in config.items():
            # Arrays of tables ([[api_keys]], [[notifiers]]) as given; tables merged.
            raw[section] = (
                values if isinstance(values, list) else {**raw.get(section, {}), **values}
            )
        # No client is handed in: the app connects from the URL, as `sidecar serve` does.
        app = create_app(
            parse(raw), admin_token=ADMIN_TOKEN, clock=time.time if real_clock else clock
        )
        context = serve(app)
        url = await context.__aenter__()
        opened.append(context)
        api = ApiClient(base_url=url, headers=AUTH, timeout=30)
        opened.append(api)
        return Side(url=url, mock=mock, app=app, api=api)

    yield make
    for item in reversed(opened):
        if isinstance(item, ApiClient):
            await item.aclose()
        elif isinstance(item, MockServer):
            await item.close()
        else:
            await item.__aexit__(None, None, None)
