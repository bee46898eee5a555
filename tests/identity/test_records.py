from __future__ import annotations

import asyncio
from typing import cast

import pytest
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient as Client
from tests.support.identities import create


async def test_no_key_embeds_the_external_id(api: Client, redis: Redis) -> None:
    made = await create(api, external_id="secret{slot}:id")
    keys = [k.decode() for k in cast(list[bytes], await redis.keys("*"))]
    assert not any("secret" in k for k in keys)
    own = [k for k in keys if made["_id"] in k]
    assert own and all("{" + made["_id"] + "}" in k for k in own)


async def test_delete_erases_record_indexes_and_usage(api: Client, redis: Redis) -> None:
    made = await create(api, external_id="gone", tags=["t"])
    keep = await create(api, external_id="kept")
    await redis.hset(f"sidecar:u:{{{made['_id']}}}:d", mapping={"20775:r": 3, "s:r": 3})
    await redis.hset(f"sidecar:u:{{{made['_id']}}}:h:498611", "r", 3)
    assert (await api.delete("/v2/identities/gone")).status_code == 204
    assert (await api.get("/v2/identities/gone")).status_code == 404
    assert (await api.delete("/v2/identities/gone")).status_code == 404
    keys = [k.decode() for k in cast(list[bytes], await redis.keys("*"))]
    assert not any(made["_id"] in k for k in keys)
    members = cast(list[bytes], await redis.zrange("sidecar:{idx}:order", 0, -1))
    assert [m[:26].decode() for m in members] == [keep["_id"]]
    assert len(await redis.hgetall("sidecar:{idx}:xid")) == 1
    listed = (await api.get("/v2/identities")).json()["data"]
    assert [i["_id"] for i in listed] == [keep["_id"]]
    again = await create(api, external_id="gone")
    assert again["_id"] != made["_id"]


@pytest.mark.parametrize("in_order", [True, False], ids=["single-server", "cluster-path"])
async def test_50_concurrent_upserts_create_one_identity(
    api: Client, redis: Redis, in_order: bool
) -> None:
    from sidecar.identity.model import Profile

    store = api.app.services.records
    store.in_order = in_order  # the path a cluster client takes, on this single server
    results = await asyncio.gather(
        *(store.upsert("racer", Profile(display_name=f"n{i}", tags=[f"t{i}"])) for i in range(50))
    )
    assert sum(created for _, created in results) == 1
    assert len({identity.id for identity, _ in results}) == 1
    assert await redis.zcard("sidecar:{idx}:order") == 1
    assert len(await redis.keys("sidecar:id:*")) == 1
    page = (await api.get("/v2/identities")).json()
    assert len(page["data"]) == 1 and page["data"][0]["external_id"] == "racer"


async def test_upsert_overwrites_given_fields_only(api: Client) -> None:
    from msgspec import UNSET

    from sidecar.identity.model import Profile

    store = api.app.services.records
    first, created = await store.upsert("u", Profile(display_name="A", email="a@x.io"))
    assert created
    second, created = await store.upsert("u", Profile(display_name="B", email=UNSET))
    assert not created and second.id == first.id
    assert (second.display_name, second.email) == ("B", "a@x.io")
    found = await api.get("/v2/identities", params={"search": "b"})
    assert [i["external_id"] for i in found.json()["data"]] == ["u"]
