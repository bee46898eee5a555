from __future__ import annotations

import httpx

from sidecar.testing.serving import ApiClient as Client
from tests.support.clock import FakeClock
from tests.support.identities import create


async def test_list_newest_first_with_cursors(api: Client, clock: FakeClock) -> None:
    made = []
    for n in range(25):
        clock.advance(1)
        made.append(await create(api, external_id=f"user-{n:02}"))
    newest = [m["_id"] for m in reversed(made)]
    page1 = (await api.get("/v2/identities")).json()
    assert page1["object"] == "list" and page1["has_more"] is True
    assert [i["_id"] for i in page1["data"]] == newest[:10]
    page2 = (
        await api.get("/v2/identities", params={"starting_after": newest[9], "limit": 10})
    ).json()
    assert [i["_id"] for i in page2["data"]] == newest[10:20]
    page3 = (await api.get("/v2/identities", params={"starting_after": newest[19]})).json()
    assert [i["_id"] for i in page3["data"]] == newest[20:]
    assert page3["has_more"] is False
    back = (
        await api.get("/v2/identities", params={"ending_before": newest[20], "limit": 5})
    ).json()
    assert [i["_id"] for i in back["data"]] == newest[15:20]
    assert back["has_more"] is True
    top = (await api.get("/v2/identities", params={"ending_before": newest[3]})).json()
    assert [i["_id"] for i in top["data"]] == newest[:3]
    assert top["has_more"] is False
    everything = (await api.get("/v2/identities", params={"limit": 200})).json()
    assert len(everything["data"]) == 25 and everything["has_more"] is False


async def test_search_is_case_insensitive_over_three_fields(api: Client, clock: FakeClock) -> None:
    for external_id, name, email in [
        ("u1", "Ada Lovelace", "ada@math.org"),
        ("u2", "Grace Hopper", "grace@navy.mil"),
        ("ADA-ops", None, None),
        ("u4", None, "someone@ADA.example"),
    ]:
        clock.advance(1)
        await create(api, external_id=external_id, display_name=name, email=email)
    r = await api.get("/v2/identities", params={"search": "aDa"})
    assert [i["external_id"] for i in r.json()["data"]] == ["u4", "ADA-ops", "u1"]
    r = await api.get("/v2/identities", params={"search": "hopper"})
    assert [i["external_id"] for i in r.json()["data"]] == ["u2"]
    # Matches never span two fields.
    r = await api.get("/v2/identities", params={"search": "u1ada"})
    assert r.json()["data"] == []


async def test_search_pages_through_many(api: Client, clock: FakeClock) -> None:
    for n in range(30):
        clock.advance(1)
        await create(api, external_id=f"{'match' if n % 3 == 0 else 'other'}-{n}")
    first = (await api.get("/v2/identities", params={"search": "MATCH", "limit": 4})).json()
    assert [i["external_id"] for i in first["data"]] == [
        "match-27",
        "match-24",
        "match-21",
        "match-18",
    ]
    assert first["has_more"] is True
    rest = (
        await api.get(
            "/v2/identities",
            params={"search": "match", "limit": 10, "starting_after": first["data"][-1]["_id"]},
        )
    ).json()
    assert [i["external_id"] for i in rest["data"]] == [f"match-{n}" for n in (15, 12, 9, 6, 3, 0)]
    assert rest["has_more"] is False


async def test_filter_by_tags_any_of(api: Client, clock: FakeClock) -> None:
    for external_id, tags in [
        ("a", ["gold"]),
        ("b", ["silver"]),
        ("c", ["gold", "beta"]),
        ("d", []),
        ("e", ["Gold"]),
    ]:
        clock.advance(1)
        await create(api, external_id=external_id, tags=tags)
    r = await api.get("/v2/identities", params={"filter_by.tags": "gold"})
    assert [i["external_id"] for i in r.json()["data"]] == ["c", "a"]
    r = await api.get(
        "/v2/identities", params=[("filter_by.tags", "silver"), ("filter_by.tags", "beta")]
    )
    assert [i["external_id"] for i in r.json()["data"]] == ["c", "b"]
    r = await api.get("/v2/identities", params={"filter_by.tags": "gold", "search": "c"})
    assert [i["external_id"] for i in r.json()["data"]] == ["c"]
    await api.patch("/v2/identities/a", json={"tags": ["bronze"]})
    r = await api.get("/v2/identities", params={"filter_by.tags": "gold"})
    assert [i["external_id"] for i in r.json()["data"]] == ["c"]


async def test_search_and_tags_page_through_the_index(api: Client, clock: FakeClock) -> None:
    made = []
    for n in range(12):
        clock.advance(1)
        tags = ["gold"] if n % 3 == 0 else ["plain"]
        name = f"Zoë Ångström {n}" if n % 2 else f"Max Mustermann {n}"
        made.append((await create(api, external_id=f"u-{n}", display_name=name, tags=tags))["_id"])
    listing = api.app.services.catalog.listing
    assert await listing.index.walk("+", True, "ångström", ["gold"], 5) is not None

    def ids(r: httpx.Response) -> list[str]:
        return [i["_id"] for i in r.json()["data"]]

    newest = made[::-1]
    found = await api.get("/v2/identities", params={"search": "ÅNGSTRÖM", "limit": 2})
    assert ids(found) == [newest[0], newest[2]] and found.json()["has_more"] is True
    after = {"search": "ångström", "limit": 10, "starting_after": newest[2]}
    assert ids(await api.get("/v2/identities", params=after)) == newest[4::2]
    before = {"search": "ångström", "limit": 2, "ending_before": newest[6]}
    assert ids(await api.get("/v2/identities", params=before)) == [newest[2], newest[4]]
    gold = {"search": "ström", "filter_by.tags": "gold"}
    assert ids(await api.get("/v2/identities", params=gold)) == [made[9], made[3]]
    tagged = await api.get("/v2/identities", params={"filter_by.tags": "gold", "limit": 3})
    assert ids(tagged) == [made[9], made[6], made[3]]
    assert ids(await api.get("/v2/identities", params={"search": "Ö"})) == newest[::2]  # 2 bytes
    assert ids(await api.get("/v2/identities", params={"search": "nothing like it"})) == []
