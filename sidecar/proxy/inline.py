"""The inline proxy: forwards what the sidecar does not own, attributing the metered calls.

Raw ASGI, not a Litestar route, on purpose: it is on the path of every LLM request, and a
framework's routing, dependency injection and response classes cost more than the whole
forwarding step (see docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
import unicodedata
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_from_bytes, unquote

import aiohttp
import msgspec
from yarl import URL

from sidecar import logs
from sidecar.asgi import ClientGone, lowered, read_body, send_error, send_json
from sidecar.errors import (
    BadGateway,
    Forbidden,
    GatewayTimeout,
    InvalidRequest,
    SidecarError,
    StoreUnavailable,
)
from sidecar.identity.identify import Identifier
from sidecar.identity.resolve import (
    Resolved,
    Source,
    encode_header_id,
)
from sidecar.jsonbody import parse_object
from sidecar.metering import spans
from sidecar.metering.attribution import Attribution
from sidecar.metering.settle import Meter, Settlement
from sidecar.observe.counters import Counters
from sidecar.observe.tracing import Tracer
from sidecar.proxy._headers import Unrelayable, relayed
from sidecar.proxy.upstream import Upstream
from sidecar.quota.decision import Decision
from sidecar.quota.packing import headers_of
from sidecar.quota.service import Quota, refusal
from sidecar.settings import Settings
from sidecar.usage.estimate import cap_output
from sidecar.usage.extract import StreamUsage, Unread, extract_json, prepare_request
from sidecar.usage.model import Kind, Usage, kind_for_path

if TYPE_CHECKING:
    from litestar.types import HTTPScope, Receive, Send

log = logging.getLogger("sidecar.proxy")

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
# Replaced by the sidecar's own when it traces the request (its span is the parent upstream).
_TRACE_CONTEXT = frozenset({b"traceparent", b"tracestate"})
_RATE = b"x-ratelimit-"  # an upstream's, replaced by a limited identity's own
_JSON_CAP = 64 * 1024 * 1024  # a JSON response is kept for usage extraction up to this size
_WHOLE = 1024 * 1024  # a response up to this size with a known length is read, then sent whole
_UNREAD = 64 * 1024  # an answer up to this size may wait to be read (Unread) with others
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
# What a path and query's bytes may hold as they are (RFC 3986's pchar, "/" and "?"); any other
# byte goes upstream percent-encoded, as the same byte.
_TARGET_SAFE = "/?:@!$&'()*+,;=-._~%"


class InlineProxy:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        attribution: Attribution,
        identifier: Identifier,
        quota: Quota,
        settlement: Settlement,
        counters: Counters | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.upstream = upstream
        self.attribution = attribution
        self.identifier = identifier
        self.quota = quota
        self.settlement = settlement
        self.counters = counters
        self.tracer = tracer
        self.limit = settings.server.max_body_bytes
        self.body_timeout = settings.server.body_timeout_s
        self.extra_paths = tuple(settings.metering.extra_paths)
        self.deny_others = settings.metering.other_paths == "deny"
        self.header = settings.identity.header.lower()
        self.header_bytes = self.header.encode()
        self.cap_output = settings.limits.cap_output

    def metered(self, method: str, path: str) -> tuple[bool, Kind | None]:
        if method != "POST":
            return False, None
        kind = kind_for_path(path)
        if kind is not None:
            return True, kind
        return any(fnmatch.fnmatchcase(path, glob) for glob in self.extra_paths), None

    async def __call__(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        started_ns = time.time_ns() if self.tracer is not None else 0
        if not self.upstream.url:
            error = BadGateway("no upstream configured: set [upstream] url", code="no_upstream")
            await send_error(send, error)
            return
        try:
            body = await read_body(scope, receive, self.limit, self.body_timeout)
        except SidecarError as exc:  # 413 or 408: the rest of the body is never read
            await send_error(send, exc, close=True)
            return
        except ClientGone:
            return
        path = scope["path"]
        if "/." in path and _dot_segments(path):
            message = "a path with a '.' or '..' segment is not forwarded"
            await send_error(send, InvalidRequest(message, code="path_not_normalized"))
            return
        metered, kind = self.metered(scope["method"], path)
        if scope["method"] == "POST" and not _plain(path):
            respelled, respelled_kind = self.metered("POST", _normalized(path))
            if respelled and (not metered or respelled_kind is not kind):
                message = (
                    f"POST {path} is a metered path spelled otherwise (its case, a ';' parameter, "
                    "a backslash, a trailing dot or space, a slash too many, an escape): send it "
                    "as the API names it"
                )
                await send_error(send, InvalidRequest(message, code="path_not_normalized"))
                return
        if not metered:
            if (
                scope["method"] != "POST"
                and _overrides_method(scope)
                and self.metered("POST", _normalized(path))[0]
            ):
                message = (
                    f"{scope['method']} {path} asks for another method in a header; a metered "
                    "path is forwarded only as a POST"
                )
                await send_error(send, InvalidRequest(message, code="method_override_refused"))
                return
            if self.deny_others and scope["method"] == "POST":
                message = f"POST {scope['path']} is not a metered path, and this sidecar "
                await send_error(
                    send,
                    Forbidden(message + "forwards only metered POSTs", code="path_not_metered"),
                )
                return
            await self._forward(scope, send, body, self._headers(scope, None), None)
            return
        try:
            meter, body = await self._admit(scope, send, body, kind, started_ns)
        except SidecarError as exc:
            await send_error(send, exc)
            return
        if meter is not None:
            await self._forward(scope, send, body, self._headers(scope, meter), meter)

    async def _admit(
        self, scope: HTTPScope, send: Send, body: bytes, kind: Kind | None, started_ns: int
    ) -> tuple[Meter | None, bytes]:
        """Resolve and check a metered request; None when it was refused (answered here)."""
        headers = lowered(scope, self.attribution.single_headers)
        payload = parse_object(body)
        client = scope.get("client")
        resolved = self.attribution.resolve(payload, headers, client[0] if client else None)
        strip = kind is not None and prepare_request(kind, payload)
        if strip or resolved.source is Source.BODY:
            body = _encode(payload)  # without the identity object, with stream_options
        requested = payload.get("model")
        model = requested if isinstance(requested, str) else None
        meter = Meter(resolved, kind, None, model, strip=strip)
        if self.tracer is not None:
            name = spans.name(kind, model)
            meter.span = self.tracer.start(name, headers, started_ns, server=True)
        # A known identity is counted under the _id at hand; whether its body profile is due to
        # be written again is asked once the response is out (Meter.refresh).
        known = self.identifier.known_id(resolved)
        decision: Decision | None = None
        try:
            if self.quota.active:
                # Its id is made when the check needs one (a concurrency lease's, reservation's
                # name) or a log line is written: one admitted from allowances needs none.
                context = logs.bind(resolved.external_id)
                reserve = None
                if self.quota.reserving:
                    reserve = self.attribution.reserve(kind, payload, len(body))
                # Limits are kept under the identity's _id: it must be known before admission.
                meter.reserve, meter.admitted_at = reserve, time.monotonic()
                meter.identity, decision = await self.quota.admit(
                    resolved, lambda: context.request_id, known, reserve
                )
                meter.request_id = context.made or ""
                if decision.store_failed and not decision.admitted:  # on_error = "deny"
                    raise StoreUnavailable(
                        "the rate limiter cannot reach its store", code="rate_limiter_unavailable"
                    )
                meter.decision = decision
            else:
                logs.bind(resolved.external_id)
                meter.identity = known or await self._identify_first(resolved)
        except SidecarError as exc:  # the span ends with the error the client gets
            self.settlement.unanswered(meter, exc.status, exc.code)
            raise
        if decision is not None and not decision.admitted:
            await self._refuse(send, meter, decision)
            return None, body
        if (
            self.cap_output
            and decision is not None
            and decision.charged
            and cap_output(kind, payload, self.attribution.default_output_reserve)
        ):
            body = _encode(payload)  # its output now fits what it reserved
        meter.refresh = known is not None
        return meter, body

    async def _identify_first(self, resolved: Resolved) -> str | asyncio.Task[str]:
        """An identity this process does not know yet is found, or created, before the request
        goes out, so that the creation cap can refuse it (IdentityCreationLimited). When the
        store does not answer in time, the write goes on while the upstream works."""
        write = asyncio.ensure_future(self.identifier.identify(resolved))
        try:
            async with self.quota.limiter.deadline():
                return await asyncio.shield(write)
        except (StoreUnavailable, TimeoutError):
            return write

    async def _refuse(self, send: Send, meter: Meter, decision: Decision) -> None:
        headers = [(b"retry-after", b"%d" % decision.retry_after), *headers_of(decision)]
        await send_json(send, 429, _encode(refusal(decision, meter.resolved.external_id)), headers)
        identity_id = meter.identity if isinstance(meter.identity, str) else None
        self.settlement.refused(identity_id, meter.resolved, decision, meter)

    def _headers(self, scope: HTTPScope, meter: Meter | None) -> list[tuple[str, str]]:
        resolved = meter.resolved if meter is not None else None
        span = meter.span if meter is not None else None
        out = []
        for name, value in scope["headers"]:
            lower = name.lower()
            if lower in _REQUEST_SKIP or (resolved is not None and lower == self.header_bytes):
                continue
            if resolved is not None and lower == b"accept-encoding":
                continue  # usage is read from the response: ask for it uncompressed
            if span is not None and lower in _TRACE_CONTEXT:
                continue
            out.append((name.decode("latin-1"), value.decode("latin-1")))
        if resolved is not None:
            out.append((self.header, encode_header_id(resolved.external_id)))
            out.append(("accept-encoding", "identity"))
        if span is not None:
            out += span.propagation()
        return out

    async def _forward(
        self,
        scope: HTTPScope,
        send: Send,
        body: bytes,
        headers: list[tuple[str, str]],
        meter: Meter | None,
    ) -> None:
        url = URL(self.upstream.url + upstream_target(scope), encoded=True)
        status: int | None = None
        usage: Usage | Unread | None = None
        header_cost: str | None = None
        complete = False
        failure: SidecarError | None = None  # the sidecar's own answer, when it gave one
        started = time.perf_counter()
        data: bytes | aiohttp.payload.Payload | None = body or None
        decision = meter.decision if meter is not None else None
        if body and decision is not None and decision.rows is not None:
            data = _ThenHeaders(body, decision)
        try:
            async with self.upstream.session.request(
                scope["method"],
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=self.upstream.timeout,
            ) as upstream:
                status = upstream.status
                if meter is not None:
                    meter.upstream_status = status
                if self.counters is not None:
                    self.counters.upstream.observe(time.perf_counter() - started)
                header_cost = upstream.headers.get("x-litellm-response-cost")
                kind = meter.kind if meter else None
                sse = "text/event-stream" in upstream.headers.get("content-type", "")
                try:
                    out_headers = relayed(upstream.raw_headers)
                except Unrelayable as exc:
                    log.warning("upstream answer not relayed: %s", exc)
                    message = f"the upstream's answer cannot be relayed: {exc}"
                    failure = BadGateway(message, code="bad_upstream_response")
                    await send_error(send, failure)
                    usage = await _unrelayed_usage(upstream, kind, sse)
                    return
                if meter is not None and meter.decision is not None:
                    ours = headers_of(meter.decision)
                    if ours:
                        # A limited identity's x-ratelimit-* headers are its limits': the
                        # upstream's (an OpenAI organisation's) would come twice under one
                        # name, with another meaning.
                        out_headers = [h for h in out_headers if not h[0].startswith(_RATE)]
                        out_headers += ours
                if meter and kind is not None:
                    settle: Settle | None = None
                    if meter.charged:  # its token and cost limits are charged before its end

                        async def settle(usage: Usage | None, meter: Meter = meter) -> None:
                            await self.settlement.settle(meter, usage, header_cost)

                    relay = _relay_stream if sse else _relay_json
                    usage = await relay(upstream, send, out_headers, kind, meter.strip, settle)
                else:
                    await _relay(upstream, send, out_headers)
                complete = True
        except TimeoutError:
            if status is None:
                failure = GatewayTimeout("the upstream did not answer in time")
                await send_error(send, failure)
        except aiohttp.ClientResponseError:
            if status is None:  # what it sent is not an HTTP answer (its head, typically)
                message = "the upstream's answer is not valid HTTP"
                failure = BadGateway(message, code="bad_upstream_response")
                await send_error(send, failure)
        except (aiohttp.ClientError, OSError) as exc:
            if status is None:
                message = f"the upstream cannot be reached: {type(exc).__name__}"
                failure = BadGateway(message, code="upstream_unreachable")
                await send_error(send, failure)
        finally:
            if meter is not None:
                failed = status is None or status >= 400 or not complete
                # For its span: what the client got, and why it failed when not by the status.
                reason = failure.code if failure is not None else None
                if not complete and status is not None and failure is None:
                    reason = "response_incomplete"  # the upstream or the client left midway
                sent = failure.status if failure is not None else status
                try:
                    self.settlement.answered(
                        meter, failed, usage, header_cost, status=sent, error=reason
                    )
                except Exception:
                    log.exception("usage of %s not recorded", meter.resolved.external_id)
        # When headers went out but the body did not finish, returning now makes the server
        # drop the connection, so the client sees the failure.


Settle = Callable[[Usage | None], Awaitable[None]]


class _ThenHeaders(aiohttp.payload.BytesPayload):
    """A request body whose decision's x-ratelimit-* headers are worked out once it is written:
    while the upstream works, in the task aiohttp writes it from, rather than before the
    request leaves."""

    def __init__(self, body: bytes, decision: Decision) -> None:
        super().__init__(body)
        self.decision = decision

    async def write_with_length(
        self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None
    ) -> None:
        await super().write_with_length(writer, content_length)
        try:
            headers_of(self.decision)
        except Exception:
            # Not as an upstream that cannot be written to: tried again when the answer comes.
            log.exception("x-ratelimit-* headers not worked out")


def upstream_target(scope: HTTPScope) -> str:
    """The path and query as the client sent them, byte for byte (a URL given to yarl as text
    would have its dot segments removed and escapes decoded); a byte that is not ASCII, which
    httptools refuses but another server might pass, goes percent-encoded."""
    target = (scope.get("raw_path") or scope["path"].encode()) + (
        b"?" + scope["query_string"] if scope.get("query_string") else b""
    )
    if not target.isascii():
        target = quote_from_bytes(target, safe=_TARGET_SAFE).encode()
    return target.decode("ascii")


# Headers some servers and gateways honour as the request's method: a GET to a metered path with
# one that says POST would be an LLM call the sidecar neither metered nor limited.
_METHOD_OVERRIDES = frozenset({b"x-http-method-override", b"x-http-method", b"x-method-override"})


def _overrides_method(scope: HTTPScope) -> bool:
    return any(name in _METHOD_OVERRIDES for name, _ in scope["headers"])


def _plain(path: str) -> bool:
    """Whether a lenient server reads the path as sent (`_normalized` would not change it): the
    common case, told in a few scans."""
    return (
        path.isascii()
        and path.islower()
        and ";" not in path
        and "\\" not in path
        and "./" not in path
        and " /" not in path
        and "//" not in path
        and "%" not in path
        and "?" not in path
        and "#" not in path
        and path.isprintable()
        and not path.endswith((".", " "))
    )


def _normalized(path: str) -> str:
    """The path as a lenient server may read it: percent-decoded once more (the server decodes
    what the sidecar decoded already: `%252F` is a slash there), in Unicode's compatibility
    form (fullwidth letters as ASCII ones), case folded (U+017F, a long s, as `s`: .NET's
    case-insensitive matching reads it so), backslashes as slashes, each segment without its
    `;` parameters and trailing dots, spaces and control characters, cut at a `?` or `#` that
    came encoded, and empty segments dropped (nginx merges
    slashes). A POST whose path is not metered as sent but is once so read is refused
    (`/v1/Chat/Completions`, `/v1/chat/completions;x`, `/v1/chat//completions`), and so is one
    metered as another kind (`/v1/chat;x/completions` is a completion as sent, a chat
    completion so read): an upstream that read it so would serve a call nobody metered, or
    metered as what it is not."""
    decoded = unquote(path) if "%" in path else path
    # A `?` or `#` that arrived encoded ends the path for a server that decodes before it splits.
    decoded = decoded.split("?", 1)[0].split("#", 1)[0]
    folded = unicodedata.normalize("NFKC", decoded).casefold().replace("\\", "/")
    segments = (_trimmed(segment.split(";", 1)[0]) for segment in folded.split("/"))
    return "/" + "/".join(segment for segment in segments if segment)


def _trimmed(segment: str) -> str:
    """The segment without what lenient servers trim from its end: dots, and whitespace and
    other characters that print nothing (a tab, `%09`; a C1 control, U+0085; a line or
    paragraph separator, U+2028): Go's strings.TrimSpace, .NET's Trim and Python's strip
    take most of them."""
    end = len(segment)
    while end and (
        segment[end - 1] == "." or not segment[end - 1].isprintable() or segment[end - 1].isspace()
    ):
        end -= 1
    return segment[:end]


def _dot_segments(path: str) -> bool:
    """Whether the (percent-decoded) path has a '.' or '..' segment: what the sidecar meters
    is the path as sent, and an upstream that resolved such a segment would act on another
    (`/v1/chat/completions/x/..` is not metered, and becomes `/v1/chat/completions/` there)."""
    return any(segment in (".", "..") for segment in path.split("/"))


async def _relay_stream(
    upstream: aiohttp.ClientResponse,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    kind: Kind,
    strip: bool,
    settle: Settle | None,
) -> Usage | None:
    """An SSE answer, chunk by chunk; its usage is settled (`settle`, when given) before the
    last bytes go out."""
    headers = [(k, v) for k, v in headers if k != b"content-length"]
    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
    stream = StreamUsage(kind, strip_usage_chunk=strip)
    # A client that leaves keeps costing: read to the end so the usage is known (the server's
    # send is a no-op once the client is gone).
    async for chunk in upstream.content.iter_any():
        if stream.passes(chunk):  # sent, then read: the client need not wait for the reading
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            stream.feed(chunk)
            continue
        out = stream.feed(chunk)
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
    last = stream.flush()
    usage = stream.finish()
    if settle is not None:
        await settle(usage)
    await send({"type": "http.response.body", "body": last, "more_body": False})
    return usage


async def _relay_json(
    upstream: aiohttp.ClientResponse,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    kind: Kind,
    strip: bool,
    settle: Settle | None,
) -> Usage | Unread | None:
    """A JSON answer; its usage is settled (`settle`, when given) before the client has all
    of it. Without a settlement the usage is read once the client has the answer."""
    start: Any = {"type": "http.response.start", "status": upstream.status, "headers": headers}
    if upstream.content_length is not None and upstream.content_length <= _WHOLE:
        body = await upstream.read()
        if settle is None:
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            if upstream.status >= 400:
                return None
            # Read with the usage of other requests (Settlement.answered), when small.
            return Unread(kind, body) if len(body) <= _UNREAD else extract_json(kind, body)
        # The head goes out first: the client reads it while the usage is settled, and has
        # the whole answer only once it is.
        await send(start)
        usage = extract_json(kind, body) if upstream.status < 400 else None
        await settle(usage)
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return usage
    await send(start)
    chunks: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_any():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        size += len(chunk)
        if size <= _JSON_CAP:
            chunks.append(chunk)
    usage = None
    if size <= _JSON_CAP and upstream.status < 400:
        usage = extract_json(kind, b"".join(chunks))
    if settle is not None:
        await settle(usage)
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return usage


async def _unrelayed_usage(
    upstream: aiohttp.ClientResponse, kind: Kind | None, sse: bool
) -> Usage | None:
    """What an answer the client was not given used: the upstream did the work (and bills it),
    so it counts as a client that left would."""
    if kind is None:
        return None
    if sse:
        stream = StreamUsage(kind)
        async for chunk in upstream.content.iter_any():
            stream.feed(chunk)
        stream.flush()
        return stream.finish()
    body = bytearray()
    async for chunk in upstream.content.iter_any():
        if len(body) <= _JSON_CAP:
            body += chunk
    if upstream.status >= 400 or len(body) > _JSON_CAP:
        return None
    return extract_json(kind, bytes(body))


async def _relay(
    upstream: aiohttp.ClientResponse, send: Send, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
    async for chunk in upstream.content.iter_any():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
