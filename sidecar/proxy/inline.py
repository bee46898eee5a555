from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp
import msgspec
from ulid import ULID

from sidecar import logs
from sidecar.api.errors import ErrorBody, ErrorResponse
from sidecar.identity.model import InvalidField
from sidecar.identity.resolve import MissingIdentity, Resolved, Source, encode_header_id
from sidecar.metrics import Metrics
from sidecar.proxy.attribution import Attribution
from sidecar.quota.limiter import Decision
from sidecar.quota.service import Quota, refusal
from sidecar.settings import Settings
from sidecar.store.errors import STORE_ERRORS
from sidecar.usage.buckets import UNPRICED, increments
from sidecar.usage.extract import StreamUsage, extract_json, prepare_request
from sidecar.usage.model import Kind, Usage, kind_for_path

log = logging.getLogger("sidecar.proxy")

Scope = dict[str, Any]
Receive = Any
Send = Any

# Hop-by-hop headers (RFC 9110 7.6.1) and those the client library sets itself.
_REQUEST_SKIP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    }
)
_RESPONSE_SKIP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "trailer", "transfer-encoding", "upgrade"}
)
_JSON_CAP = 64 * 1024 * 1024  # a JSON response is kept for usage extraction up to this size
_WHOLE = 1024 * 1024  # a response up to this size with a known length is read, then sent whole
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def error_body(status: int, message: str, type: str, code: str, param: str | None = None) -> bytes:
    return _encode(ErrorResponse(ErrorBody(message=message, type=type, code=code, param=param)))


async def send_error(
    send: Send, status: int, message: str, type: str, code: str, param: str | None = None
) -> None:
    body = error_body(status, message, type, code, param)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyTooLarge(Exception):
    pass


