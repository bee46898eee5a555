"""Control characters (C0, C1) and bidirectional formatting in an external id or a display name
are refused with a 400 naming the field, from every source a running sidecar takes them from:
the body identity, the identity header, the user fields, the identity API, the hooks and the
dashboard's form. Nothing is forwarded and nothing is written."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.support.auth import ADMIN_TOKEN, AUTH
from tests.support.env import Env, MakeEnv

CHAT = "/v1/chat/completions"
HOOK = {"x-sidecar-token": ADMIN_TOKEN}
HEADER = "X-ORQ-IDENTITY-ID"

# One of each kind, inside the text (trimming cannot remove them).
TAINTED = [
    "user\x85evil",  # NEL (C1)
    "user\x9b31m",  # CSI (C1)
    "user\x1bevil",  # ESC (C0)
    "user\u202egnp.exe",  # right-to-left override
    "user\u2067evil\u2069",  # right-to-left isolate
    "user\u200fevil",  # right-to-left mark
    "user\u061cevil",  # Arabic letter mark
]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}


async def assert_refused(env: Env, r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert "control or bidirectional formatting" in error["message"]
    await env.settle()
    assert not env.mock.requests
    assert (await env.api.get("/v2/identities")).json()["data"] == []


@pytest.mark.parametrize("value", TAINTED)
async def test_inline_body_identity_header_and_user_field(make_env: MakeEnv, value: str) -> None:
    env = await make_env(identity={"user_fields": True})
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post(CHAT, json=chat(identity={"id": value}))
        await assert_refused(env, r, "identity.id")
        r = await client.post(CHAT, json=chat(identity={"id": "fine", "display_name": value}))
        await assert_refused(env, r, "identity.display_name")
        r = await client.post(CHAT, json=chat(user=value))
        await assert_refused(env, r, "user")
        r = await client.post(CHAT, json=chat(), headers={HEADER: quote(value)})
        await assert_refused(env, r, HEADER)
        # As raw header bytes too, where they can be (the HTTP server itself refuses C0 ones).
        if all(0x20 <= ord(c) < 256 for c in value):
            raw = {HEADER: value.encode("latin-1")}
            r = await client.post(CHAT, json=chat(), headers=raw)  # type: ignore[arg-type]
            await assert_refused(env, r, HEADER)
    # The same text without the character goes through.
    clean = "".join(c for c in TAINTED[3] if c != "\u202e")
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post(CHAT, json=chat(identity={"id": clean, "display_name": clean}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("value", TAINTED)
async def test_identity_api_create_and_update(env: Env, value: str) -> None:
    r = await env.api.post("/v2/identities", json={"external_id": value})
    await assert_refused(env, r, "external_id")
    r = await env.api.post("/v2/identities", json={"external_id": "ok", "display_name": value})
    await assert_refused(env, r, "display_name")
    made = await env.api.post("/v2/identities", json={"external_id": "ok", "display_name": "Ok"})
    assert made.status_code == 201
    r = await env.api.patch("/v2/identities/ok", json={"display_name": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "display_name", r.text
    assert (await env.api.get("/v2/identities/ok")).json() == made.json()


@pytest.mark.parametrize("value", TAINTED)
async def test_hooks(env: Env, value: str) -> None:
    r = await env.api.post("/hooks/authorize", json={"identity": {"id": value}}, headers=HOOK)
    await assert_refused(env, r, "identity.id")
    r = await env.api.post(
        "/hooks/authorize", json={"identity": {"id": "ok", "display_name": value}}, headers=HOOK
    )
    await assert_refused(env, r, "identity.display_name")
    r = await env.api.post("/hooks/authorize", json={}, headers={**HOOK, HEADER: quote(value)})
    await assert_refused(env, r, HEADER)
    report = {"request_id": "r1", "identity": value, "usage": {"prompt_tokens": 1}}
    r = await env.api.post("/hooks/usage", json=report, headers=HOOK)
    await assert_refused(env, r, "identity")


@pytest.mark.parametrize("value", TAINTED[:4])
async def test_dashboard_form(env: Env, value: str) -> None:
    async with httpx.AsyncClient(base_url=env.url, headers=AUTH) as client:
        for field in ("external_id", "display_name"):
            form = {"external_id": "ok", field: value}
            r = await client.post("/ui/identities/new", data=form)
            assert r.status_code == 400, r.text
            assert "control or bidirectional formatting" in r.text
    assert (await env.api.get("/v2/identities")).json()["data"] == []
