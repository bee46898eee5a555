"""Search and tag filters through the API once the search index answers them, and what
/healthz says of the index."""

from __future__ import annotations

import asyncio

import httpx

from sidecar.testing.serving import ApiClient as Client
from tests.api.test_identities import create
from tests.conftest import FakeClock


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


async def test_healthz_shows_the_search_index(api: Client) -> None:
    await create(api, external_id="first")
    for _ in range(100):
        health = (await api.get("/healthz")).json()
        if "search_index" in health:
            break
        await asyncio.sleep(0.02)
    # Checked at start, before the first identity; then once a minute.
    assert health["search_index"]["state"] in ("absent", "ready")
    assert set(health["search_index"]) == {"state", "identities", "indexed", "late", "late_ms"}
