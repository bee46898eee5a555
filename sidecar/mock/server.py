"""The mock upstream's server: start it, look at what it received, close it."""

from __future__ import annotations

import asyncio
import socket
from collections import deque

from sidecar.mock.connection import Connection, State
from sidecar.mock.handlers import Router
from sidecar.mock.model import MockOptions, RecordedRequest


class MockServer:
    def __init__(self, server: asyncio.Server, state: State, host: str, port: int) -> None:
        self._server = server
        self._state = state
        self._closed = False
        self.host = host
        self.port = port
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{port}"

    @property
    def requests(self) -> deque[RecordedRequest]:
        return self._state.requests

    @property
    def options(self) -> MockOptions:
        return self._state.router.options

    @property
    def connections(self) -> int:
        """Connections accepted so far (a keep-alive client reuses one)."""
        return self._state.accepted

    @property
    def active_tasks(self) -> int:
        return len(self._state.tasks)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        state = self._state
        state.closing = True
        self._server.close()
        for conn in list(state.conns):
            conn.shutdown()
        tasks = list(state.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if state.conns:
            state.all_lost = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(state.all_lost), 5)
            except TimeoutError:
                for conn in list(state.conns):
                    conn.abort()
        await self._server.wait_closed()

    async def __aenter__(self) -> MockServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_mock(
    host: str = "127.0.0.1", port: int = 0, options: MockOptions | None = None
) -> MockServer:
    loop = asyncio.get_running_loop()
    state = State(Router(options or MockOptions()))
    bind: str = host
    if port == 0:
        # A name such as "localhost" resolves to several addresses, and port 0 would give each
        # its own port: bind the first one only.
        infos = await loop.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        bind = str(infos[0][4][0])
    server = await loop.create_server(
        lambda: Connection(state), bind, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    return MockServer(server, state, host, int(bound))
