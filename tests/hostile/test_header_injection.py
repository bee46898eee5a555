"""Identity ids cannot smuggle headers upstream: an id with CR, LF, NUL or another control (C0
or C1) or bidirectional formatting character is a 400 (nothing forwarded, nothing written), and
any other id travels in exactly one identity header, percent-encoded when it is not printable
ASCII."""

from __future__ import annotations

from urllib.parse import unquote

import httpx
import pytest

from sidecar.mock import RecordedRequest
from tests.support.env import Env, MakeEnv
from tests.support.rawhttp import RawConnection

HEADER = "x-orq-identity-id"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

REFUSED = [
    "u\r\nX-Evil: 1",
    "u\nX-Evil: 1",
    "u\rX-Evil: 1",
    "u\0X-Evil: 1",
    "\r\nX-Evil: 1\r\n\r\nGET /admin HTTP/1.1",
    "ü\r\nX-Evil: 1",
    "u\x7fX-Evil: 1",
    "u\x1b[31m",
    "u\tX-Evil: 1",
    "u\u0085X-Evil: 1",  # NEL (C1): a line end to some parsers
    "u\x9b31m",  # CSI (C1)
    "\u202egnp.exe",  # right-to-left override: shown as "exe.png"
    "u\u2066x\u2069",
    "a\u200fb",
    "a\u061cb",
]
# Not printable ASCII but no control or bidirectional formatting character either: forwarded,
# percent-encoded.
ENCODED = {
    "José 日本": "Jos%C3%A9 %E6%97%A5%E6%9C%AC",
    "100%": "100%25",
    "u\u2028X-Evil: 1": "u%E2%80%A8X-Evil: 1",
    "u\u00a0X-Evil: 1": "u%C2%A0X-Evil: 1",
    "😀\ufeff": "%F0%9F%98%80%EF%BB%BF",
}


def forwarded_identity(request: RecordedRequest) -> str:
    """The one identity header of a forwarded request, checking that no header was injected."""
    names = [name for name, _ in request.headers]
    assert names.count(HEADER) == 1, request.headers
    assert "x-evil" not in names, request.headers
    assert all(value.isascii() and value.isprintable() for _, value in request.headers)
    value = request.header(HEADER)
    assert value is not None
    return value


async def assert_refused(env: Env, r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_identity",
        param,
    )
    await env.settle()
    assert not env.mock.requests
    listed = await env.api.get("/v2/identities")
    assert listed.json()["data"] == []


@pytest.mark.parametrize("where", ["identity", "contact"])
async def test_body_ids_with_control_characters_are_refused(make_env: MakeEnv, where: str) -> None:
    env = await make_env()
    async with httpx.AsyncClient(base_url=env.url) as client:
        for evil in REFUSED:
            r = await client.post(
                CHAT, json={"model": "gpt-4o", "messages": MESSAGES, where: {"id": evil}}
            )
            await assert_refused(env, r, f"{where}.id")


async def test_body_ids_outside_printable_ascii_travel_percent_encoded(make_env: MakeEnv) -> None:
    env = await make_env()
    async with httpx.AsyncClient(base_url=env.url) as client:
        for external_id, encoded in ENCODED.items():
            env.mock.requests.clear()
            r = await client.post(
                CHAT,
                json={"model": "gpt-4o", "messages": MESSAGES, "identity": {"id": external_id}},
                # A client's own identity header is replaced, never sent alongside.
                headers={HEADER: "someone-else"},
            )
            assert r.status_code == 200, r.text
            (request,) = env.mock.requests
            assert forwarded_identity(request) == encoded
            assert unquote(encoded, errors="strict") == external_id
            assert "identity" not in request.json()
            await env.settle()  # the identity is written beside the upstream call
            found = await env.api.get("/v2/identities", params={"search": external_id})
            assert [i["external_id"] for i in found.json()["data"]] == [external_id]


async def test_header_ids_that_decode_to_control_characters_are_refused(
    make_env: MakeEnv,
) -> None:
    env = await make_env()
    async with httpx.AsyncClient(base_url=env.url) as client:
        for value in [
            "u%0D%0AX-Evil:%201",
            "u%0AX-Evil",
            "u%00",
            "%0D%0A",
            "u%1B",
            "%FF",
            "u%C2%85x",
            "%E2%80%AEx",
        ]:
            r = await client.post(
                CHAT, json={"model": "gpt-4o", "messages": MESSAGES}, headers={HEADER: value}
            )
            await assert_refused(env, r, "X-ORQ-IDENTITY-ID")


@pytest.mark.parametrize(
    ("raw", "external_id"),
    [
        (b"caf\xc3\xa9", "caf\u00c3\u00a9"),  # header bytes are Latin-1 (RFC 9110 5.5)
        (b"\xff\xfe", "\u00ff\u00fe"),
        (b"a\x80b", "a\x80b"),
    ],
)
async def test_raw_header_bytes_never_reach_upstream_unencoded(
    make_env: MakeEnv, raw: bytes, external_id: str
) -> None:
    env = await make_env()
    body = b'{"model": "gpt-4o", "messages": []}'
    conn = await RawConnection.open(env.url)
    try:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: sidecar\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n%s: %s\r\n\r\n"
            % (len(body), HEADER.encode(), raw)
        )
        assert await conn.send(head + body)
        answer = await conn.answer(within=5)
    finally:
        await conn.close()
    if answer.status == 400:  # refused as a control character (C1): also safe
        assert answer.json()["error"]["code"] == "invalid_identity"
        await env.settle()
        assert not env.mock.requests
        return
    assert answer.status == 200, answer
    (request,) = env.mock.requests
    assert unquote(forwarded_identity(request), errors="strict") == external_id
