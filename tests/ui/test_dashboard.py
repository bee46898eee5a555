"""The dashboard over HTTP, as a browser uses it: sign-in, its cookie, CSRF, the forms and
the pages' contents."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient
from tests.conftest import ADMIN_TOKEN, AUTH, FakeClock
from tests.proxy.conftest import MakeEnv
from tests.proxy.test_inline import MESSAGES, tokens
from tests.ui.conftest import csrf_of, sign_in


def cookie_header(r: httpx.Response) -> str:
    (header,) = r.headers.get_list("set-cookie")
    return header


async def listed(api: ApiClient) -> list[str]:
    data = (await api.get("/v2/identities", params={"limit": 200})).json()["data"]
    return [i["external_id"] for i in data]


async def test_every_page_needs_a_sign_in(browser_client: httpx.AsyncClient) -> None:
    for path in ("/ui", "/ui?sort=cost", "/ui/identities/new", "/ui/identities/someone"):
        r = await browser_client.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"] == "/ui/login?next=" + quote(path, safe=""), path
    form = await browser_client.get("/ui/login", params={"next": "/ui/identities/new"})
    assert form.status_code == 200
    assert 'name="token"' in form.text and 'value="/ui/identities/new"' in form.text
    # Not signed in, a post creates nothing.
    r = await browser_client.post("/ui/identities/new", data={"external_id": "sneaky"})
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")


async def test_a_wrong_token_is_refused(browser_client: httpx.AsyncClient) -> None:
    for token in ("wrong-token-0123456789", "", ADMIN_TOKEN + "x"):
        r = await browser_client.post("/ui/login", data={"token": token})
        assert r.status_code == 401
        assert "That is not the admin token." in r.text
        assert "set-cookie" not in r.headers
    assert (await browser_client.get("/ui")).status_code == 303


async def test_the_session_cookie_is_httponly_strict_and_holds_no_token(
    browser_client: httpx.AsyncClient,
) -> None:
    r = await browser_client.post(
        "/ui/login", data={"token": ADMIN_TOKEN, "next": "/ui/identities/new"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/identities/new"
    cookie = cookie_header(r)
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/ui" in flags
    assert "secure" not in flags  # plain http here
    assert ADMIN_TOKEN not in cookie
    assert (await browser_client.get("/ui")).status_code == 200
    # Behind a proxy that terminated TLS, the cookie is Secure.
    r = await browser_client.post(
        "/ui/login", data={"token": ADMIN_TOKEN}, headers={"x-forwarded-proto": "https"}
    )
    assert "secure" in [p.strip().lower() for p in cookie_header(r).split(";")]


async def test_a_forged_cookie_and_an_open_redirect_are_refused(
    browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    value = browser_client.cookies["sidecar_session"]
    session_id, _, mac = value.partition(".")
    async with httpx.AsyncClient(base_url=browser_client.base_url) as other:
        for forged in (f"{session_id}.{mac[::-1]}", session_id, f"{session_id}.", ADMIN_TOKEN):
            r = await other.get("/ui", headers={"cookie": f"sidecar_session={forged}"})
            assert r.status_code == 303, forged
        r = await other.get("/ui", headers={"cookie": f"sidecar_session={value}"})
        assert r.status_code == 200  # the genuine one works from anywhere, as a cookie does
    r = await browser_client.post(
        "/ui/login", data={"token": ADMIN_TOKEN, "next": "https://evil.example/ui"}
    )
    assert r.headers["location"] == "/ui"
    r = await browser_client.post("/ui/login", data={"token": ADMIN_TOKEN, "next": "//evil/ui"})
    assert r.headers["location"] == "/ui"


async def test_the_admin_token_works_as_a_bearer_header(api: ApiClient) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, headers=AUTH) as client:
        r = await client.get("/ui")
        assert r.status_code == 200 and "<h1>Identities</h1>" in r.text
        r = await client.post("/ui/identities/new", data={"external_id": "by-bearer"})
        assert r.status_code == 303
    assert await listed(api) == ["by-bearer"]


async def test_sign_out_ends_the_session_everywhere(
    browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    stolen = browser_client.cookies["sidecar_session"]
    r = await browser_client.post("/ui/logout", data={"csrf": signed_in})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert "max-age=0" in cookie_header(r).lower()
    async with httpx.AsyncClient(base_url=browser_client.base_url) as other:
        r = await other.get("/ui", headers={"cookie": f"sidecar_session={stolen}"})
        assert r.status_code == 303


async def test_posts_without_the_csrf_token_or_from_another_site_are_refused(
    browser_client: httpx.AsyncClient, signed_in: str, api: ApiClient
) -> None:
    fields = {"external_id": "csrf-victim"}
    r = await browser_client.post("/ui/identities/new", data=fields)
    assert r.status_code == 403
    r = await browser_client.post("/ui/identities/new", data={**fields, "csrf": "forged"})
    assert r.status_code == 403
    foreign = {"origin": "http://evil.example"}
    r = await browser_client.post(
        "/ui/identities/new", data={**fields, "csrf": signed_in}, headers=foreign
    )
    assert r.status_code == 403
    r = await browser_client.post(
        "/ui/identities/new",
        data={**fields, "csrf": signed_in},
        headers={"referer": "http://evil.example/page"},
    )
    assert r.status_code == 403
    r = await browser_client.post("/ui/logout", data={"csrf": signed_in}, headers=foreign)
    assert r.status_code == 403
    r = await browser_client.post("/ui/login", data={"token": ADMIN_TOKEN}, headers=foreign)
    assert r.status_code == 403
    assert await listed(api) == []
    # The same post from this site goes through.
    own = {"origin": str(browser_client.base_url).rstrip("/")}
    r = await browser_client.post(
        "/ui/identities/new", data={**fields, "csrf": signed_in}, headers=own
    )
    assert r.status_code == 303
    assert await listed(api) == ["csrf-victim"]


def field_error(page: str, field: str) -> str | None:
    """The error shown inside a field's block of the form (up to the next field)."""
    start = page.index(f'id="field-{field}"')
    ends = [page.find('id="field-', start + 1), page.find('<button type="submit"', start)]
    block = page[start : min(i for i in ends if i > 0)]
    found = re.search(r'<div class="error" role="alert">(.*?)</div>', block)
    return found.group(1) if found else None


