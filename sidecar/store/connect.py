from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from sidecar.store.errors import translated

log = logging.getLogger("sidecar.store")

SCHEMES = frozenset({"redis", "rediss", "unix", "redis+cluster", "redis+sentinel"})

# redis-py's Redis and RedisCluster share their command methods but no base class.
RedisClient = Redis | RedisCluster

# Connections per server (per node of a cluster). At the cap a command fails at once; a cluster
# pipeline that does then makes redis-py close every connection of the client, so the cluster's
# own default of 100 per node must not be left in place.
MAX_CONNECTIONS = 512
SENTINEL_RECHECK_S = 1.0  # how often open connections are checked against the named master


class StoreConfigError(ValueError):
    pass


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.rpartition(":") if part.count(":") == 1 else (part, "", "")
        hosts.append((host or "127.0.0.1", int(port) if port else default_port))
    return hosts


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    if "@" not in netloc:
        return None, None
    user, _, password = netloc.rpartition("@")[0].partition(":")
    return unquote(user) or None, unquote(password) or None


def connect(url: str, *, timeout_ms: int) -> RedisClient:
    """A client for a store URL; no I/O happens until the first command."""
    scheme = url.partition("://")[0]
    if scheme not in SCHEMES:
        raise StoreConfigError(f"unsupported Redis URL scheme {scheme!r}")
    timeout = timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": max(timeout, 0.5),
        "decode_responses": False,
    }
    if scheme in ("redis", "rediss", "unix"):
        return Redis.from_url(url, max_connections=MAX_CONNECTIONS, **common)
    parts = urlsplit(url)
    username, password = _credentials(parts.netloc)
    if scheme == "redis+cluster":
        nodes = [ClusterNode(h, p) for h, p in _hosts(parts.netloc, 6379)]
        return RedisCluster(
            startup_nodes=nodes,
            username=username,
            password=password,
            max_connections=MAX_CONNECTIONS,
            **common,
        )
    # redis+sentinel://[user:pass@]host1:26379,host2:26379/service_name[/db]
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise StoreConfigError("redis+sentinel:// URL needs the service name as its path")
    db = int(path[1]) if len(path) > 1 else 0
    query = parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        _hosts(parts.netloc, 26379),
        sentinel_kwargs={"password": sentinel_password, **common},
        username=username,
        password=password,
        db=db,
        **common,
    )
    client: Redis = sentinel.master_for(path[0], connection_pool_class=FollowingSentinelPool)
    return client


async def warm(client: RedisClient, connections: int) -> int:
    """Open up to `connections` connections of the client's pool (of each primary's, on a
    cluster) and leave them in the pool; how many were opened in all. Raises
    StoreUnavailable when none could be. Each opened under load costs a request about half a
    millisecond of the event loop (a handshake of several round trips)."""
    connections = min(connections, MAX_CONNECTIONS)
    if connections < 1:
        return 0
    with translated():
        if isinstance(client, RedisCluster):
            await client.initialize()
            counts = [await _warm_node(node, connections) for node in client.get_primaries()]
            return sum(counts)
        pool = client.connection_pool
        got = await asyncio.gather(
            *(pool.get_connection() for _ in range(connections)),  # type: ignore[no-untyped-call]
            return_exceptions=True,
        )
        opened = [conn for conn in got if not isinstance(conn, BaseException)]
        for conn in opened:
            await pool.release(conn)
        if not opened:
            raise next(exc for exc in got if isinstance(exc, BaseException))
        return len(opened)


async def _warm_node(node: ClusterNode, connections: int) -> int:
    taken = [node.acquire_connection() for _ in range(connections)]
    try:
        opening = (conn.connect() for conn in taken)  # type: ignore[no-untyped-call]
        done = await asyncio.gather(*opening, return_exceptions=True)
    finally:
        for conn in taken:
            node.release(conn)
    failed = [exc for exc in done if isinstance(exc, BaseException)]
    if len(failed) == len(taken):
        raise failed[0]
    return len(taken) - len(failed)


class FollowingSentinelPool(SentinelConnectionPool):
    """Moves connections that are already open to the master the sentinels name.

    redis-py asks the sentinels only when it opens a connection, so open ones stay with the old
    master. After a planned failover (SENTINEL FAILOVER) that one goes on accepting writes for
    about ten seconds, until Sentinel demotes it and its resync drops them. So, at most once per
    SENTINEL_RECHECK_S and off the request's path, the pool asks again; a connection to another
    address is closed before it is handed out, and reopens to the named master."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._recheck_at = 0.0
        self._recheck: asyncio.Task[None] | None = None

    async def ensure_connection(self, connection: Any) -> None:
        now = time.monotonic()
        if now >= self._recheck_at and (self._recheck is None or self._recheck.done()):
            self._recheck_at = now + SENTINEL_RECHECK_S
            self._recheck = asyncio.create_task(self._ask_sentinels())
        master = self.master_address
        if (
            master is not None
            and connection.is_connected
            and ((connection.host, connection.port) != master)
        ):
            await connection.disconnect()
        await super().ensure_connection(connection)

    async def _ask_sentinels(self) -> None:
        try:
            await self.get_master_address()  # type: ignore[no-untyped-call]
        except (redis.RedisError, OSError) as exc:
            # No master named yet: the next connection to open asks again, and fails or finds one.
            log.debug("sentinels not asked: %s", exc)

    async def aclose(self) -> None:
        if self._recheck is not None and not self._recheck.done():
            self._recheck.cancel()
            await asyncio.wait([self._recheck])
        await super().aclose()
        await self.sentinel_manager.aclose()  # its clients of the sentinels themselves
