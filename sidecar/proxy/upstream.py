from __future__ import annotations

import aiohttp
from yarl import URL


class Upstream:
    """The pooled HTTP client requests are forwarded with. Opened in the app's lifespan (an
    aiohttp session belongs to a running event loop), closed at shutdown."""

    def __init__(self, url: str | None, timeout_s: float, *, connections: int = 1024) -> None:
        # Encoded once as yarl would (a space in a configured path prefix, say): each request
        # appends its path as sent to this, already encoded (see proxy.inline).
        self.url = str(URL(url)).rstrip("/") if url else ""
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the upstream client is opened by the app's lifespan"
        return self._session

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.connections, ttl_dns_cache=300, keepalive_timeout=30
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            # One client forwards for every caller: a cookie the upstream sets (a CDN's, a
            # gateway's session) is its caller's, relayed to it, and never kept here to go out
            # with anyone's next request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
