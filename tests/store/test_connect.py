from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from sidecar.errors import StoreUnavailable
from sidecar.store.connect import StoreConfigError, connect, warm
from sidecar.testing.redis_server import RedisServer, free_port

WARM = 16


def connections_received(admin: redis.Redis) -> int:
    """How many connections the server has accepted since it started."""
    return int(admin.info("stats")["total_connections_received"])


def test_plain_urls_build_a_redis_client() -> None:
    for url in ("redis://127.0.0.1:6390/2", "rediss://h:6380/0", "unix:///tmp/r.sock?db=1"):
        client = connect(url, timeout_ms=50)
        assert type(client) is Redis


def test_cluster_url_lists_its_startup_nodes() -> None:
    client = connect("redis+cluster://user:pw@10.0.0.1:7000,10.0.0.2:7001", timeout_ms=50)
    assert isinstance(client, RedisCluster)
    nodes = [(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()]
    assert sorted(nodes) == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]


def test_sentinel_url_names_the_service() -> None:
    client = connect("redis+sentinel://s1:26379,s2:26380/mymaster/3", timeout_ms=50)
    assert isinstance(client, Redis)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 3
    hosts = [c.connection_pool.connection_kwargs["host"] for c in pool.sentinel_manager.sentinels]
    assert hosts == ["s1", "s2"]


@pytest.mark.parametrize("url", ["http://x:1", "redis+sentinel://s1:26379", "memcached://x"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreConfigError):
        connect(url, timeout_ms=50)


async def test_warm_opens_the_pool_so_a_first_burst_opens_nothing(
    redis_server: RedisServer,
) -> None:
    client = connect(redis_server.url, timeout_ms=5000)
    try:
        with redis.Redis.from_url(redis_server.url) as admin:
            before = connections_received(admin)
            assert await warm(client, 0) == 0
            assert connections_received(admin) == before
            assert await warm(client, WARM) == WARM
            assert connections_received(admin) - before == WARM
            replies = await asyncio.gather(*(client.ping() for _ in range(WARM)))
            assert all(replies)
            assert connections_received(admin) - before == WARM
    finally:
        await client.aclose()


async def test_warm_without_a_store_is_store_unavailable() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)  # nothing listens
    try:
        with pytest.raises(StoreUnavailable):
            await warm(client, WARM)
    finally:
        await client.aclose()
