"""The sidecar on a real Redis Cluster (3 masters, 3 replicas), connected from its URL."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from sidecar.identity.model import Profile
from sidecar.identity.records import IdentityRecords
from sidecar.settings import RedisSettings
from sidecar.store.connect import connect
from sidecar.store.keys import Keys
from sidecar.testing.redis_cluster import LocalCluster
from tests.support.clock import FakeClock
from tests.support.cluster import MakeSide, create, eventually, gpt_4o_nanos
from tests.support.limits import policy_file
from tests.support.traffic import MESSAGES, tokens


async def test_the_app_talks_to_the_cluster_through_a_cluster_client(
    fresh_cluster: LocalCluster, make_side: MakeSide
) -> None:
    side = await make_side(fresh_cluster.url)
    assert isinstance(side.app.services.redis, RedisCluster)
    assert side.app.services.records.in_order is False
    ready = await side.api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def connections_received(port: int) -> int:
    with redis.Redis(port=port) as node:
        return int(node.info("stats")["total_connections_received"])


async def test_start_up_opens_connections_to_every_master(
    fresh_cluster: LocalCluster, make_side: MakeSide
) -> None:
    before = {port: connections_received(port) for port in fresh_cluster.master_ports()}
    assert len(before) == 3
    await make_side(fresh_cluster.url)
    for port, count in before.items():
        assert connections_received(port) - count >= RedisSettings().warm_connections, port


async def test_identity_api(
    fresh_cluster: LocalCluster, make_side: MakeSide, clock: FakeClock
) -> None:
    side = await make_side(fresh_cluster.url)
    made = []
    for n in range(25):
        clock.advance(1)
        made.append(
            await create(
                side,
                external_id=f"user-{n:02}",
                display_name=f"Person {n}",
                email=f"p{n}@example.com",
                tags=["gold"] if n % 5 == 0 else ["plain"],
                metadata={"n": n},
            )
        )
    where = fresh_cluster.keys("sidecar:*")
    # The records land on several masters; the two indexes share one slot.
    assert len({where[f"sidecar:id:{{{m['_id']}}}"] for m in made}) >= 2
    assert where["sidecar:{idx}:order"] == where["sidecar:{idx}:xid"]

    r = await side.api.post("/v2/identities", json={"external_id": "user-03"})
    assert r.status_code == 409
    by_id = (await side.api.get(f"/v2/identities/{made[3]['_id']}")).json()
    by_external = (await side.api.get("/v2/identities/user-03")).json()
    assert by_id == by_external == made[3]
    assert (await side.api.get("/v2/identities/nobody")).status_code == 404

    clock.advance(1)
    change = {"display_name": "Renamed", "tags": ["new"]}
    r = await side.api.patch("/v2/identities/user-03", json=change)
    assert r.status_code == 200, r.text
    patched = r.json()
    assert (patched["display_name"], patched["tags"], patched["email"]) == (
        "Renamed", ["new"], "p3@example.com")  # fmt: skip
    assert patched["updated"] != made[3]["updated"]

    newest = [m["_id"] for m in reversed(made)]
    page1 = (await side.api.get("/v2/identities")).json()
    assert [i["_id"] for i in page1["data"]] == newest[:10] and page1["has_more"] is True
    page2 = (await side.api.get("/v2/identities", params={"starting_after": newest[9]})).json()
    assert [i["_id"] for i in page2["data"]] == newest[10:20]
    back = (
        await side.api.get("/v2/identities", params={"ending_before": newest[20], "limit": 5})
    ).json()
    assert [i["_id"] for i in back["data"]] == newest[15:20] and back["has_more"] is True

    found = (await side.api.get("/v2/identities", params={"search": "RENAMED"})).json()
    assert [i["external_id"] for i in found["data"]] == ["user-03"]
    found = (await side.api.get("/v2/identities", params={"search": "p1", "limit": 3})).json()
    assert [i["external_id"] for i in found["data"]] == ["user-19", "user-18", "user-17"]
    gold = (await side.api.get("/v2/identities", params={"filter_by.tags": "gold"})).json()
    assert [i["external_id"] for i in gold["data"]] == [f"user-{n:02}" for n in (20, 15, 10, 5, 0)]
    tagged = await side.api.get(
        "/v2/identities", params=[("filter_by.tags", "new"), ("filter_by.tags", "gold")]
    )
    assert [i["external_id"] for i in tagged.json()["data"]][-2:] == ["user-03", "user-00"]

    with_metrics = (await side.api.get("/v2/identities", params={"include_metrics": "true"})).json()
    assert all(i["metrics"]["total_requests"] == 0 for i in with_metrics["data"])

    gone = made[7]
    assert (await side.api.delete("/v2/identities/user-07")).status_code == 204
    assert (await side.api.get("/v2/identities/user-07")).status_code == 404
    assert not [k for k in fresh_cluster.keys("sidecar:*") if gone["_id"] in k]
    everything = (await side.api.get("/v2/identities", params={"limit": 200})).json()
    assert len(everything["data"]) == 24
    assert gone["_id"] not in {i["_id"] for i in everything["data"]}
    order = "sidecar:{idx}:order"
    assert fresh_cluster.call(order, "ZCARD", order) == 24
    assert fresh_cluster.call(order, "HLEN", "sidecar:{idx}:xid") == 24


async def test_inline_attribution_with_the_openai_client(
    fresh_cluster: LocalCluster, make_side: MakeSide
) -> None:
    side = await make_side(fresh_cluster.url)
    expected: dict[str, Counter[str]] = {}
    async with side.openai() as oai:
        for n in range(9):
            who = f"team-{n % 3}"
            await oai.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_body={"identity": {"id": who, "tags": ["cluster"]}},
                extra_headers=tokens(100 + n, 10 + n),
            )
            expected.setdefault(who, Counter()).update(
                {"requests": 1, "input": 100 + n, "output": 10 + n}
            )
        stream = await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-ORQ-IDENTITY-ID": "streamer", **tokens(300, 40)},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks and all(c.usage is None for c in chunks), "the added usage chunk is dropped"
        expected["streamer"] = Counter({"requests": 1, "input": 300, "output": 40})
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_headers={"X-ORQ-IDENTITY-ID": "streamer", "x-mock-status": "503"},
            )
    forwarded = side.mock.requests[0]
    assert "identity" not in forwarded.json()
    assert forwarded.header("x-orq-identity-id") == "team-0"

    for who, want in expected.items():
        metrics = (await side.record(who))["metrics"]
        assert metrics["input_tokens"] == want["input"]
        assert metrics["output_tokens"] == want["output"]
        assert metrics["total_tokens"] == want["input"] + want["output"]
        assert metrics["total_cost"] == gpt_4o_nanos(want["input"], want["output"]) / 1e9
        if who == "streamer":
            assert (metrics["total_requests"], metrics["error_rate"]) == (2, 0.5)
        else:
            assert (metrics["total_requests"], metrics["error_rate"]) == (want["requests"], 0.0)
    listed = (await side.api.get("/v2/identities", params={"filter_by.tags": "cluster"})).json()
    assert sorted(i["external_id"] for i in listed["data"]) == ["team-0", "team-1", "team-2"]
    # By model: written in the identity's slot with its counters, summed there by one script.
    r = await side.api.get("/v2/usage", params={"group_by": "model"})
    assert [(m["model"], m["identities"], m["requests"]) for m in r.json()["data"]] == [
        ("gpt-4o", 4, 11)
    ]
    r = await side.api.get("/v2/identities/streamer/metrics", params={"group_by": "model"})
    assert [
        (m["model"], m["requests"], m["errors"], m["input_tokens"]) for m in r.json()["data"]
    ] == [("gpt-4o", 2, 1, 300)]


async def test_search_index_is_built_and_kept_in_the_order_sets_slot(
    fresh_cluster: LocalCluster, make_side: MakeSide, clock: FakeClock
) -> None:
    # Identities listed before the index exists: the sidecar builds it when it starts.
    client = connect(fresh_cluster.url, timeout_ms=2000)
    try:
        records = IdentityRecords(client, Keys("sidecar"), clock)
        for n in range(30):
            clock.advance(1)
            await records.create(f"early-{n:02}", Profile(display_name=f"Early Bird {n}"))
    finally:
        await client.aclose()
    side = await make_side(fresh_cluster.url)
    builder = side.app.services.search_index

    async def complete() -> bool:
        status = await builder.status()
        return status.state == "ready" and status.indexed == 30

    await eventually("the search index is built", complete, within=30)
    for n in range(5):
        clock.advance(1)
        await create(side, external_id=f"late-{n}", display_name=f"Late Bird {n}", tags=["t"])
    where = fresh_cluster.keys("sidecar:*")
    index_keys = [k for k in where if k.startswith("sidecar:{idx}:s:")]
    assert len(index_keys) > 30
    assert {where[k] for k in index_keys} == {where["sidecar:{idx}:order"]}

    listing = side.app.services.catalog.listing
    assert await listing.index.walk("+", True, "bird", (), 3) is not None  # the index answers
    found = (
        await side.api.get("/v2/identities", params={"search": "RLY BIRD 2", "limit": 3})
    ).json()
    assert [i["external_id"] for i in found["data"]] == ["early-29", "early-28", "early-27"]
    assert found["has_more"] is True
    page = {"search": "bird", "limit": "4", "starting_after": found["data"][0]["_id"]}
    found = (await side.api.get("/v2/identities", params=page)).json()
    assert [i["external_id"] for i in found["data"]] == [f"early-{n}" for n in (28, 27, 26, 25)]
    tagged = {"search": "ird", "filter_by.tags": "t", "limit": "10"}
    found = (await side.api.get("/v2/identities", params=tagged)).json()
    assert [i["external_id"] for i in found["data"]] == [f"late-{n}" for n in (4, 3, 2, 1, 0)]

    r = await side.api.patch("/v2/identities/late-3", json={"display_name": "Owl"})
    assert r.status_code == 200, r.text
    assert (await side.api.delete("/v2/identities/late-2")).status_code == 204
    found = (await side.api.get("/v2/identities", params=tagged)).json()
    assert [i["external_id"] for i in found["data"]] == ["late-4", "late-1", "late-0"]
    found = (await side.api.get("/v2/identities", params={"search": "owl"})).json()
    assert [i["external_id"] for i in found["data"]] == ["late-3"]
    assert (await builder.status()).indexed == 34


async def test_50_concurrent_upserts_of_one_new_external_id_leave_one_identity(
    fresh_cluster: LocalCluster, make_side: MakeSide
) -> None:
    side = await make_side(fresh_cluster.url)
    store = side.app.services.records
    results = await asyncio.gather(
        *(store.upsert("racer", Profile(display_name=f"n{i}", tags=[f"t{i}"])) for i in range(50))
    )
    assert sum(created for _, created in results) == 1
    assert len({identity.id for identity, _ in results}) == 1
    assert len(fresh_cluster.keys("sidecar:id:*")) == 1

    # The same race through the proxy, with a body identity on every request.
    body = {"model": "gpt-4o", "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=side.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json={**body, "identity": {"id": "crowd", "display_name": f"c{i}"}},
                    headers=tokens(10, 1),
                )
                for i in range(50)
            )
        )
    assert Counter(r.status_code for r in replies) == {200: 50}
    crowd = await side.record("crowd")
    assert crowd["metrics"]["total_requests"] == 50
    assert crowd["metrics"]["input_tokens"] == 500
    assert len(fresh_cluster.keys("sidecar:id:*")) == 2
    order = "sidecar:{idx}:order"
    assert fresh_cluster.call(order, "ZCARD", order) == 2
    listed = (await side.api.get("/v2/identities")).json()["data"]
    assert sorted(i["external_id"] for i in listed) == ["crowd", "racer"]


async def test_80_concurrent_against_20_per_minute_admit_exactly_20(
    fresh_cluster: LocalCluster, make_side: MakeSide, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text('[[policy]]\nname = "p"\nrequests = ["20/minute"]\n')
    side = await make_side(fresh_cluster.url, policies={"paths": [str(policies)]})
    async with httpx.AsyncClient(base_url=side.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": MESSAGES},
                    headers={"X-ORQ-IDENTITY-ID": "burst"},
                )
                for _ in range(80)
            )
        )
    assert Counter(r.status_code for r in replies) == {200: 20, 429: 60}
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.json()["error"]["code"] == "requests_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert len(side.mock.requests) == 20
    metrics = (await side.record("burst"))["metrics"]
    assert (metrics["total_requests"], metrics["rate_limited_requests"]) == (20, 60)


async def test_one_request_with_an_image_by_url_at_a_time_on_a_cluster(
    fresh_cluster: LocalCluster, make_side: MakeSide, tmp_path: Path
) -> None:
    # Its one slot is a lease set of its own, on another slot than the identity's buckets: the
    # limits are checked in turn, and a refusal gives back what the earlier ones took.
    side = await make_side(
        fresh_cluster.url,
        **policy_file(tmp_path, '[[policy]]\nname = "p"\ntokens = ["100000/hour"]\n'),
        limits={"opaque_input": "one_at_a_time"},
    )
    image = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://images.test/a.png"}}],
        }
    ]
    async with httpx.AsyncClient(base_url=side.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": image, "max_tokens": 10},
                    headers={"X-ORQ-IDENTITY-ID": "seer", "x-mock-latency-ms": "300"},
                )
                for _ in range(6)
            )
        )
        assert Counter(r.status_code for r in replies) == {200: 1, 429: 5}
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.json()["error"]["policy"] == "opaque_input"
        again = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": image, "max_tokens": 10},
            headers={"X-ORQ-IDENTITY-ID": "seer"},
        )
        assert again.status_code == 200, again.text


async def test_200_concurrent_never_over_admit(
    fresh_cluster: LocalCluster, make_side: MakeSide, tmp_path: Path
) -> None:
    """Every check of one identity goes to one node, all at once: more than a small
    per-node connection pool holds."""
    policies = tmp_path / "policies.toml"
    policies.write_text('[[policy]]\nname = "p"\nrequests = ["50/minute"]\nconcurrency = 1000\n')
    side = await make_side(fresh_cluster.url, policies={"paths": [str(policies)]})
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=side.url, timeout=30, limits=limits) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": MESSAGES},
                    headers={"X-ORQ-IDENTITY-ID": "crowd", "x-mock-latency-ms": "200"},
                )
                for _ in range(200)
            )
        )
    assert Counter(r.status_code for r in replies) == {200: 50, 429: 150}
    assert side.app.services.limiter.errors == 0


async def test_daily_and_hourly_series(
    fresh_cluster: LocalCluster, make_side: MakeSide, clock: FakeClock
) -> None:
    side = await make_side(fresh_cluster.url)
    async with side.openai() as oai:
        headers = {"X-ORQ-IDENTITY-ID": "charted", **tokens(100, 10)}
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={**headers, "x-mock-status": "503"}
            )
        await side.settle()
        clock.advance(86_400)
        await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_body={"identity": {"id": "charted"}},
            extra_headers=tokens(7, 3),
        )
    await side.settle()
    r = await side.api.get("/v2/identities/charted/metrics", params={"granularity": "day"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["totals"]["total_requests"] == 3 and body["totals"]["input_tokens"] == 107
    points = body["series"]["points"]
    assert len(points) == 30 and points[-1]["start"] == "2026-11-19T00:00:00Z"
    assert (points[-1]["requests"], points[-1]["input_tokens"], points[-1]["output_tokens"]) == (
        1, 7, 3)  # fmt: skip
    assert (points[-2]["requests"], points[-2]["errors"], points[-2]["input_tokens"]) == (2, 1, 100)
    assert points[-1]["cost_nanos"] == gpt_4o_nanos(7, 3)
    assert body["series"]["by_source"] == {
        "body": 1,
        "user_field": 0,
        "header": 2,
        "api_key": 0,
        "anonymous": 0,
    }

    r = await side.api.get("/v2/identities/charted/metrics", params={"granularity": "hour"})
    hours = r.json()["series"]["points"]
    assert len(hours) == 72
    assert hours[-1]["start"] == "2026-11-19T11:00:00Z" and hours[-1]["requests"] == 1
    assert hours[-25]["requests"] == 2 and sum(p["requests"] for p in hours) == 3

    # Erasure takes every bucket, the two days by model included, from the identity's slot.
    charted = (await side.api.get("/v2/identities/charted")).json()["_id"]
    assert len([k for k in fresh_cluster.keys("sidecar:*") if charted in k and ":m:" in k]) == 2
    assert (await side.api.delete("/v2/identities/charted")).status_code == 204
    assert not [k for k in fresh_cluster.keys("sidecar:*") if charted in k]
