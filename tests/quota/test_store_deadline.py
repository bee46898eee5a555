"""A limit check gives up on a store that does not answer after twice `[redis] timeout_ms`
(store/deadline.py), however many other requests are written to it meanwhile: a call written to
the socket is no sign that the store is alive, only a reply is."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from redis.asyncio import Redis

from sidecar.store import errors
from sidecar.store.deadline import STORE
from sidecar.testing.redis_server import RedisServer
from tests.support.env import Env, MakeEnv

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
TIMEOUT_S = 0.05


def test_only_a_call_the_store_answered_tells_it_is_alive() -> None:
    before = STORE.last
    with errors.translated(replied=False):
        pass
    assert STORE.last == before
    with errors.translated():
        pass
    assert STORE.last > before


async def test_checks_fail_on_a_hung_store_while_requests_keep_coming(
    private_redis: RedisServer, private_client: Redis, make_env: MakeEnv, tmp_path: Path
) -> None:
    path = tmp_path / "policies.toml"
    path.write_text('[[policy]]\nname = "p"\nrequests = ["1000/minute"]\n')
    env: Env = await make_env(
        redis_client=private_client,
        redis={"on_error": "deny", "timeout_ms": int(TIMEOUT_S * 1000)},
        policies={"paths": [str(path)]},
    )
    async with httpx.AsyncClient(base_url=env.url, timeout=10) as client:
        assert (
            await client.post(CHAT, json=BODY, headers={"X-ORQ-IDENTITY-ID": "hung"})
        ).status_code == 200

        async def one(i: int) -> tuple[int, float]:
            await asyncio.sleep(i * 0.02)  # a request every 20 ms, each one written to Redis
            began = time.monotonic()
            r = await client.post(CHAT, json=BODY, headers={"X-ORQ-IDENTITY-ID": "hung"})
            return r.status_code, time.monotonic() - began

        private_redis.pause()
        try:
            answered = await asyncio.gather(*(one(i) for i in range(20)))
        finally:
            private_redis.resume()
    assert {status for status, _ in answered} == {503}
    # Twice the timeout (the probe's period), and the event loop's own time: not the deadline's
    # cap (1 s here), which every request written meanwhile used to extend a check to.
    slowest = max(took for _, took in answered)
    assert slowest < 2 * TIMEOUT_S + 0.25, answered
