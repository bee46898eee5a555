from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn

from sidecar.connections import ConnectionGuard
from sidecar.dispatch import Sidecar
from sidecar.settings import ServerSettings
from sidecar.testing.redis_server import free_port


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
    server = uvicorn.Server(config)
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
        await task


class ApiClient(httpx.AsyncClient):
    app: Any
