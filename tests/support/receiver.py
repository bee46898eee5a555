"""A webhook receiver on loopback that records what it is sent and fails the first attempts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.testing.redis_server import free_port


@dataclass
class Received:
    at: float  # time.time() when it arrived
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    fail_first: int = 0  # answer this many requests with 503 before any 2xx
    status: int = 503
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(
            Received(time.time(), request.path, dict(request.headers), await request.read())
        )
        if len(self.received) <= self.fail_first:
            return web.Response(status=self.status, text="not now")
        return web.Response(status=204)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def delivered(self) -> list[Received]:
        """What was answered with a 2xx."""
        return self.received[self.fail_first :]

    def bodies(self) -> list[Any]:
        import json

        return [json.loads(r.body) for r in self.delivered()]
