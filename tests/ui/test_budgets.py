"""The dashboard's budgets: an identity's page lists them with consumption bars and the next
reset; the new, edit and reset forms follow the CSRF rules of every form; the list shows
"budget used" when some budget applies."""

from __future__ import annotations

import html
import re
from typing import Any

import httpx
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient
from tests.support.ui import csrf_of


async def budget(api: ApiClient, **fields: Any) -> dict[str, Any]:
    body = {"scope": {"kind": "identity", "target": "ann"}, **fields}
    r = await api.post("/v2/budgets", json=body)
    assert r.status_code == 201, r.text
    api.app.services.clock.advance(0.01)
    made: dict[str, Any] = r.json()
    return made


async def spend(api: ApiClient, redis: Redis, budget_id: str, nanos: int) -> None:
    store = api.app.services.budgets.store
    stored = await store.get(budget_id)
    now_ms = int(api.app.services.clock() * 1000)
    key = next(k for k in store.bucket_keys(stored, now_ms) if ":c:" in k)
    await redis.incrby(key, nanos)


def rows(page: str) -> dict[str, str]:
    """data-budget -> the row's text."""
    found = re.findall(r'<tr class="budget" data-budget="([^"]+)">(.*?)</tr>', page, re.S)
    return {b: " ".join(html.unescape(re.sub(r"<[^>]+>", " ", t)).split()) for b, t in found}


