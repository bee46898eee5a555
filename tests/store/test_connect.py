from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from sidecar.store.connect import StoreConfigError, connect


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
