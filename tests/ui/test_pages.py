from __future__ import annotations

import re
from typing import Any

import httpx

from sidecar.testing.serving import ApiClient
from tests.support.clock import FakeClock
from tests.support.rankings import order, seed
from tests.support.ui import csrf_of


async def test_the_dashboard_sorts_through_the_index(
    api: ApiClient, clock: FakeClock, browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    await seed(api, clock)

    def names(page: str) -> list[str]:
        return re.findall(r'<td class="name"><a href="/ui/identities/(\w)">', page)

    for sort in ("cost", "requests", "error_rate"):
        page = (await browser_client.get("/ui", params={"sort": sort})).text
        assert names(page) == await order(api, sort=sort), sort
        assert f'<option value="{sort}" selected>' in page
    page = (await browser_client.get("/ui", params={"sort": "cost", "limit": 4})).text
    assert names(page) == ["a", "b", "c", "d"]
    found = re.search(r'<a rel="next" href="([^"]+)">', page)
    assert found
    page = (await browser_client.get(found.group(1).replace("&amp;", "&"))).text
    assert names(page) == ["f", "e"]


async def test_the_list_shows_name_source_and_30_day_metrics(
    browser_client: httpx.AsyncClient, signed_in: str, api: ApiClient
) -> None:
    for external_id, name, tags in [("plain", None, []), ("named", "Named One", ["gold"])]:
        body: dict[str, Any] = {"external_id": external_id, "tags": tags}
        if name:
            body["display_name"] = name
        assert (await api.post("/v2/identities", json=body)).status_code == 201
    named = (await api.get("/v2/identities/named")).json()["_id"]
    recorder = api.app.services.recorder
    counters = {"r": 4, "e": 1, "i": 300, "o": 100, "c": 1_500_000, "sb": 4}
    recorder.add(named, counters, source="body", external_id="named")
    await recorder.drain()
    page = (await browser_client.get("/ui")).text
    rows = dict(re.findall(r'<tr data-id="(\w+)">(.*?)</tr>', page, re.S))
    row = rows[named]
    assert '<a href="/ui/identities/named">Named One</a>' in row
    assert '<div class="sub">named</div>' in row and ">gold</a>" in row
    assert '<span class="pill src-body">body</span>' in row
    assert '<td class="num requests">4</td>' in row
    assert '<td class="num cost">$0.0015</td>' in row
    assert '<td class="num tokens">400</td>' in row
    assert '<td class="num error-rate">25.0%</td>' in row
    (plain,) = [r for i, r in rows.items() if i != named]
    assert '<a href="/ui/identities/plain">plain</a>' in plain and "\u2013" in plain
    # Search and tag filter.
    page = (await browser_client.get("/ui", params={"q": "NAMED"})).text
    assert re.findall(r'<tr data-id="(\w+)">', page) == [named]
    page = (await browser_client.get("/ui", params={"tag": "gold"})).text
    assert re.findall(r'<tr data-id="(\w+)">', page) == [named]
    page = (await browser_client.get("/ui", params={"tag": "silver"})).text
    assert "No identities match." in page


async def test_paging_next_and_previous(
    browser_client: httpx.AsyncClient, signed_in: str, api: ApiClient, clock: FakeClock
) -> None:
    for n in range(5):
        clock.advance(1)
        await api.post("/v2/identities", json={"external_id": f"u{n}"})

    def names(page: str) -> list[str]:
        return re.findall(r'<td class="name"><a href="/ui/identities/(u\d)">', page)

    def link(page: str, rel: str) -> str | None:
        found = re.search(rf'<a rel="{rel}" href="([^"]+)">', page)
        return found.group(1).replace("&amp;", "&") if found else None

    page = (await browser_client.get("/ui", params={"limit": 2})).text
    assert names(page) == ["u4", "u3"] and link(page, "prev") is None
    nxt = link(page, "next")
    assert nxt
    page = (await browser_client.get(nxt)).text
    assert names(page) == ["u2", "u1"]
    nxt = link(page, "next")
    assert nxt
    page = (await browser_client.get(nxt)).text
    assert names(page) == ["u0"] and link(page, "next") is None
    prev = link(page, "prev")
    assert prev
    page = (await browser_client.get(prev)).text
    assert names(page) == ["u2", "u1"]
    prev = link(page, "prev")
    assert prev
    page = (await browser_client.get(prev)).text
    assert names(page) == ["u4", "u3"] and link(page, "prev") is None


async def test_special_external_ids_have_working_pages(
    browser_client: httpx.AsyncClient, signed_in: str, api: ApiClient
) -> None:
    for external_id in ("new", "a/b", "..", "100% {tag}:x", "new/x"):
        r = await api.post("/v2/identities", json={"external_id": external_id})
        assert r.status_code == 201
    page = (await browser_client.get("/ui")).text
    hrefs = re.findall(r'<td class="name"><a href="([^"]+)">', page)
    assert len(hrefs) == 5
    for href in hrefs:
        r = await browser_client.get(href.replace("&amp;", "&"))
        assert r.status_code == 200, href
    form = await browser_client.get("/ui/identities/new")
    assert "<h1>New Identity</h1>" in form.text
    own = await browser_client.get("/ui/identities/%6Eew")
    assert "<code>new</code>" in own.text
    assert csrf_of(form.text) == signed_in
