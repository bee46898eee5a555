from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn

from sidecar.connections import ConnectionGuard
from sidecar.dispatch import Sidecar
from sidecar.settings import ServerSettings
from sidecar.testing.redis_server import free_port


class _Server(uvicorn.Server):
    """uvicorn's server without its fixed delays on the way out: its main loop polls for the
    exit flag every 0.1 s and its shutdown sleeps 0.1 s before waiting for connections. A test
    run starts and stops hundreds of servers; here a stop wakes the loop at once and shutdown
    waits for exactly what is still open, then runs the app's lifespan shutdown as uvicorn does."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stopping = asyncio.Event()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self.stopping.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        # uvicorn's sets of connections and tasks signal nothing when they empty: poll them.
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


STOP_WARN_S = 10.0  # a test server not stopped by then has its tasks printed


@asynccontextmanager
async def serve(app: Any, port: int | None = None) -> AsyncIterator[str]:
    """Run an ASGI app under uvicorn in this event loop; yield its base URL. The sidecar's
    app is served as `sidecar serve` serves it: with its header deadline and connection cap."""
    port = port or free_port()
    server_settings = app.services.settings.server if isinstance(app, Sidecar) else ServerSettings()
    guard = ConnectionGuard(server_settings.header_timeout_s, server_settings.max_connections)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=guard.protocol,
        log_level="warning",
        access_log=False,
        lifespan="on",
        loop="none",
        # As `serve`: the client address behind a proxy is the sidecar's own business
        # (identity.caller, trusted_networks); uvicorn's rewrite would trust any local peer.
        proxy_headers=False,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped during start-up")
        await asyncio.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_WARN_S)
        except TimeoutError:
            # A stop that hangs: what every task awaits, for the failure's report (the wait
            # goes on, and the test's timeout ends it).
            print(f"the server has not stopped after {STOP_WARN_S:g} s; tasks:", file=sys.stderr)
            for pending in asyncio.all_tasks():
                pending.print_stack(file=sys.stderr)
            await task


class ApiClient(httpx.AsyncClient):
    app: Any
