"""Traffic and reads of the usage export (`/v2/usage`), for its tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx

from tests.support.clock import FakeClock
from tests.support.env import Env


def day(clock: FakeClock, offset: int = 0) -> str:
    return (datetime.fromtimestamp(clock.now, UTC) + timedelta(days=offset)).date().isoformat()


async def chat(env: Env, who: str, *, model: str = "gpt-4o", **headers: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post(
            "/v1/chat/completions", json=body, headers={"X-ORQ-IDENTITY-ID": who, **headers}
        )
    assert r.status_code == int(headers.get("x-mock-status", "200")), r.text


async def export(env: Env, **params: str) -> Any:
    r = await env.api.get("/v2/usage", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def nanos(cost_usd: str) -> int:
    value = Decimal(cost_usd) * 10**9
    assert value == value.to_integral_value() and len(cost_usd.split(".")[1]) == 9
    return int(value)
