"""Alerts end to end, with the service's own loops: two sidecars on one Redis deliver each alert
exactly once; a sidecar stopped between attempts leaves the retries to the next one."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from sidecar.app import create_app
from sidecar.dispatch import Sidecar
from sidecar.settings import parse
from sidecar.testing.redis_server import RedisServer
from sidecar.testing.serving import serve
from tests.support.auth import ADMIN_TOKEN, AUTH
from tests.support.receiver import Receiver

pytestmark = pytest.mark.slow


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = await Receiver().start()
    yield made
    await made.close()


Start = Callable[[], Any]


@pytest.fixture
async def sidecars(
    redis: Redis,
    redis_server: RedisServer,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[AsyncExitStack, Start]]:
    async with AsyncExitStack() as stack:

        async def start() -> tuple[Sidecar, str, AsyncExitStack]:
            settings = parse(
                {
                    "redis": {"url": redis_server.url, "timeout_ms": 2000},
                    "server": {"data_dir": str(tmp_path_factory.mktemp("data"))},
                    "notifiers": [{"name": "ops", "url": receiver.url + "/budgets"}],
                }
            )
            client = Redis.from_url(redis_server.url)
            stack.push_async_callback(client.aclose)
            app = create_app(settings, admin_token=ADMIN_TOKEN, redis=client)
            own = AsyncExitStack()
            url = await own.enter_async_context(serve(app))
            stack.push_async_callback(own.aclose)
            return app, url, own

        yield stack, start


async def until(what: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def charge(app: Sidecar, redis: Redis, budget_id: str, amount: int) -> None:
    store = app.services.budgets.store
    stored = await store.get(budget_id)
    assert stored is not None
    (key,) = store.bucket_keys(stored, int(time.time() * 1000))
    await redis.incrby(key, amount)


async def test_two_sidecars_deliver_each_alert_exactly_once(
    sidecars: tuple[AsyncExitStack, Start], redis: Redis, receiver: Receiver
) -> None:
    _, start = sidecars
    (one, url, _), (two, _, _) = await start(), await start()
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as api:
        made = []
        for i in range(20):
            r = await api.post(
                "/v2/budgets",
                json={
                    "scope": {"kind": "identity", "target": f"user-{i}"},
                    "token_limit": 100,
                    "alerts": [{"threshold_percent": 50}, {"threshold_percent": 100}],
                },
            )
            assert r.status_code == 201
            made.append(r.json()["_id"])
        await asyncio.sleep(1.5)  # both processes have reloaded the budgets
        for budget_id in made:
            await charge(one, redis, budget_id, 60)
        await until(lambda: len(receiver.received) >= 20, 15)
        for budget_id in made:
            await charge(two, redis, budget_id, 60)
        await until(lambda: len(receiver.received) >= 40, 15)
        await asyncio.sleep(5)  # two more scans on each: nothing more may come
        bodies = receiver.bodies()
        assert len(bodies) == 40 and len({b["id"] for b in bodies}) == 40
        assert Counter((b["budget"]["_id"], b["threshold_percent"]) for b in bodies) == {
            (b, t): 1 for b in made for t in (50, 100)
        }
        assert {b["identity"] for b in bodies} == {f"user-{i}" for i in range(20)}
        senders = (one.services.alert_sender, two.services.alert_sender)
        assert sorted(s.sent for s in senders) == [0, 40]  # one process sent them all
        r = await api.get(f"/v2/budgets/{made[0]}/alerts")
        assert [(d["threshold_percent"], d["status"]) for d in r.json()["data"]] == [
            (100, "delivered"), (50, "delivered"),
        ]  # fmt: skip


async def test_a_sidecar_stopped_between_attempts_leaves_the_retries_to_the_next(
    sidecars: tuple[AsyncExitStack, Start], redis: Redis, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    _, start = sidecars
    first, url, stop_first = await start()
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as api:
        r = await api.post(
            "/v2/budgets",
            json={
                "scope": {"kind": "tag", "target": "team-a"},
                "amount_usd": 1,
                "alerts": [{"threshold_percent": 100}],
            },
        )
        budget_id = r.json()["_id"]
    await charge(first, redis, budget_id, 10**9)
    await until(lambda: len(receiver.received) == 1, 10)  # the first attempt failed
    await stop_first.aclose()  # gives its lease back at shutdown
    _, url, _ = await start()
    await until(lambda: len(receiver.delivered()) == 1, 15)
    assert len(receiver.received) == 3
    assert len({r.body for r in receiver.received}) == 1  # the same alert, retried
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as api:
        (delivery,) = (await api.get(f"/v2/budgets/{budget_id}/alerts")).json()["data"]
    assert (delivery["status"], delivery["attempts"], delivery["identity"]) == (
        "delivered", 3, None,  # a tag budget no request was checked against yet
    )  # fmt: skip
    await asyncio.sleep(3)
    assert len(receiver.received) == 3
