"""The top-spenders index: written after the counters, read as 30-day rankings, and the
`sort` of the identity API that pages through them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.store.hotline import HotLine
from sidecar.store.keys import Keys
from sidecar.store.scripts import batch
from sidecar.testing.redis_server import free_port
from sidecar.testing.serving import ApiClient
from sidecar.usage import buckets
from sidecar.usage import ranking as ranking_module
from sidecar.usage.ranking import Rankings
from tests.support.clock import FakeClock
from tests.support.rankings import order, recorder_of, seed

KEYS = Keys("sidecar")


async def test_each_sort_ranks_by_its_30_day_counter_then_the_rest_newest_first(
    api: ApiClient, clock: FakeClock
) -> None:
    await seed(api, clock)
    assert await order(api) == ["f", "e", "d", "c", "b", "a"]
    assert await order(api, sort="created") == ["f", "e", "d", "c", "b", "a"]
    assert await order(api, sort="cost") == ["a", "b", "c", "d", "f", "e"]
    assert await order(api, sort="requests") == ["c", "a", "b", "d", "f", "e"]
    # d failed 1 of 1, b 1 of 2, c 3 of 9; those without errors follow, newest first.
    assert await order(api, sort="error_rate") == ["d", "b", "c", "f", "e", "a"]
    # The order agrees with the metrics the list shows (the identity's own counters).
    r = await api.get("/v2/identities", params={"sort": "cost", "include_metrics": "true"})
    costs = [i["metrics"]["total_cost"] for i in r.json()["data"]]
    assert costs == sorted(costs, reverse=True)
    assert costs[:4] == [1100e-9, 900e-9, 300e-9, 50e-9]


async def test_sorted_pages_join_up_both_ways_with_filters(
    api: ApiClient, clock: FakeClock
) -> None:
    await seed(api, clock)
    for sort, expected in [
        ("cost", ["a", "b", "c", "d", "f", "e"]),
        ("error_rate", ["d", "b", "c", "f", "e", "a"]),
    ]:
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"sort": sort, "limit": 2}
            if cursor:
                params["starting_after"] = cursor
            body = (await api.get("/v2/identities", params=params)).json()
            pages.append([i["external_id"] for i in body["data"]])
            if not body["has_more"]:
                break
            cursor = body["data"][-1]["_id"]
        assert pages == [expected[0:2], expected[2:4], expected[4:6]], sort
        # Back from the last page's first identity.
        last_first = (await api.get("/v2/identities/" + expected[4])).json()["_id"]
        back = (
            await api.get(
                "/v2/identities", params={"sort": sort, "limit": 3, "ending_before": last_first}
            )
        ).json()
        assert [i["external_id"] for i in back["data"]] == expected[1:4]
        assert back["has_more"] is True
    # Search and tags filter the ranking, the rest after it.
    assert await order(api, sort="cost", search="T-") == []  # tags are not searched
    assert await order(api, sort="cost", **{"filter_by.tags": ["t-c", "t-e", "t-a"]}) == [
        "a",
        "c",
        "e",
    ]
    assert await order(api, sort="requests", search="b") == ["b"]


async def test_the_index_counts_what_the_counters_counted_once(
    api: ApiClient, clock: FakeClock, redis: Redis
) -> None:
    ids = await seed(api, clock)
    today = buckets.day(clock())
    assert await redis.zscore(KEYS.top("c", today), ids["b"]) == 900
    assert await redis.zscore(KEYS.top("c", today - 3), ids["a"]) == 1000
    assert await redis.zscore(KEYS.top("e", today), ids["a"]) is None
    assert 31 * 86400 < await redis.ttl(KEYS.top("c", today)) < 33 * 86400
    assert not await redis.exists(KEYS.top("c", today - 40))  # beyond every ranking
    # A hook report retried is a duplicate: counted, and indexed, once.
    recorder = recorder_of(api)
    for _ in range(2):
        await recorder.record(ids["e"], {"r": 1, "c": 7}, request_id="req-1", external_id="e")
    await recorder.drain()
    assert await redis.zscore(KEYS.top("c", today), ids["e"]) == 7


@pytest.mark.slow  # waits out a second
async def test_a_busy_identitys_index_increments_add_up_for_a_second(
    redis: Redis, clock: FakeClock
) -> None:
    """One update a second at most: what comes meanwhile is added in memory and written
    together, once the second is up or at once when drained."""
    rankings = Rankings(redis, KEYS, clock)
    writes: list[int] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        writes.append(len(args[2]))
        return await batch(*args, **kwargs)

    today = buckets.day(clock())
    top = KEYS.top("c", today)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ranking_module, "batch", counted)
        rankings.add("id-a", clock(), {"r": 1, "c": 5})
        await asyncio.sleep(0.05)  # the first of a while goes at once
        assert (writes, await redis.zscore(top, "id-a")) == ([1], 5)
        for _ in range(3):  # a second after it, these go together
            rankings.add("id-a", clock(), {"r": 1, "c": 5})
            await asyncio.sleep(0.05)
        assert (writes, await redis.zscore(top, "id-a")) == ([1], 5)
        await asyncio.sleep(1.0)
        assert (writes, await redis.zscore(top, "id-a")) == ([1, 1], 20)
        rankings.add("id-a", clock(), {"r": 1, "c": 5})
        await asyncio.wait_for(rankings.drain(), timeout=0.5)  # no waiting out the second
        assert (writes, await redis.zscore(top, "id-a")) == ([1, 1, 1], 25)
        assert await redis.zscore(KEYS.top("r", today), "id-a") == 5


async def test_a_failed_index_update_is_counted_not_written_again(
    api: ApiClient, clock: FakeClock, redis: Redis
) -> None:
    for name in ("x", "y"):
        clock.advance(1)
        await api.post("/v2/identities", json={"external_id": name})
    ids = {n: (await api.get(f"/v2/identities/{n}")).json()["_id"] for n in ("x", "y")}
    recorder = recorder_of(api)
    rankings = recorder.writer.rankings
    # The index's node unreachable (nothing listens there); the counters' node answers.
    # As the sidecar connects (from a URL): refused at once, not retried with backoff.
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}")
    line = rankings.line
    assert line is not None  # a single server: the writer's line carries the index's calls
    rankings.client, rankings.line = unreachable, HotLine.for_client(unreachable)
    try:
        recorder.add(ids["x"], {"r": 2, "c": 10}, source="header", external_id="x")
        recorder.add(ids["y"], {"r": 3, "c": 20}, source="header", external_id="y")
        await recorder.drain()
    finally:
        rankings.client, rankings.line = redis, line
        await unreachable.aclose()
    assert rankings.errors == 1
    assert recorder.write_errors == 0 and recorder.waiting == 0
    assert recorder.spool is not None and not recorder.spool.pending  # nothing kept to retry
    metrics = {
        n: (await api.get(f"/v2/identities/{n}", params={"include_metrics": "true"})).json()
        for n in ids
    }
    assert metrics["x"]["metrics"]["total_requests"] == 2  # written once
    assert metrics["y"]["metrics"]["total_requests"] == 3
    # Not ranked: the sorted list still lists them, after the (empty) ranking.
    assert await order(api, sort="cost") == ["y", "x"]
    assert not await redis.exists(KEYS.top("c", buckets.day(clock())))


async def test_a_deleted_identity_leaves_the_index(
    api: ApiClient, clock: FakeClock, redis: Redis
) -> None:
    ids = await seed(api, clock)
    assert (await order(api, sort="cost"))[0] == "a"  # builds the cached ranking too
    assert (await api.delete("/v2/identities/a")).status_code == 204
    today = buckets.day(clock())
    for day in (today, today - 3):
        assert await redis.zscore(KEYS.top("c", day), ids["a"]) is None
    assert await redis.zscore(KEYS.ranking("cost", today), ids["a"]) is None
    assert await order(api, sort="cost") == ["b", "c", "d", "f", "e"]


async def test_bad_sort_is_a_400_and_the_schema_documents_it(api: ApiClient) -> None:
    r = await api.get("/v2/identities", params={"sort": "loudest"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sort"
    schema = (await api.get("/schema/openapi.json")).json()
    params = schema["paths"]["/v2/identities"]["get"]["parameters"]
    (sort,) = [p for p in params if p["name"] == "sort"]
    assert sort["schema"]["enum"] == ["created", "cost", "requests", "error_rate"]
    assert sort["schema"]["default"] == "created"
    assert not any(path.startswith("/ui") for path in schema["paths"])