class _Meter:
    """What the proxy knows of a metered request while it forwards it."""

    __slots__ = ("decision", "identity", "kind", "model", "refresh", "resolved", "strip")

    def __init__(
        self,
        resolved: Resolved,
        kind: Kind | None,
        identity: str | asyncio.Task[str] | None,
        strip: bool,
        model: str | None,
        decision: Decision | None,
    ) -> None:
        self.decision = decision  # the limit check's, when policies apply
        self.resolved = resolved
        self.kind = kind
        # The _id, the task that upserts and finds it, or None when the store could not say
        # (the usage is counted under the external id when it can).
        self.identity = identity
        self.strip = strip
        self.model = model  # as requested; the response's own name wins when it has one
        self.refresh = False  # the body profile is written once the response is out


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away while sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _refuse_body(send: Send, status: int, message: str, code: str) -> None:
    # The rest of the body is never read: closing the connection spares both sides the
    # upload of what would be thrown away, and a keep-alive client from a half-read request.
    body = error_body(status, message, "invalid_request_error", code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Runtime:
    """What the proxy and the hooks need; filled in by the app's lifespan (sidecar.app)."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession
        self.attribution: Attribution
        self.quota: Quota
        self.metrics: Metrics | None = None  # None: [server] metrics = false
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run in the background; shutdown waits for it."""
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class InlineProxy:
    """Raw ASGI: forwards what the sidecar does not own, attributing the metered calls.

    It is not a Litestar route on purpose: it is on the path of every LLM request, and a
    framework's routing, dependency injection and response classes cost more than the whole
    forwarding step (see README, Benchmarks)."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.runtime = runtime
        self.upstream = (settings.upstream.url or "").rstrip("/")
        self.limit = settings.server.max_body_bytes
        self.body_timeout = settings.server.body_timeout_s
        self.extra_paths = frozenset(settings.metering.extra_paths)
        self.header = settings.identity.header.lower()
        self.header_bytes = self.header.encode()
        self.timeout = aiohttp.ClientTimeout(total=settings.upstream.timeout_s, sock_connect=10)

    def metered(self, method: str, path: str) -> tuple[bool, Kind | None]:
        if method != "POST":
            return False, None
        kind = kind_for_path(path)
        return kind is not None or path in self.extra_paths, kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.upstream:
            await send_error(
                send, 502, "no upstream configured: set [upstream] url", "api_error", "no_upstream"
            )
            return
        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.limit:
                raise BodyTooLarge  # refused before reading a byte of it
            # One bound for the whole body: a client trickling a byte at a time must not hold
            # a request (and its connection) open for as long as it likes.
            async with asyncio.timeout(self.body_timeout):
                body = await read_body(receive, self.limit)
        except BodyTooLarge:
            message = f"request body over {self.limit} bytes"
            await _refuse_body(send, 413, message, "payload_too_large")
            return
        except TimeoutError:
            message = f"request body not received within {self.body_timeout:g} s"
            await _refuse_body(send, 408, message, "request_timeout")
            return
        except ConnectionResetError:
            return
        method: str = scope["method"]
        metered, kind = self.metered(method, scope["path"])
        if not metered:
            await self._forward(scope, send, body, self._headers(scope, None), None)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        payload = _json_object(body, headers.get("content-type", ""))
        try:
            resolved = self.runtime.attribution.resolve(payload, headers)
        except InvalidField as exc:
            await send_error(
                send, 400, exc.message, "invalid_request_error", "invalid_identity", exc.param
            )
            return
        except MissingIdentity:
            await send_error(
                send,
                401,
                "this sidecar requires an identity: send an `identity` "
                f"object, the {self.header} header or a known API key",
                "authentication_error",
                "identity_required",
            )
            return
        strip = False
        if payload is not None:
            strip = kind is not None and prepare_request(kind, payload)
            if strip or resolved.source is Source.BODY:
                body = _encode(payload)  # without the identity object, with stream_options
        attribution = self.runtime.attribution
        # A known identity whose body profile is due to be written again is counted under the
        # _id at hand, and the write waits until the response is out (see _after).
        known, refresh = attribution.cached(resolved)
        decision: Decision | None = None
        identity: str | asyncio.Task[str] | None
        if self.runtime.quota.active:
            request_id = str(ULID())  # also the concurrency lease's name
            logs.bind(resolved.external_id, request_id)
            # Limits are kept under the identity's _id: it must be known before admission.
            identity, decision = await self.runtime.quota.admit_request(
                resolved, known, attribution.identify, request_id
            )
            if not decision.admitted:
                await self._refuse(send, resolved, identity, decision)
                return
        else:
            logs.bind(resolved.external_id)
            # A write, when one is needed, runs while the upstream works.
            identity = known or asyncio.create_task(attribution.identify(resolved))
        requested = payload.get("model") if payload is not None else None
        model = requested if isinstance(requested, str) else None
        meter = _Meter(resolved, kind, identity, strip, model, decision)
        meter.refresh = refresh and known is not None
        await self._forward(scope, send, body, self._headers(scope, resolved), meter)

    async def _refuse(
        self, send: Send, resolved: Resolved, identity_id: str | None, decision: Decision
    ) -> None:
        if decision.store_failed:  # on_error = "deny"
            await send_error(
                send,
                503,
                "the rate limiter cannot reach its store",
                "service_unavailable_error",
                "rate_limiter_unavailable",
            )
            return
        body = _encode(refusal(decision, resolved.external_id))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"retry-after", b"%d" % decision.retry_after),
        ]
        headers += [(k.encode(), v.encode()) for k, v in decision.headers]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        attribution = self.runtime.attribution
        counters = increments(
            source=resolved.source, failed=False, usage=None, cost=None, rate_limited=True
        )
        attribution.add(identity_id, resolved, counters)

    def _headers(self, scope: Scope, resolved: Resolved | None) -> list[tuple[str, str]]:
        out = []
        for name, value in scope["headers"]:
            lower = name.lower()
            if lower in _REQUEST_SKIP or (resolved is not None and lower == self.header_bytes):
                continue
            if resolved is not None and lower == b"accept-encoding":
                continue  # usage is read from the response: ask for it uncompressed
            out.append((name.decode("latin-1"), value.decode("latin-1")))
        if resolved is not None:
            out.append((self.header, encode_header_id(resolved.external_id)))
            out.append(("accept-encoding", "identity"))
        return out

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        body: bytes,
        headers: list[tuple[str, str]],
        meter: _Meter | None,
    ) -> None:
        url = self.upstream + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        status: int | None = None
        usage: Usage | None = None
        header_cost: str | None = None
        complete = False
        started = time.perf_counter()
        try:
            async with self.runtime.session.request(
                scope["method"],
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=self.timeout,
            ) as upstream:
                status = upstream.status
                if self.runtime.metrics is not None:
                    self.runtime.metrics.upstream.observe(time.perf_counter() - started)
                header_cost = upstream.headers.get("x-litellm-response-cost")
                out_headers = [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in upstream.headers.items()
                    if k.lower() not in _RESPONSE_SKIP
                ]
                if meter is not None and meter.decision is not None:
                    out_headers += [(k.encode(), v.encode()) for k, v in meter.decision.headers]
                kind = meter.kind if meter else None
                sse = "text/event-stream" in upstream.headers.get("content-type", "")
                if meter and sse and kind is not None:
                    usage = await self._relay_stream(upstream, send, out_headers, kind, meter.strip)
                elif meter and kind is not None:
                    usage = await self._relay_json(upstream, send, out_headers, kind)
                else:
                    await _relay(upstream, send, out_headers)
                complete = True
        except TimeoutError:
            if status is None:
                await send_error(
                    send,
                    504,
                    "the upstream did not answer in time",
                    "api_error",
                    "upstream_timeout",
                )
        except (aiohttp.ClientError, OSError) as exc:
            if status is None:
                await send_error(
                    send,
                    502,
                    f"the upstream cannot be reached: {type(exc).__name__}",
                    "api_error",
                    "upstream_unreachable",
                )
        finally:
            if meter is not None:
                failed = status is None or status >= 400 or not complete
                try:
                    self._after(meter, failed, usage, header_cost)
                except Exception:
                    log.exception("usage of %s not recorded", meter.resolved.external_id)
        # When headers went out but the body did not finish, returning now makes the server
        # drop the connection, so the client sees the failure.

    async def _relay_stream(
        self,
        upstream: aiohttp.ClientResponse,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        kind: Kind,
        strip: bool,
    ) -> Usage | None:
        headers = [(k, v) for k, v in headers if k != b"content-length"]
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        stream = StreamUsage(kind, strip_usage_chunk=strip)
        # A client that leaves keeps costing: read to the end so the usage is known (the
        # server's send is a no-op once the client is gone).
        async for chunk in upstream.content.iter_any():
            out = stream.feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        await send({"type": "http.response.body", "body": stream.flush(), "more_body": False})
        return stream.finish()

    async def _relay_json(
        self,
        upstream: aiohttp.ClientResponse,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        kind: Kind,
    ) -> Usage | None:
        if upstream.content_length is not None and upstream.content_length <= _WHOLE:
            body = await upstream.read()
            await send(
                {"type": "http.response.start", "status": upstream.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            await send(
                {"type": "http.response.start", "status": upstream.status, "headers": headers}
            )
            chunks: list[bytes] = []
            size = 0
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                size += len(chunk)
                if size <= _JSON_CAP:
                    chunks.append(chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if size > _JSON_CAP:
                return None
            body = b"".join(chunks)
        if upstream.status >= 400:
            return None
        return extract_json(kind, body)

    def _after(
        self, meter: _Meter, failed: bool, usage: Usage | None, header_cost: str | None
    ) -> None:
        attribution = self.runtime.attribution
        resolved = meter.resolved
        model = usage.model if usage is not None and usage.model else meter.model
        cost = attribution.cost(meter.kind, model, usage, header_cost)
        counters = increments(source=resolved.source, failed=failed, usage=usage, cost=cost)
        if UNPRICED in counters and self.runtime.metrics is not None:
            self.runtime.metrics.unpriced(model)
        decision = meter.decision
        if meter.refresh:
            self.runtime.spawn(attribution.refresh(resolved))
        if meter.identity is None:
            attribution.add(None, resolved, counters)
            return
        if isinstance(meter.identity, str):
            charges = {}
            if decision is not None:
                limiter = self.runtime.quota.limiter
                if decision.lease is not None:
                    self.runtime.spawn(limiter.release(meter.identity, decision.lease))
                tokens = usage.total_tokens if usage is not None else 0
                nanos = cost.nanos if cost is not None else 0
                charges = limiter.charges(
                    meter.identity, decision.policy, tokens, nanos, self.runtime.quota.clock()
                )
            attribution.add(meter.identity, resolved, counters, charges)
            return
        self.runtime.spawn(self._record_when_known(meter.identity, resolved, counters))

    async def _record_when_known(
        self, identify: asyncio.Task[str], resolved: Resolved, counters: dict[str, int]
    ) -> None:
        identity_id: str | None
        try:
            identity_id = await identify
        except STORE_ERRORS as exc:
            # Counted under the external id; the identity is written with the usage.
            log.warning("identity %s not written now: %s", resolved.external_id, exc)
            identity_id = None
        self.runtime.attribution.add(identity_id, resolved, counters)


async def _relay(
    upstream: aiohttp.ClientResponse, send: Send, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
    async for chunk in upstream.content.iter_any():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _json_object(body: bytes, content_type: str) -> dict[str, Any] | None:
    if not body or ("json" not in content_type and content_type):
        return None
    try:
        value = _decode(body)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None
