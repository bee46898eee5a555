"""Identities through the identity API, and the store's whole content to compare."""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient


async def create(api: ApiClient, **fields: Any) -> dict[str, Any]:
    r = await api.post("/v2/identities", json=fields)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def snapshot(redis: Redis) -> dict[bytes, Any]:
    """Every key and its value, to prove that a rejected request wrote nothing."""
    out: dict[bytes, Any] = {}
    keys = cast(list[bytes], await redis.keys("*"))
    for key in keys:
        kind = await redis.type(key)
        if kind == b"hash":
            out[key] = await redis.hgetall(key)
        elif kind == b"zset":
            out[key] = await redis.zrange(key, 0, -1)
        elif kind == b"set":
            out[key] = await redis.smembers(key)
        else:
            out[key] = await redis.get(key)
    return out
