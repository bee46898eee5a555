"""A master dies under the sidecar: the cluster promotes its replica, the sidecar follows, and
what it acknowledged before the kill (and Redis replicated) is all still there."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from sidecar.testing.redis_cluster import LocalCluster
from tests.support.clock import FakeClock
from tests.support.cluster import MakeSide, chat, create, eventually, gpt_4o_nanos, listing
from tests.support.traffic import MESSAGES, tokens

INDEX = "sidecar:{idx}:order"
RECOVERY_S = 15  # node timeout 1 s, the election, and the client's slot map refresh


@pytest.mark.slow
async def test_master_killed_sidecar_follows_the_promoted_replica_and_keeps_acked_writes(
    fresh_cluster: LocalCluster, make_side: MakeSide, clock: FakeClock
) -> None:
    cluster = fresh_cluster
    side = await make_side(cluster.url)
    victim = cluster.master_of(INDEX)  # serves the indexes, and some identities' own keys
    on_victim: list[dict[str, Any]] = []
    elsewhere: list[dict[str, Any]] = []
    for n in range(60):
        clock.advance(1)
        made = await create(side, external_id=f"acked-{n}", tags=[f"t{n % 2}"], metadata={"n": n})
        await chat(side, f"acked-{n}", 10 + n, 1 + n)
        port = cluster.master_of(f"sidecar:id:{{{made['_id']}}}")
        (on_victim if port == victim else elsewhere).append(made)
        if len(on_victim) >= 3 and len(elsewhere) >= 3:
            break
    assert len(on_victim) >= 3 and len(elsewhere) >= 3
    # The sidecar's acknowledgement: the 201s above, and the usage read back through its API.
    await side.settle()
    before = await listing(side)
    for record in before:
        n = record["metadata"]["n"]
        assert record["metrics"]["total_requests"] == 1
        assert record["metrics"]["total_cost"] == gpt_4o_nanos(10 + n, 1 + n) / 1e9
    # Replication is asynchronous: a write acknowledged just before the kill may not have
    # reached the replica. Wait for it, so that what must survive is exactly what was written.
    cluster.wait_replicated()

    replica = cluster.replica_of(victim)
    cluster.kill(victim)

    async def serves() -> bool:
        r = await side.api.get("/v2/identities", params={"limit": 1})
        return r.status_code == 200

    took = await eventually("the identity API answers again", serves, RECOVERY_S)
    await asyncio.to_thread(cluster.wait_promoted, replica)
    # redis-py's cluster client dropped its slot map and learnt the new owner.
    client = side.app.services.redis
    assert isinstance(client, RedisCluster)
    assert client.nodes_manager.get_node_from_slot(key_slot(INDEX.encode())).port == replica
    assert took < RECOVERY_S

    # Nothing acknowledged (and replicated) was lost: records, indexes, usage.
    assert await listing(side) == before
    for record in before:
        r = await side.api.get(f"/v2/identities/{record['external_id']}")
        assert r.status_code == 200 and r.json()["_id"] == record["_id"]
    tagged = await side.api.get("/v2/identities", params={"filter_by.tags": "t1", "limit": 200})
    assert {i["_id"] for i in tagged.json()["data"]} == {
        r["_id"] for r in before if r["tags"] == ["t1"]
    }

    # And it goes on working: usage on the promoted master, a new identity, a deletion.
    async def counts() -> bool:
        try:
            await chat(side, on_victim[0]["external_id"], 1000, 100)
        except openai.APIError:
            return False
        return True

    await eventually("a proxied request goes through", counts, RECOVERY_S)
    n = on_victim[0]["metadata"]["n"]
    metrics = (await side.record(on_victim[0]["external_id"]))["metrics"]
    assert metrics["total_requests"] == 2
    assert metrics["input_tokens"] == 10 + n + 1000
    clock.advance(1)
    late = await create(side, external_id="after-failover")
    assert (await side.api.get("/v2/identities/after-failover")).json()["_id"] == late["_id"]
    assert (await side.api.delete(f"/v2/identities/{elsewhere[0]['_id']}")).status_code == 204
    assert len(await listing(side)) == len(before)

    # The old master comes back as a replica of the one that replaced it, with the same data.
    cluster.revive(victim)
    assert cluster.master_of(INDEX) == replica
    assert cluster.call(INDEX, "ZCARD", INDEX) == len(before)


@pytest.mark.slow
async def test_during_the_outage_the_api_says_503_and_usage_waits_for_the_new_master(
    fresh_cluster: LocalCluster, make_side: MakeSide, clock: FakeClock
) -> None:
    """While a master is down and not yet replaced, the identity API answers 503 at once, a
    proxied request is forwarded (on_error = "allow"), and its usage, owed to an identity whose
    keys are on the dead master, is written once the replica has taken over."""
    cluster = fresh_cluster
    side = await make_side(cluster.url)
    victim = cluster.master_of(INDEX)
    for n in range(60):
        clock.advance(1)
        made = await create(side, external_id=f"waiting-{n}")
        if cluster.master_of(f"sidecar:id:{{{made['_id']}}}") == victim:
            break
    else:
        raise AssertionError("no identity landed on the master that serves the indexes")
    who = made["external_id"]
    await chat(side, who, 5, 5)  # the process now knows the identity: no index read needed
    await side.settle()
    replica = cluster.replica_of(victim)
    cluster.wait_replicated()
    cluster.kill(victim)
    try:
        r = await side.api.get("/v2/identities")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable_error"
        async with httpx.AsyncClient(base_url=side.url, timeout=10) as client:
            proxied = await client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": MESSAGES},
                headers={"X-ORQ-IDENTITY-ID": who, **tokens(7, 3)},
            )
        assert proxied.status_code == 200
    finally:
        await asyncio.to_thread(cluster.wait_promoted, replica)
        cluster.revive(victim)
    metrics = (await side.record(who))["metrics"]
    assert (metrics["total_requests"], metrics["input_tokens"]) == (2, 12)
