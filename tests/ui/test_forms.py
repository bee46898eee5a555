from __future__ import annotations

import html
import re

import httpx
from redis.asyncio import Redis

from tests.support.auth import AUTH


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
