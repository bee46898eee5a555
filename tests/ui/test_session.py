"""Signing in to the dashboard over HTTP, as a browser does: the token, the session cookie,
CSRF, sign-out."""

from __future__ import annotations

from urllib.parse import quote

import httpx

from sidecar.testing.serving import ApiClient
from tests.support.auth import ADMIN_TOKEN, AUTH


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
