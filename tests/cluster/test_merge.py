"""A merge on a real Redis Cluster: the two identities' keys live in different slots, so each
part moves in idempotent steps; a merge cut short between two of them is finished by its retry
without counting anything twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from sidecar.errors import StoreUnavailable
from sidecar.store.keys import Keys
from sidecar.testing.redis_cluster import LocalCluster
from tests.support.cluster import MakeSide, chat, gpt_4o_nanos
from tests.support.limits import policy_file

POLICY = '[[policy]]\nname = "default"\nrequests = ["6/minute"]\ntokens = ["100000/hour"]\n'


async def test_a_merge_cut_short_on_a_cluster_is_finished_by_its_retry(
    fresh_cluster: LocalCluster,
    make_side: MakeSide,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    side = await make_side(fresh_cluster.url, **policy_file(tmp_path, POLICY))
    for _ in range(3):
        await chat(side, "slot-a", 100, 10)
    for _ in range(2):
        await chat(side, "slot-b", 10, 1)
    merged = await side.record("slot-a")
    survivor = await side.record("slot-b")
    client = side.app.services.redis
    keys = Keys("sidecar")
    slots = {
        client.keyslot(keys.identity(merged["_id"])),  # type: ignore[union-attr]
        client.keyslot(keys.identity(survivor["_id"])),  # type: ignore[union-attr]
        client.keyslot(keys.aliases),  # type: ignore[union-attr]
    }
    assert len(slots) == 3, "three slots: the test proves nothing otherwise"

    limits_mover = side.app.services.merger.movers[1]

    async def store_gone(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("the store went away")

    monkeypatch.setattr(limits_mover, "move", store_gone)  # the usage moved, the windows did not
    r = await side.api.post("/v2/identities/slot-b/merge", json={"from": "slot-a"})
    assert r.status_code == 503, r.text
    monkeypatch.undo()
    for _ in range(2):
        r = await side.api.post("/v2/identities/slot-b/merge", json={"from": "slot-a"})
        assert r.status_code == 200, r.text
        assert (r.json()["_id"], r.json()["merged_from"]) == (survivor["_id"], ["slot-a"])

    record = await side.record("slot-a")
    assert record["_id"] == survivor["_id"]
    metrics = record["metrics"]
    assert (metrics["total_requests"], metrics["input_tokens"]) == (5, 320)
    assert round(metrics["total_cost"] * 1e9) == 3 * gpt_4o_nanos(100, 10) + 2 * gpt_4o_nanos(10, 1)
    services = side.app.services
    (policy,) = services.live.policies
    used = await services.limiter.usage(survivor["_id"], policy)
    assert [limit.used for limit in used.limits] == [5, 3 * 110 + 2 * 11]
    await chat(side, "slot-a", 1, 1)  # the sixth request of the minute, through the alias
    with pytest.raises(openai.RateLimitError):
        await chat(side, "slot-b", 1, 1)
