from __future__ import annotations

import argparse

import aiohttp
import pytest
from yarl import URL

from bench.bare_proxy import UPSTREAM_ENV, BareProxy, from_env, request_headers, response_headers
from bench.lib import payloads
from sidecar.mock import start_mock
from sidecar.testing.redis_server import free_port
from sidecar.testing.serving import serve


def test_bare_proxy_header_filters() -> None:
    sent = [
        (b"content-type", b"application/json"),
        (b"Connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"trailer", b"x"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"host", b"example.com"),
        (b"content-length", b"12"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"proxy-connection", b"keep-alive"),
        (b"X-Custom", b"kept"),
    ]
    assert request_headers(sent) == [("content-type", "application/json"), ("X-Custom", "kept")]
    answered = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"12"),
        (b"Connection", b"close"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"X-Request-Id", b"abc"),
    ]
    assert response_headers(answered) == [
        (b"content-type", b"application/json"),
        (b"content-length", b"12"),
        (b"x-request-id", b"abc"),
    ]


@pytest.mark.timeout(30)
async def test_bare_proxy_forwards_json_streams_and_errors() -> None:
    mock = await start_mock()
    chat = payloads.chat_body(0)
    try:
        async with serve(BareProxy(mock.url)) as url, aiohttp.ClientSession() as client:
            headers = payloads.base_headers() | {
                "Proxy-Authorization": "Basic eA==",
                "TE": "trailers",
                "X-Custom": "kept",
            }
            # Sent as is (no re-quoting on this side): the proxy must not re-quote either.
            raw = URL(url + payloads.CHAT_PATH + "?a=1&b=%2F", encoded=True)
            async with client.post(raw, data=chat, headers=headers) as response:
                assert response.status == 200
                body = await response.read()
                assert response.headers["Content-Length"] == str(len(body))
                assert isinstance((await response.json())["usage"], dict)
            paced = payloads.base_headers() | {"x-mock-chunks": "3", "x-mock-chunk-delay-ms": "1"}
            async with client.post(
                url + payloads.CHAT_PATH, data=payloads.chat_body(1, stream=True), headers=paced
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                assert "Content-Length" not in response.headers
                assert (await response.read()).rstrip().endswith(b"data: [DONE]")
            async with client.post(url + "/v1/no-such-route", data=chat) as response:
                assert response.status == 404
        nowhere = BareProxy(f"http://127.0.0.1:{free_port()}")
        async with (
            serve(nowhere) as url,
            aiohttp.ClientSession() as client,
            client.get(url + "/v1/models") as gone,
        ):
            assert gone.status == 502
    finally:
        await mock.close()
    first = mock.requests[0]
    assert (first.method, first.path, first.query) == ("POST", payloads.CHAT_PATH, "a=1&b=%2F")
    assert first.body == chat
    assert first.header("x-custom") == "kept"
    assert first.header("authorization") == f"Bearer {payloads.API_KEY}"
    assert first.header("host") == f"127.0.0.1:{mock.port}"
    assert first.header("proxy-authorization") is None and first.header("te") is None
    assert len(mock.requests) == 3


def test_the_app_for_another_server_takes_its_upstream_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(UPSTREAM_ENV, "http://127.0.0.1:4000/")
    assert from_env().upstream == "http://127.0.0.1:4000"
    monkeypatch.setenv(UPSTREAM_ENV, "127.0.0.1:4000")
    with pytest.raises(argparse.ArgumentTypeError):
        from_env()
