"""The sidecar on a Sentinel set (1 master, 1 replica, 3 sentinels), through two failovers: a
planned one (SENTINEL FAILOVER) and a crash (SIGKILL of the master)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis

from sidecar.settings import RedisSettings
from sidecar.testing.redis_cluster import SentinelSet, role
from tests.support.clock import FakeClock
from tests.support.cluster import MakeSide, Side, chat, create, eventually, gpt_4o_nanos, listing

RECOVERY_S = 15  # down-after 1 s, the election, the client's retries
NOTICE_S = 1.5  # the sidecar asks the sentinels for the master once a second


def key_on(port: int, key: str) -> bool:
    with redis.Redis(port=port, socket_timeout=2) as client:
        return bool(client.exists(key))


async def traffic(side: Side, clock: FakeClock, prefix: str, count: int) -> list[dict[str, Any]]:
    made = []
    for n in range(count):
        clock.advance(1)
        made.append(await create(side, external_id=f"{prefix}-{n}", metadata={"n": n}))
        await chat(side, f"{prefix}-{n}", 10 + n, 1 + n)
    await side.settle()
    return made


async def survives(side: Side, before: list[dict[str, Any]]) -> None:
    """Everything acknowledged before the failover reads back the same."""
    now = {r["_id"]: r for r in await listing(side)}
    for record in before:
        assert now[record["_id"]] == record


@pytest.mark.slow
async def test_start_up_opens_connections_to_the_master(
    sentinels: SentinelSet, make_side: MakeSide
) -> None:
    master = sentinels.master_port()
    with redis.Redis(port=master, socket_timeout=2) as node:
        before = int(node.info("stats")["total_connections_received"])
        await make_side(sentinels.url)
        opened = int(node.info("stats")["total_connections_received"]) - before
    assert opened >= RedisSettings().warm_connections


@pytest.mark.slow
async def test_planned_failover_moves_the_sidecar_before_the_old_master_is_demoted(
    sentinels: SentinelSet, make_side: MakeSide, clock: FakeClock
) -> None:
    side = await make_side(sentinels.url)
    old = sentinels.master_port()
    await traffic(side, clock, "planned", 5)
    before = await listing(side)
    assert [r["metrics"]["total_requests"] for r in before] == [1] * 5
    sentinels.wait_replicated()

    new = await asyncio.to_thread(sentinels.failover)
    switched = time.monotonic()
    # Sentinel demotes the old master some 10 s after naming the new one, and until then the
    # old one accepts writes, which its resync with the new master then drops. Writes the
    # sidecar acknowledges once it had time to notice the switch must reach the new master.
    acked: list[tuple[float, str]] = []
    while time.monotonic() - switched < 3:
        clock.advance(1)
        r = await side.api.post("/v2/identities", json={"external_id": f"during-{len(acked)}"})
        assert r.status_code == 201, r.text
        acked.append((time.monotonic() - switched, r.json()["_id"]))
        await asyncio.sleep(0.05)
    assert role(old) == "master", "the old master was demoted early: nothing was tested"
    await asyncio.to_thread(sentinels.wait_demoted, old)
    assert role(new) == "master" and role(old) == "slave"

    late = [identity_id for at, identity_id in acked if at > NOTICE_S]
    assert len(late) > 5
    lost = [i for i in late if (await side.api.get(f"/v2/identities/{i}")).status_code != 200]
    assert not lost, f"{len(lost)} of {len(late)} acknowledged creates lost at the demotion"
    await survives(side, before)
    await chat(side, "planned-0", 1000, 100)
    metrics = (await side.record("planned-0"))["metrics"]
    assert metrics["total_requests"] == 2
    assert metrics["total_cost"] == (gpt_4o_nanos(10, 1) + gpt_4o_nanos(1000, 100)) / 1e9


@pytest.mark.slow
async def test_master_killed(sentinels: SentinelSet, make_side: MakeSide, clock: FakeClock) -> None:
    side = await make_side(sentinels.url)
    await traffic(side, clock, "crash", 5)
    before = await listing(side)
    sentinels.wait_replicated()

    old = sentinels.master_port()
    new = sentinels.other(old)
    sentinels.kill(old)

    async def writes() -> bool:
        clock.advance(1)
        r = await side.api.post("/v2/identities", json={"external_id": "after-crash"})
        return r.status_code == 201

    took = await eventually("a write after the master died", writes, RECOVERY_S)
    await asyncio.to_thread(sentinels.wait_master, new)
    assert took < RECOVERY_S
    await survives(side, before)
    made = (await side.api.get("/v2/identities/after-crash")).json()
    assert key_on(new, f"sidecar:id:{{{made['_id']}}}")
    await chat(side, "crash-0", 1000, 100)
    assert (await side.record("crash-0"))["metrics"]["total_requests"] == 2
