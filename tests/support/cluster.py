"""Sidecars that open their own store connection (Cluster, Sentinel), and what the cluster tests
send them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from sidecar.dispatch import Sidecar
from sidecar.mock import MockServer
from sidecar.testing.serving import ApiClient
from tests.support.env import settle
from tests.support.traffic import MESSAGES, tokens


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
