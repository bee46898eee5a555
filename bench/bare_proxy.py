"""The floor for any Python proxy on this machine: a raw ASGI pass-through on the sidecar's stack.

    .venv/bin/python -m bench.bare_proxy --port 8001 --upstream http://127.0.0.1:8000

No framework, no attribution, no Redis. The request body is read; method, path, query, headers
(hop-by-hop ones dropped) and body go to the upstream over one pooled `aiohttp.ClientSession`;
status, headers (hop-by-hop ones dropped) and body come back. A `text/event-stream` answer is
relayed chunk by chunk as it arrives, an answer with a known length up to 1 MiB (the JSON ones)
is read whole and sent in one piece, anything else is relayed chunk by chunk.

Served by uvicorn the way `sidecar serve` serves the sidecar (uvloop, httptools, no access log,
no proxy headers), so that bench/proxy_bench.py can set the sidecar's added latency against what
this stack costs with nothing in it (the `bare` target).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import aiohttp
from yarl import URL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Hop-by-hop headers (RFC 9110 7.6.1), plus proxy-* (below); host and content-length are set
# again by the client library for the upstream request.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
REQUEST_SKIP = _HOP_BY_HOP | {b"host", b"content-length"}
RESPONSE_SKIP = _HOP_BY_HOP
WHOLE = 1024 * 1024  # an answer up to this size with a known length is read, then sent whole
TIMEOUT_S = 600.0
UPSTREAM_ENV = "BARE_PROXY_UPSTREAM"  # `from_env`'s upstream


def _kept(
    raw: Iterable[tuple[bytes, bytes]], skip: frozenset[bytes]
) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(lower-cased name, name, value) of every header not in `skip` nor proxy-*."""
    for name, value in raw:
        lower = name.lower()
        if lower not in skip and not lower.startswith(b"proxy-"):
            yield lower, name, value


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The client's headers for the upstream, hop-by-hop ones dropped."""
    return [(n.decode("latin-1"), v.decode("latin-1")) for _, n, v in _kept(raw, REQUEST_SKIP)]


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers for the client (lower-cased names), hop-by-hop ones dropped."""
    return [(lower, v) for lower, _, v in _kept(raw, RESPONSE_SKIP)]


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client left first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_error(send: Send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BareProxy:
    """The ASGI app: one upstream, one pooled session, opened and closed by the lifespan."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None
        self.timeout = aiohttp.ClientTimeout(total=TIMEOUT_S, sock_connect=10)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # As the sidecar's session: no decompression, no headers the client did not send.
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(
                        limit=1024, ttl_dns_cache=300, keepalive_timeout=30
                    ),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                    cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no one's cookies
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        if session is None:
            await send_error(send, 503, "not started")
            return
        body = await read_body(receive)
        if body is None:
            return
        url = self.upstream + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        started = False
        try:
            async with session.request(
                scope["method"],
                URL(url, encoded=True),
                headers=request_headers(scope["headers"]),
                data=body or None,
                allow_redirects=False,
                timeout=self.timeout,
            ) as upstream:
                headers = response_headers(upstream.raw_headers)
                start: Message = {"type": "http.response.start", "status": upstream.status}
                length = upstream.content_length
                if "text/event-stream" in upstream.headers.get("content-type", ""):
                    start["headers"] = [h for h in headers if h[0] != b"content-length"]
                elif length is not None and length <= WHOLE:
                    data = await upstream.read()
                    start["headers"] = headers
                    await send(start)
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                    return
                else:
                    start["headers"] = headers
                await send(start)
                started = True
                async for chunk in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            if not started:
                await send_error(send, 504, "the upstream did not answer in time")
        except (aiohttp.ClientError, OSError) as exc:
            if not started:
                await send_error(send, 502, f"the upstream failed: {type(exc).__name__}")
        # Headers sent, body cut short: returning makes the server drop the connection.


def _upstream(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError("expects http://host:port or https://host:port")
    return text


def from_env() -> BareProxy:
    """The app for another ASGI server (bench/server_bench.py serves it with granian too)."""
    return BareProxy(_upstream(os.environ[UPSTREAM_ENV]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bare_proxy", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--upstream", type=_upstream, required=True, help="base URL to forward to")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    import uvicorn

    print(
        f"bare proxy listening on http://{args.host}:{args.port}, upstream {args.upstream}",
        flush=True,
    )
    uvicorn.run(
        BareProxy(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        proxy_headers=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
