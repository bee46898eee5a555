"""quota.signins against a real Redis: the key and its lifetime, the window, and what happens
when the store hangs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sidecar.identity.caller import Networks
from sidecar.quota import signins
from sidecar.quota.signins import FailedSignIns, TooManyFailedSignIns
from sidecar.store.keys import Keys
from tests.support.clock import FakeClock

TOKEN = "the-right-token-0123456789"
ADDRESS = "2001:db8::7"


def make(client: Redis, clock: FakeClock, limit: int = 3, timeout_s: float = 2.0) -> FailedSignIns:
    return FailedSignIns(
        client,
        Keys("sidecar"),
        per_minute=limit,
        networks=Networks([]),
        clock=clock,
        timeout_s=timeout_s,
    )


async def attempt(found: FailedSignIns, token: str, address: str = ADDRESS) -> bool:
    return await found.verify(token, TOKEN, peer=address, forwarded_for=None, where="api")


async def test_a_failure_is_one_hash_per_address_that_expires_with_its_window(
    redis: Redis, clock: FakeClock
) -> None:
    found = make(redis, clock)
    assert await attempt(found, "wrong") is False
    key = "sidecar:fa:" + hashlib.sha256(ADDRESS.encode()).hexdigest()[:32]
    assert await redis.keys("*") == [key.encode()]  # no raw address in a key
    held = await redis.hgetall(key)
    assert held == {b"s": str(int(clock.now * 1000)).encode(), b"n": b"1"}
    assert 60_000 < await redis.pttl(key) <= 61_000
    clock.advance(20)
    assert await attempt(found, "wrong") is False
    assert (await redis.hgetall(key))[b"n"] == b"2"
    assert 40_000 < await redis.pttl(key) <= 41_000  # the window's end did not move


async def test_the_window_starts_at_the_first_failure_and_ends_a_minute_later(
    redis: Redis, clock: FakeClock
) -> None:
    found = make(redis, clock)
    for _ in range(3):
        assert await attempt(found, "wrong") is False
        clock.advance(19)
    with pytest.raises(TooManyFailedSignIns) as refused:
        await attempt(found, TOKEN)
    assert refused.value.headers == {"retry-after": "3"}  # 60 - 3 * 19
    clock.advance(3)
    assert await attempt(found, TOKEN) is True
    # A new window: three more failures before the next block.
    for _ in range(3):
        assert await attempt(found, "wrong") is False
    with pytest.raises(TooManyFailedSignIns):
        await attempt(found, "wrong")


async def test_a_clock_behind_does_not_start_a_new_window(redis: Redis, clock: FakeClock) -> None:
    ahead, behind = FakeClock(clock.now + 5), FakeClock(clock.now)
    assert await attempt(make(redis, ahead), "wrong") is False
    host = make(redis, behind)
    assert await attempt(host, "wrong") is False
    assert await attempt(host, "wrong") is False  # the third of the window started ahead
    with pytest.raises(TooManyFailedSignIns) as refused:
        await attempt(host, TOKEN)
    assert refused.value.headers["retry-after"] == "65"


async def test_what_a_process_remembers_is_bounded(
    redis: Redis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signins, "LOCAL_MAX", 5)
    found = make(redis, clock, limit=1)
    for n in range(50):
        assert await attempt(found, "wrong", f"10.0.0.{n}") is False
        assert await attempt(found, TOKEN, f"10.1.0.{n}") is True
    assert len(found._blocked) == len(found._clear) == 5
    # Forgetting an address locally forgets nothing in the store.
    with pytest.raises(TooManyFailedSignIns):
        await attempt(found, TOKEN, "10.0.0.0")


@pytest.fixture
async def hung_store() -> AsyncIterator[Redis]:
    """A server that takes connections and commands and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=30)
    yield client
    await client.aclose()
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_hung_store_costs_the_timeout_then_the_process_counts(
    hung_store: Redis, clock: FakeClock
) -> None:
    found = make(hung_store, clock, timeout_s=0.2)
    started = time.monotonic()
    assert await attempt(found, TOKEN) is True
    assert 0.2 <= time.monotonic() - started < 1.0
    # Not asked again for a while: no attempt waits for it meanwhile.
    started = time.monotonic()
    for _ in range(3):
        assert await attempt(found, "wrong") is False
    assert time.monotonic() - started < 0.2
    with pytest.raises(TooManyFailedSignIns):
        await attempt(found, TOKEN)
    assert await attempt(found, TOKEN, "192.0.2.1") is True  # another address


@pytest.mark.slow
async def test_counting_returns_to_the_store_when_it_answers_again(
    redis: Redis,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(signins, "RETRY_STORE_S", 0.3)
    caplog.set_level(logging.INFO, logger="sidecar.auth")
    found = make(redis, clock, limit=10, timeout_s=0.1)
    await found.script.load(redis)
    key = "sidecar:fa:" + hashlib.sha256(ADDRESS.encode()).hexdigest()[:32]
    await redis.client_pause(500, all=True)  # an outage of half a second
    assert await attempt(found, "wrong") is False  # the store does not answer in time
    assert await attempt(found, "wrong") is False  # nor is it asked again yet
    await asyncio.sleep(0.8)
    before = int(await redis.hget(key, "n") or 0)  # perhaps the command that timed out ran
    assert await attempt(found, "wrong") is False
    assert int(await redis.hget(key, "n") or 0) == before + 1
    said = [r.getMessage() for r in caplog.records if r.name == "sidecar.auth"]
    down = [m for m in said if "counted by this process alone" in m]
    back = [m for m in said if "answers again" in m]
    assert (len(down), len(back)) == (1, 1), said
