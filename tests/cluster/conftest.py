from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from sidecar.app import create_app
from sidecar.dispatch import Sidecar
from sidecar.mock import MockServer, start_mock
from sidecar.settings import parse
from sidecar.testing.redis_cluster import LocalCluster, SentinelSet
from sidecar.testing.serving import ApiClient, serve
from tests.conftest import ADMIN_TOKEN, AUTH, FakeClock
from tests.proxy.conftest import settle


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


@dataclass
class Side:
    """A sidecar that opened its own store connection from a URL, in front of a mock upstream."""

    url: str
    mock: MockServer
    app: Sidecar
    api: ApiClient

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="sk-upstream", max_retries=0)

    async def settle(self) -> None:
        await settle(self.app)

    async def record(self, ref: str) -> dict[str, Any]:
        await self.settle()
        r = await self.api.get(f"/v2/identities/{ref}", params={"include_metrics": "true"})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


MakeSide = Callable[..., Awaitable[Side]]

MESSAGES: Any = [{"role": "user", "content": "Say hi"}]


def tokens(input_tokens: int, output_tokens: int) -> dict[str, str]:
    """Headers that make the mock upstream report this usage."""
    return {"x-mock-input-tokens": str(input_tokens), "x-mock-output-tokens": str(output_tokens)}


def gpt_4o_nanos(input_tokens: int, output_tokens: int) -> int:
    """The catalogue's gpt-4o price: $2.50 and $10 per million input and output tokens."""
    return input_tokens * 2500 + output_tokens * 10_000


async def create(side: Side, **fields: Any) -> dict[str, Any]:
    r = await side.api.post("/v2/identities", json=fields)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def chat(side: Side, who: str, input_tokens: int, output_tokens: int) -> None:
    """One chat completion through the proxy, for the identity in the header."""
    async with side.openai() as oai:
        await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers={"X-ORQ-IDENTITY-ID": who, **tokens(input_tokens, output_tokens)},
        )


async def listing(side: Side) -> list[dict[str, Any]]:
    """Every identity (up to 200), newest first, with metrics."""
    r = await side.api.get("/v2/identities", params={"limit": 200, "include_metrics": "true"})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


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
            raw[section] = values if section == "api_keys" else {**raw.get(section, {}), **values}
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


async def eventually(
    what: str, attempt: Callable[[], Awaitable[bool]], within: float, interval: float = 0.1
) -> float:
    """Retry `attempt` until it returns True; the seconds that took."""
    began = time.monotonic()
    while True:
        try:
            if await attempt():
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        if time.monotonic() - began > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(interval)
