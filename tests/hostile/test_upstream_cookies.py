"""The sidecar forwards for every client over one pooled upstream client: a cookie an upstream
sets in its answer to one client (a CDN's or load balancer's, as OpenAI's answers carry, or a
gateway's session) goes back to that client only. It is never kept by the sidecar to go upstream
with another client's request, nor with the same client's next one: the client's own Cookie
header is what the upstream sees. (An aiohttp session keeps cookies by default, from upstreams
named by host; not from an IP address, which is why the test names its upstream `localhost`.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from tests.support.env import MakeEnv
from tests.support.rawupstream import RawUpstream, response

CHAT = "/v1/chat/completions"
ANSWER = msgspec.json.encode(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)


class CookieUpstream(RawUpstream):
    """Sets a cookie naming the identity it was asked for, and notes the Cookie header each
    request came with."""

    def __init__(self) -> None:
        super().__init__()
        self.cookies: list[bytes | None] = []

    def answer_to(self, head: bytes, body: dict[str, Any]) -> bytes:
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        self.cookies.append(headers.get(b"cookie"))
        who = headers.get(b"x-orq-identity-id", b"?")
        return response(
            200,
            b"application/json",
            ANSWER,
            b"set-cookie: __cf_bm=" + who + b"; Path=/; HttpOnly",
            b"set-cookie: session=" + who + b"-secret; Path=/",
        )


@pytest.fixture
async def cookie_upstream() -> AsyncIterator[CookieUpstream]:
    async with CookieUpstream() as upstream:
        yield upstream


async def test_a_cookie_an_upstream_sets_for_one_client_never_reaches_the_upstream_again(
    make_env: MakeEnv, cookie_upstream: CookieUpstream
) -> None:
    # By name, as upstreams are configured (a cookie jar refuses cookies from an IP address).
    env = await make_env(upstream_url=cookie_upstream.url.replace("127.0.0.1", "localhost"))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    for who in ("alice", "bob", "alice"):
        # A fresh client each time: nothing it sends carries a cookie.
        async with httpx.AsyncClient(base_url=env.url) as client:
            r = await client.post(CHAT, json=body, headers={"x-orq-identity-id": who})
        assert r.status_code == 200, r.text
        # The client itself gets what the upstream set for it.
        assert r.headers.get_list("set-cookie") == [
            f"__cf_bm={who}; Path=/; HttpOnly",
            f"session={who}-secret; Path=/",
        ]
    assert cookie_upstream.cookies == [None, None, None], "the sidecar kept a cookie"
    # A client's own Cookie header goes upstream as it sent it, and nothing is added to it.
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post(
            CHAT, json=body, headers={"x-orq-identity-id": "carol", "cookie": "mine=1"}
        )
    assert r.status_code == 200, r.text
    assert cookie_upstream.cookies[-1] == b"mine=1"
