"""An upstream answer whose head the sidecar cannot relay (a control character in a header value,
a header name that is not a token, a line that is not HTTP) is a 502 with the JSON error shape,
streaming or not, never a 500 or a cut connection; what the upstream produced is still counted.
A header value with bytes beyond ASCII (UTF-8 or not) is relayed byte for byte. A limited
identity's `x-ratelimit-*` headers are its own, the upstream's of that kind dropped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from sidecar.proxy import _headers
from tests.support.env import Env, MakeEnv
from tests.support.limits import policy_file
from tests.support.rawupstream import RawUpstream, response

CHAT = "/v1/chat/completions"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
JSON_BODY = msgspec.json.encode(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": USAGE,
    }
)
_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o"}
SSE_BODY = (
    b"".join(
        b"data: " + msgspec.json.encode(event) + b"\n\n"
        for event in (
            {**_CHUNK, "choices": [{"index": 0, "delta": {"content": "hi"}}]},
            {**_CHUNK, "choices": [], "usage": USAGE},
        )
    )
    + b"data: [DONE]\n\n"
)

# Header lines aiohttp reads but the HTTP server could not write to the client.
UNRELAYABLE = {
    "soh in a value": b"x-upstream: a\x01b",
    "esc in a value": b"x-upstream: \x1b[31mred",
    "del in a value": b"x-upstream: a\x7fb",
}
# Header lines that are not HTTP at all (the upstream's head does not parse).
MALFORMED = {
    "bare cr in a value": b"x-upstream: a\rb",
    "nul in a value": b"x-upstream: a\x00b",
    "space in a name": b"x upstream: 1",
    "separator in a name": b"x(upstream): 1",
    "utf-8 in a name": b"x-\xc3\xa9: 1",
}
# Header values beyond ASCII: relayed as the upstream sent them.
RELAYED = {
    "utf-8": b"caf\xc3\xa9",
    "not utf-8": b"\xff\xfe",
    "c1 as utf-8": b"a\xc2\x85b",
}


class HeaderUpstream(RawUpstream):
    """Answers every request with the header line it is given, as JSON or SSE as asked."""

    def __init__(self) -> None:
        super().__init__()
        self.header = b"x-upstream: fine"

    def answer(self, body: dict[str, Any]) -> bytes:
        if body.get("stream") is True:
            return response(200, b"text/event-stream", SSE_BODY, self.header)
        return response(200, b"application/json", JSON_BODY, self.header)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[HeaderUpstream]:
    async with HeaderUpstream() as upstream:
        yield upstream


def chat(who: str, stream: bool) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "identity": {"id": who},
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def ask(env: Env, who: str, stream: bool) -> httpx.Response:
    async with httpx.AsyncClient(base_url=env.url) as client:
        return await client.post(CHAT, json=chat(who, stream))


def assert_bad_gateway(r: httpx.Response) -> None:
    assert r.status_code == 502, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("api_error", "bad_upstream_response"), error
    assert "x-upstream" not in r.headers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("case", list(UNRELAYABLE))
async def test_a_header_the_server_cannot_write_is_a_502_and_the_usage_counts(
    make_env: MakeEnv, raw_upstream: HeaderUpstream, case: str, stream: bool
) -> None:
    env = await make_env(upstream_url=raw_upstream.url)
    raw_upstream.header = UNRELAYABLE[case]
    r = await ask(env, "victim", stream)
    assert_bad_gateway(r)
    assert "x-upstream" in r.json()["error"]["message"]  # the header's name, never its value
    # The upstream did the work: its usage counts, as an error.
    metrics = await env.metrics("victim")
    assert (metrics["total_requests"], metrics["error_rate"]) == (1, 1.0)
    assert (metrics["input_tokens"], metrics["output_tokens"]) == (11, 7)
    # The sidecar goes on serving.
    raw_upstream.header = b"x-upstream: fine"
    again = await ask(env, "victim", stream)
    assert again.status_code == 200 and again.headers["x-upstream"] == "fine"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_head_that_is_not_http_is_a_502(
    make_env: MakeEnv, raw_upstream: HeaderUpstream, case: str, stream: bool
) -> None:
    env = await make_env(upstream_url=raw_upstream.url)
    raw_upstream.header = MALFORMED[case]
    r = await ask(env, "victim", stream)
    assert_bad_gateway(r)
    assert raw_upstream.requests == 1
    metrics = await env.metrics("victim")
    assert (metrics["total_requests"], metrics["error_rate"]) == (1, 1.0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("case", list(RELAYED))
async def test_header_bytes_beyond_ascii_are_relayed_as_sent(
    make_env: MakeEnv, raw_upstream: HeaderUpstream, case: str, stream: bool
) -> None:
    env = await make_env(upstream_url=raw_upstream.url)
    raw_upstream.header = b"x-upstream: " + RELAYED[case]
    r = await ask(env, "fine", stream)
    assert r.status_code == 200, r.text
    assert dict(r.headers.raw)[b"x-upstream"] == RELAYED[case]
    metrics = await env.metrics("fine")
    assert (metrics["total_requests"], metrics["error_rate"]) == (1, 0.0)
    assert metrics["input_tokens"] == 11


@pytest.mark.parametrize(
    "header", [UNRELAYABLE["soh in a value"], MALFORMED["nul in a value"]], ids=["soh", "nul"]
)
async def test_an_unmetered_answer_is_a_502_too(
    make_env: MakeEnv, raw_upstream: HeaderUpstream, header: bytes
) -> None:
    env = await make_env(upstream_url=raw_upstream.url)
    raw_upstream.header = header
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.get("/v1/models")
    assert_bad_gateway(r)


def test_names_checked_once_are_not_a_way_around_the_checks() -> None:
    _headers._VALID_NAMES.clear()
    ok = [(b"Content-Type", b"application/json"), (b"X-Trace", b"a\tb \xc3\xa9")]
    assert _headers.relayed(ok) == [(b"content-type", b"application/json"), (b"x-trace", ok[1][1])]
    assert _headers.relayed(ok) == _headers.relayed(ok)  # names known now: same answer
    with pytest.raises(_headers.Unrelayable, match="x-trace"):
        _headers.relayed([(b"Content-Type", b"text/plain"), (b"X-Trace", b"a\x01b")])
    with pytest.raises(_headers.Unrelayable, match="valid token"):
        _headers.relayed([(b"Content-Type", b"text/plain"), (b"Bad Name", b"x")])
    assert _headers.relayed([(b"Connection", b"\x01 hop-by-hop: never relayed")]) == []
    for n in range(_headers._VALID_NAMES_MAX + 1):
        _headers.relayed([(b"x-%d" % n, b"v")])
    assert len(_headers._VALID_NAMES) <= _headers._VALID_NAMES_MAX


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_answer_carries_one_date_and_one_server_header(
    make_env: MakeEnv, raw_upstream: HeaderUpstream, stream: bool
) -> None:
    """The sidecar's HTTP server writes its own Date and Server: the upstream's would make two
    of each (Date is a single-valued field)."""
    env = await make_env(upstream_url=raw_upstream.url)
    raw_upstream.header = (
        b"date: Mon, 01 Jan 2024 00:00:00 GMT\r\nserver: upstream-1\r\nx-upstream: fine"
    )
    r = await ask(env, "dated", stream)
    assert r.status_code == 200 and r.headers["x-upstream"] == "fine"
    assert len(r.headers.get_list("date")) == 1
    assert "2024" not in r.headers["date"]
    assert len(r.headers.get_list("server")) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_limited_identitys_rate_headers_are_its_own_and_an_unlimited_ones_the_upstreams(
    make_env: MakeEnv, raw_upstream: HeaderUpstream, tmp_path: Path, stream: bool
) -> None:
    # An OpenAI organisation's headers, as its answers carry them.
    raw_upstream.header = (
        b"x-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-requests: 9999\r\n"
        b"x-ratelimit-limit-tokens: 2000000"
    )
    text = '[[policy]]\nname = "p"\nmatch = { ids = ["limited-*"] }\nrequests = ["5/minute"]\n'
    env = await make_env(upstream_url=raw_upstream.url, **policy_file(tmp_path, text))
    r = await ask(env, "limited-1", stream)
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-ratelimit-limit-requests") == ["5"]
    assert r.headers.get_list("x-ratelimit-remaining-requests") == ["4"]
    assert "x-ratelimit-limit-tokens" not in r.headers  # the organisation's, not this identity's
    r = await ask(env, "free-1", stream)
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-ratelimit-limit-requests") == ["10000"]
    assert r.headers.get_list("x-ratelimit-limit-tokens") == ["2000000"]
