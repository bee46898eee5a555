"""Budgets on a real cluster: their records and indexes in the `{budgets}` slot, each budget's
buckets in a slot of its own (admitted in turn with the identity, given back on refusal), alerts
and their outbox in the `{alerts}` slot."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from redis.asyncio.cluster import RedisCluster

from sidecar.testing.redis_cluster import LocalCluster
from tests.support.cluster import MakeSide
from tests.support.receiver import Receiver
from tests.support.traffic import MESSAGES


async def test_budgets_gate_list_reset_and_alert_on_a_cluster(
    fresh_cluster: LocalCluster, make_side: MakeSide
) -> None:
    receiver = await Receiver().start()
    try:
        side = await make_side(
            fresh_cluster.url, notifiers=[{"name": "ops", "url": receiver.url + "/b"}]
        )
        services = side.app.services
        assert isinstance(services.redis, RedisCluster)
        for i in range(4):
            r = await side.api.post(
                "/v2/identities", json={"external_id": f"c{i}", "tags": ["crew"]}
            )
            assert r.status_code == 201
        r = await side.api.post(
            "/v2/budgets",
            json={
                "scope": {"kind": "tag", "target": "crew"},
                "requests_per_minute": 12,
                "token_limit": 10_000_000,  # far above what 12 requests reserve
                "alerts": [{"threshold_percent": 50}],
            },
        )
        assert r.status_code == 201, r.text
        made = r.json()
        listed = (await side.api.get("/v2/budgets", params={"scope_kind": "tag"})).json()
        assert [b["_id"] for b in listed["data"]] == [made["_id"]]

        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=side.url, timeout=30, limits=limits) as client:
            replies = await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions",
                        json={"model": "gpt-4o", "messages": MESSAGES},
                        headers={"X-ORQ-IDENTITY-ID": f"c{i % 4}"},
                    )
                    for i in range(40)
                )
            )
        assert Counter(r.status_code for r in replies) == {200: 12, 429: 28}
        refused = next(r for r in replies if r.status_code == 429).json()["error"]
        assert refused["budget"] == made["_id"]

        # Consumption, an alert through the outbox, and a reset.
        stored = await services.budgets.found(made["_id"])
        now_ms = int(services.clock() * 1000)
        token_key = next(
            k for k in services.budgets.store.bucket_keys(stored, now_ms) if ":t:" in k
        )
        await services.redis.incrby(token_key, 5_000_000)
        assert await services.alert_scanner.scan() == 1
        await services.alert_sender.step()
        for _ in range(50):
            if receiver.delivered():
                break
            await asyncio.sleep(0.1)
        (body,) = receiver.bodies()
        assert body["budget"]["_id"] == made["_id"]
        assert 5_000_000 <= body["consumed_tokens"] < 5_100_000  # and what the 12 used
        log = (await side.api.get(f"/v2/budgets/{made['_id']}/alerts")).json()["data"]
        assert [d["status"] for d in log] == ["delivered"]
        r = await side.api.post(f"/v2/budgets/{made['_id']}/reset")
        assert r.status_code == 200 and r.json()["consumption"]["tokens"] == 0
        async with httpx.AsyncClient(base_url=side.url, timeout=30) as client:
            again = await client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": MESSAGES},
                headers={"X-ORQ-IDENTITY-ID": "c0"},
            )
        assert again.status_code == 200  # the reset emptied the minute's requests too
        assert (await side.api.delete(f"/v2/budgets/{made['_id']}")).status_code == 204
    finally:
        await receiver.close()