async def test_an_identitys_page_lists_its_budgets_with_bars_and_resets(
    api: ApiClient, redis: Redis, browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    await api.post("/v2/identities", json={"external_id": "ann", "tags": ["team-a"]})
    own = await budget(api, amount_usd=50, token_limit=1000, alerts=[{"threshold_percent": 80}])
    team = await budget(api, scope={"kind": "tag", "target": "team-a"}, requests_per_minute=60)
    credit = await budget(api, period="one_time", amount_usd=10)
    await budget(api, scope={"kind": "tag", "target": "other"}, amount_usd=1)
    await spend(api, redis, own["_id"], 45 * 10**9)
    page = (await browser_client.get("/ui/identities/ann")).text
    found = rows(page)
    assert set(found) == {own["_id"], team["_id"], credit["_id"]}
    assert "$45.00 of $50.00 cost" in found[own["_id"]]
    assert "0 of 1,000 tokens" in found[own["_id"]]
    assert "2026-12-01 00:00 UTC" in found[own["_id"]] and "80%" in found[own["_id"]]
    assert 'style="width:90%"' in page and 'class="hot"' in page
    assert "tag team-a" in found[team["_id"]] and "requests only" in found[team["_id"]]
    assert "never" in found[credit["_id"]] and "one-time" in found[credit["_id"]]
    assert f'action="/ui/budgets/{own["_id"]}/reset"' in page
    assert 'href="/ui/budgets/new?kind=identity&amp;target=ann"' in page

    # Reset, with the session's CSRF token: back to zero, and back on the identity's page.
    r = await browser_client.post(f"/ui/budgets/{own['_id']}/reset", data={"csrf": csrf_of(page)})
    assert (r.status_code, r.headers["location"]) == (303, "/ui/identities/ann")
    page = (await browser_client.get("/ui/identities/ann")).text
    assert "$0.00 of $50.00" in rows(page)[own["_id"]]


async def test_the_list_shows_budget_used_only_when_a_budget_applies(
    api: ApiClient, redis: Redis, browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    await api.post("/v2/identities", json={"external_id": "ann"})
    await api.post("/v2/identities", json={"external_id": "bob"})
    assert "Budget used" not in (await browser_client.get("/ui")).text
    made = await budget(api, amount_usd=40)
    await spend(api, redis, made["_id"], 10 * 10**9)
    page = (await browser_client.get("/ui")).text
    assert "Budget used" in page
    cells = dict(
        re.findall(
            r'<tr data-id="[^"]+">\s*<td class="name"><a [^>]*>([^<]+)</a>.*?'
            r'<td class="num budget-used">([^<]*)</td>',
            page,
            re.S,
        )
    )
    assert cells == {"ann": "25.0%", "bob": "\u2013"}


async def test_new_and_edit_forms_create_and_change_a_budget(
    api: ApiClient, browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    form = await browser_client.get("/ui/budgets/new", params={"kind": "tag", "target": "vip"})
    assert form.status_code == 200
    assert 'value="vip"' in form.text and '<option value="tag" selected>' in form.text
    fields = {
        "csrf": signed_in, "kind": "tag", "target": "vip", "period": "weekly",
        "amount_usd": "12.5", "token_limit": "1,000", "requests_per_minute": "",
        "alerts": "80, 100%", "expires_at": "", "is_active": "on",
    }  # fmt: skip
    r = await browser_client.post("/ui/budgets/new", data=fields)
    assert (r.status_code, r.headers["location"]) == (303, "/ui?tag=vip")
    (made,) = (await api.get("/v2/budgets")).json()["data"]
    assert (made["scope"], made["period"], made["amount_usd"], made["token_limit"]) == (
        {"kind": "tag", "target": "vip"}, "weekly", 12.5, 1000,
    )  # fmt: skip
    assert [a["threshold_percent"] for a in made["alerts"]] == [80, 100]

    edit = await browser_client.get(f"/ui/budgets/{made['_id']}")
    assert 'value="12.5"' in edit.text and 'value="80, 100"' in edit.text
    changed = {**fields, "amount_usd": "", "requests_per_minute": "30", "is_active": ""}
    changed.pop("is_active")  # an unticked box is not sent
    changed["target"] = "someone-else"  # the scope is not the form's to change
    r = await browser_client.post(f"/ui/budgets/{made['_id']}", data=changed)
    assert r.status_code == 303, r.text
    after = (await api.get(f"/v2/budgets/{made['_id']}")).json()
    assert (after["amount_usd"], after["requests_per_minute"], after["is_active"]) == (
        None, 30, False,
    )  # fmt: skip
    assert after["scope"] == made["scope"]


async def test_form_errors_are_shown_beside_their_fields_and_nothing_is_written(
    api: ApiClient, browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    base = {"csrf": signed_in, "kind": "identity", "target": "ann", "period": "monthly"}
    for extra, field in (
        ({}, "amount_usd"),  # no limit at all
        ({"amount_usd": "lots"}, "amount_usd"),
        ({"amount_usd": "-3"}, "amount_usd"),
        ({"token_limit": "1.5"}, "token_limit"),
        ({"amount_usd": "5", "alerts": "eighty"}, "alerts"),
        ({"amount_usd": "5", "alerts": "150"}, "alerts"),
        ({"amount_usd": "5", "expires_at": "soon"}, "expires_at"),
        ({"amount_usd": "5", "target": ""}, "target"),
        ({"amount_usd": "5", "kind": "team"}, "kind"),
    ):
        r = await browser_client.post("/ui/budgets/new", data={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        error = re.search(
            rf'<div class="field" id="field-{field}">.*?<div class="error" role="alert">',
            r.text,
            re.S,
        )
        assert error, (extra, field)
        if "amount_usd" in extra:
            assert f'value="{html.escape(extra["amount_usd"])}"' in r.text  # kept as typed
    assert (await api.get("/v2/budgets")).json()["data"] == []


async def test_budget_forms_follow_the_csrf_rules(
    api: ApiClient, browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    made = await budget(api, amount_usd=5)
    fields = {"kind": "identity", "target": "x", "period": "daily", "amount_usd": "1"}
    foreign = {"origin": "https://evil.example"}
    for path, data, headers in (
        ("/ui/budgets/new", {**fields, "csrf": "forged"}, {}),
        ("/ui/budgets/new", {**fields, "csrf": signed_in}, foreign),
        (f"/ui/budgets/{made['_id']}", {**fields, "csrf": "forged"}, {}),
        (f"/ui/budgets/{made['_id']}/reset", {"csrf": ""}, {}),
        (f"/ui/budgets/{made['_id']}/reset", {"csrf": signed_in}, foreign),
    ):
        r = await browser_client.post(path, data=data, headers=headers)
        assert r.status_code == 403, (path, headers)
    assert len((await api.get("/v2/budgets")).json()["data"]) == 1
    async with httpx.AsyncClient(base_url=str(api.base_url)) as stranger:
        r = await stranger.get(f"/ui/budgets/{made['_id']}")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    r = await browser_client.get("/ui/budgets/01JDQ6ZK3N4X8V2B7C9D0E1F2G")
    assert r.status_code == 404
