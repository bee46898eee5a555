"""The sidecar served in front of the mock upstream (the `env` and `make_env` fixtures)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from sidecar.dispatch import Sidecar
from sidecar.mock import MockServer
from sidecar.testing.serving import ApiClient


async def settle(app: Sidecar) -> None:
    """Wait for the usage writes that run after each response."""
    services = app.services
    for _ in range(100):
        tasks = list(services.background.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await services.recorder.drain()
        if not services.background.tasks:
            return
    raise AssertionError("usage writes did not finish")


@dataclass
class Env:
    url: str  # the sidecar
    mock: MockServer
    app: Sidecar
    api: ApiClient
    redis: Redis

    async def settle(self) -> None:
        await settle(self.app)

    async def metrics(self, external_id: str) -> dict[str, Any]:
        await self.settle()
        r = await self.api.get(f"/v2/identities/{external_id}", params={"include_metrics": "true"})
        assert r.status_code == 200, r.text
        metrics: dict[str, Any] = r.json()["metrics"]
        return metrics


MakeEnv = Callable[..., Any]
