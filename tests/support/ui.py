"""Signing in to the dashboard as a browser does."""

from __future__ import annotations

import html
import re
from pathlib import Path

import httpx

from tests.support.auth import ADMIN_TOKEN

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_TIMEOUT_S = 540  # apt-get update and install together
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', page)
    assert found, "no CSRF field on the page"
    return html.unescape(found.group(1))


async def sign_in(client: httpx.AsyncClient) -> str:
    """Sign in through the form; the session's CSRF token."""
    r = await client.post("/ui/login", data={"token": ADMIN_TOKEN, "next": "/ui"})
    assert r.status_code == 303, r.text
    page = await client.get("/ui")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)