async def test_form_errors_are_shown_beside_their_fields_and_values_kept(
    browser_client: httpx.AsyncClient, signed_in: str, redis: Redis
) -> None:
    before = await redis.dbsize()
    r = await browser_client.post(
        "/ui/identities/new",
        data={
            "csrf": signed_in,
            "external_id": "   ",
            "display_name": "Ada <Lovelace>",
            "email": "not-an-email",
            "tags": "ok, " + "t" * 65,
            "meta_key": ["plan", "", "plan"],
            "meta_value": ["pro", "orphan", "again"],
        },
    )
    assert r.status_code == 400
    page = r.text
    assert field_error(page, "external_id") == "external_id must not be empty"
    assert field_error(page, "email") == "email is not a valid address"
    assert field_error(page, "tags") is not None and "64" in (field_error(page, "tags") or "")
    assert field_error(page, "display_name") is None
    assert 'value="Ada &lt;Lovelace&gt;"' in page  # kept, escaped
    rows = re.findall(r'<div class="meta-row-wrap" id="meta-(\d+)">', page)
    assert len(rows) >= 3
    assert 'value="pro"' in page and 'value="orphan"' in page
    shown = html.unescape(page)
    assert "a value needs a key" in shown and "the key 'plan' is given twice" in shown
    assert await redis.dbsize() == before  # nothing written
    # Fixed, the same form creates the identity and lands on its page.
    r = await browser_client.post(
        "/ui/identities/new",
        data={
            "csrf": signed_in,
            "external_id": "ada",
            "display_name": "Ada Lovelace",
            "email": "ada@example.com",
            "tags": "math, pioneer",
            "meta_key": ["plan", "", ""],
            "meta_value": ["pro", "", ""],
        },
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/identities/ada"
    async with httpx.AsyncClient(base_url=browser_client.base_url, headers=AUTH) as api:
        made = (await api.get("/v2/identities/ada")).json()
    assert made["metadata"] == {"plan": "pro"} and made["tags"] == ["math", "pioneer"]
    again = await browser_client.post(
        "/ui/identities/new", data={"csrf": signed_in, "external_id": "ada"}
    )
    assert again.status_code == 409
    assert field_error(again.text, "external_id") == (
        "an identity with this external id already exists"
    )


async def test_a_malformed_form_is_a_400(browser_client: httpx.AsyncClient, signed_in: str) -> None:
    r = await browser_client.post(
        "/ui/identities/new",
        content=b"csrf=" + signed_in.encode() + b"&external_id=%ff%fe",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400
    r = await browser_client.post("/ui/identities/new", json={"external_id": "x"})
    assert r.status_code == 400
    for bad in ("?sort=loudest", "?limit=0", "?after=nope", "?q=%01"):
        assert (await browser_client.get("/ui" + bad)).status_code == 400, bad
    assert (await browser_client.get("/ui/identities/%ff")).status_code == 400
    assert (await browser_client.get("/ui/identities/nobody")).status_code == 404
    assert (await browser_client.post("/ui/identities/nobody", data={})).status_code == 405


def limit_rows(page: str) -> dict[str, str]:
    return dict(re.findall(r'data-limit="([^"]+)">(.*?)</tr>', page, re.S))


async def test_identity_page_shows_profile_metrics_chart_limits_and_sources(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text(
        '[[policy]]\nname = "pro"\nmatch = { metadata = { plan = "pro" } }\n'
        'requests = ["10/minute"]\ntokens = ["100000/day"]\ncost_usd = ["5/day"]\n'
        "concurrency = 4\n"
    )
    env = await make_env(policies={"paths": [str(policies)]})
    r = await env.api.post(
        "/v2/identities",
        json={"external_id": "team/a b", "display_name": "Team A", "metadata": {"plan": "pro"}},
    )
    assert r.status_code == 201
    async with openai.AsyncOpenAI(
        base_url=env.url + "/v1", api_key="sk-upstream", max_retries=0
    ) as client:
        for _ in range(3):
            await client.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_headers={"X-ORQ-IDENTITY-ID": "team/a b", **tokens(1000, 500)},
            )
    await env.settle()
    async with httpx.AsyncClient(base_url=env.url) as browser:
        await sign_in(browser)
        page = (await browser.get("/ui/identities/team%2Fa%20b")).text
        again = (await browser.get("/ui/identities/team%2Fa%20b")).text
    assert "<h1>Team A" in page and "<code>team/a b</code>" in page
    assert '<div class="card" id="metric-requests"><b>3</b>' in page
    # gpt-4o: 3 * (1000 * $2.50/M + 500 * $10/M) = $0.0225
    assert '<div class="card" id="metric-cost"><b>$0.0225</b>' in page
    assert '<div class="card" id="metric-tokens"><b>4,500</b>' in page
    # The chart: 30 days, today's bars hold today's usage.
    cost_chart = page[page.index('id="chart-cost"') : page.index('id="chart-tokens"')]
    days = re.findall(r'data-day="([0-9-]+)" data-value="([0-9.]+)"', cost_chart)
    assert len(days) == 30 and days[-1] == ("2026-11-18", "22500000")
    assert all(value == "0" for _, value in days[:-1])
    tokens_chart = page[page.index('id="chart-tokens"') :]
    assert 'data-day="2026-11-18" data-value="4500"' in tokens_chart
    assert "Policy <b>pro</b>" in page
    limits = limit_rows(page)
    assert set(limits) == {"10/minute", "100000/day", "5/day", "concurrency"}
    assert '<td class="num used">3</td>' in limits["10/minute"]
    assert '<td class="num remaining">7</td>' in limits["10/minute"]
    assert '<td class="num used">4,500</td>' in limits["100000/day"]
    assert '<td class="num used">$0.0225</td>' in limits["5/day"]
    assert '<td class="num used">0</td>' in limits["concurrency"]
    assert limit_rows(again) == limits  # reading the limits consumed nothing
    sources: dict[str, Any] = dict(
        re.findall(r'data-source="(\w+)">.*?<td class="num">([\d,]+)</td>', page, re.S)
    )
    assert sources == {
        "body": "0",
        "user_field": "0",
        "header": "3",
        "api_key": "0",
        "anonymous": "0",
    }


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
