from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, NamedTuple

import msgspec
from litestar import Controller, Request, Response, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED
from ulid import ULID

from sidecar import logs
from sidecar.api.auth import token_matches
from sidecar.errors import (
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    SidecarError,
    StoreUnavailable,
    Unauthorized,
)
from sidecar.identity import model
from sidecar.identity.model import InvalidField
from sidecar.identity.resolve import MissingIdentity, Resolved, Source, encode_header_id
from sidecar.proxy.attribution import Attribution
from sidecar.proxy.inline import (
    BodyTooLarge,
    Receive,
    Runtime,
    Scope,
    Send,
    error_body,
    read_body,
)
from sidecar.quota.limiter import Decision
from sidecar.quota.service import RateLimitError, refusal
from sidecar.settings import Settings
from sidecar.store.errors import STORE_ERRORS, STORE_OR_TIMEOUT
from sidecar.usage import buckets
from sidecar.usage.buckets import increments
from sidecar.usage.extract import usage_from_mapping
from sidecar.usage.model import Kind, Usage, kind_for_path, nanos_from_usd

log = logging.getLogger("sidecar.hooks")

REPORT_TIMEOUT_S = 1.0
# Unix time in milliseconds after which the caller no longer waits for /hooks/authorize (it has
# let the request through, or refused it): a decision it would not see must count nothing.
DEADLINE_HEADER = "x-sidecar-deadline"
MAX_HOOK_BODY = 2 * 1_048_576  # as the other routes (Litestar's request_max_body_size)

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class DeadlineExceeded(SidecarError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class HookIdentity(msgspec.Struct):
    external_id: str
    source: str


class Authorization(msgspec.Struct):
    request_id: str
    identity: HookIdentity
    policy: str | None = None


class UsageReport(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    request_id: str
    identity: str
    model: str | None = None
    status: int = 200
    usage: dict[str, Any] | None = None
    cost_usd: float | str | None = None
    source: Literal["body", "header", "api_key", "anonymous"] | None = None
    path: str | None = None  # the original request's path, to tell the usage shape apart


class Accepted(msgspec.Struct):
    request_id: str
    counted: bool
    duplicate: bool
    spooled: bool = False  # the store did not answer: kept, and counted once it does


async def hook_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    # The hooks' Authorization header is the original client's; they authenticate apart.
    settings = connection.app.state.settings
    expected = settings.admin.hook_token or connection.app.state.admin_token
    if not token_matches(connection.headers.get("x-sidecar-token"), expected):
        raise Unauthorized("missing or invalid x-sidecar-token")


def _runtime(request: Request[Any, Any, Any]) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _attribution(request: Request[Any, Any, Any]) -> Attribution:
    return _runtime(request).attribution


class HookController(Controller):
    path = "/hooks"
    tags = ["hooks"]
    guards = [hook_guard]

    @post("/authorize", status_code=HTTP_200_OK, operation_id="authorize")
    async def authorize(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Resolve, upsert and check the identity of a request a proxy is about to send."""
        return await _authorize(request)

    # Envoy's ext_authz appends the original path to the service's path prefix.
    @post(
        "/authorize/{original:path}",
        status_code=HTTP_200_OK,
        operation_id="authorizeWithPath",
        include_in_schema=False,
    )
    async def authorize_with_path(self, request: Request[Any, Any, Any]) -> Response[Any]:
        return await _authorize(request)

    @post("/usage", status_code=HTTP_202_ACCEPTED, operation_id="reportUsage")
    async def usage(self, request: Request[Any, Any, Any]) -> Accepted:
        """Count a finished request; a report retried with the same request_id counts once."""
        try:
            report = msgspec.json.decode(await request.body(), type=UsageReport)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"usage report: {exc}") from None
        except msgspec.DecodeError:
            raise InvalidRequest("request body is not valid JSON") from None
        if not 1 <= len(report.request_id) <= 128:
            raise InvalidRequest("request_id must be 1-128 characters", param="request_id")
        if not 100 <= report.status <= 599:
            raise InvalidRequest("status must be an HTTP status code", param="status")
        try:
            external_id = model.external_id(report.identity, "identity")
        except InvalidField as exc:
            raise InvalidRequest(exc.message, param=exc.param) from None
        logs.bind(external_id, report.request_id)
        kind = kind_for_path(report.path or "") or Kind.CHAT
        usage = usage_from_mapping(kind, report.usage, report.model) if report.usage else Usage()
        upstream_cost = _cost(report.cost_usd)
        if upstream_cost is not None:
            usage = msgspec.structs.replace(usage, cost_nanos=upstream_cost)
        attribution = _attribution(request)
        resolved = Resolved(external_id, Source(report.source or "header"))
        cost = attribution.cost(kind, report.model, usage, None)
        counters = increments(
            source=resolved.source, failed=report.status >= 400, usage=usage, cost=cost
        )
        if report.source is None:  # counted, but under no source
            counters.pop(buckets.BY_SOURCE[resolved.source], None)
        runtime = _runtime(request)
        if buckets.UNPRICED in counters and runtime.metrics is not None:
            runtime.metrics.unpriced(usage.model or report.model)
        quota = runtime.quota
        charges = {}
        identity_id: str | None = None
        # A report comes after the response: it may wait longer than a limit check, but not
        # for the store's full socket timeout.
        within_s = max(quota.limiter.timeout, REPORT_TIMEOUT_S)
        try:
            async with asyncio.timeout(within_s):
                identity_id = await attribution.identify(resolved)
                if quota.active:
                    # The slot authorize took, if any, is free again (a retry finds it gone).
                    await quota.limiter.release(identity_id, report.request_id)
                    policy = await quota.policy_for(identity_id, resolved)
                    charges = quota.limiter.charges(
                        identity_id,
                        policy,
                        usage.total_tokens,
                        cost.nanos if cost else 0,
                        quota.clock(),
                    )
        except STORE_OR_TIMEOUT as exc:
            # Kept in the spool and counted when the store is back; a slot it held frees
            # when its lease expires, and the budgets are not charged for it.
            log.warning("usage report %s kept for later: %s", report.request_id, exc)
        result = await attribution.record(
            identity_id,
            resolved,
            counters,
            request_id=report.request_id,
            charges=charges,
            within_s=within_s,
        )
        return Accepted(report.request_id, result.counted, result.duplicate, result.spooled)


def _cost(value: float | str | None) -> int | None:
    if value is None:
        return None
    try:
        nanos = nanos_from_usd(Decimal(str(value)))
    except InvalidOperation:
        nanos = None
    if nanos is None or isinstance(value, bool):
        raise InvalidRequest("cost_usd must be a non-negative number of dollars", param="cost_usd")
    return nanos


class Decided(NamedTuple):
    status: int
    body: Authorization | RateLimitError
    headers: dict[str, str]


async def decide(runtime: Runtime, raw: bytes, headers: dict[str, str]) -> Decided:
    """`/hooks/authorize`: the original request's body and (lower-cased) headers in, the
    decision out. Raises SidecarError for a 4xx, 503 or 504."""
    deadline = _deadline(headers)
    body: dict[str, Any] | None = None
    if raw.strip():
        try:
            decoded = _decode(raw)
        except msgspec.DecodeError:
            raise InvalidRequest("request body is not valid JSON") from None
        body = decoded if isinstance(decoded, dict) else None
    attribution = runtime.attribution
    try:
        resolved = attribution.resolve(body, headers)
    except InvalidField as exc:
        raise InvalidRequest(exc.message, param=exc.param, code="invalid_identity") from None
    except MissingIdentity:
        raise Unauthorized("an identity is required", code="identity_required") from None
    request_id = str(ULID())
    logs.bind(resolved.external_id, request_id)
    if deadline is not None and time.time() >= deadline:
        raise _too_late(deadline)
    quota = runtime.quota
    known = attribution.known(resolved)
    identity_id: str | None
    if quota.active:
        identity_id, decision = await quota.admit_request(
            resolved, known, attribution.identify, request_id
        )
    else:
        decision = Decision(admitted=True)
        try:
            identity_id = known or await attribution.identify(resolved)
        except STORE_ERRORS as exc:  # nothing to enforce: the usage report writes it
            log.warning("identity %s not written now: %s", resolved.external_id, exc)
            identity_id = None
    if deadline is not None and time.time() >= deadline:
        # Decided, but after the caller stopped waiting: its concurrency slot is given back (the
        # request count the check took stays).
        if decision.lease is not None and identity_id is not None:
            await quota.limiter.release(identity_id, decision.lease)
        raise _too_late(deadline)
    out = dict(decision.headers)
    if not decision.admitted:
        if decision.store_failed:
            raise StoreUnavailable(
                "the rate limiter cannot reach its store", code="rate_limiter_unavailable"
            )
        counters = increments(
            source=resolved.source, failed=False, usage=None, cost=None, rate_limited=True
        )
        attribution.add(identity_id, resolved, counters)
        out["retry-after"] = str(decision.retry_after)
        return Decided(429, refusal(decision, resolved.external_id), out)
    # A proxy that copies response headers upstream (Envoy ext_authz) forwards these.
    out[attribution.header] = encode_header_id(resolved.external_id)
    out["x-sidecar-request-id"] = request_id
    policy = decision.policy.name if decision.policy is not None else None
    identity = HookIdentity(resolved.external_id, resolved.source.value)
    return Decided(200, Authorization(request_id, identity, policy), out)


def _deadline(headers: Mapping[str, str]) -> float | None:
    raw = headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16):
        message = f"{DEADLINE_HEADER} must be a Unix time in milliseconds"
        raise InvalidRequest(message, param=DEADLINE_HEADER)
    return int(raw) / 1000


def _too_late(deadline: float) -> DeadlineExceeded:
    # The caller's clock against ours (not the limiter's, which tests may fake): they agree when
    # both run on one host or are kept in sync.
    late_ms = (time.time() - deadline) * 1000
    log.warning("authorize dropped: the caller stopped waiting %.0f ms ago", late_ms)
    return DeadlineExceeded(
        f"the caller's deadline ({DEADLINE_HEADER}) passed {late_ms:.0f} ms ago"
    )


async def _authorize(request: Request[Any, Any, Any]) -> Response[Any]:
    headers = {k.lower(): v for k, v in request.headers.items()}
    decided = await decide(_runtime(request), await request.body(), headers)
    return Response(decided.body, status_code=decided.status, headers=decided.headers)


class RawAuthorize:
    """`POST /hooks/authorize[/...]` as raw ASGI: the same decision as the Litestar route
    (which documents it in the OpenAPI schema), without the framework's per-request cost,
    for proxies that ask on every request."""

    def __init__(self, settings: Settings, runtime: Runtime, admin_token: str) -> None:
        self.runtime = runtime
        self.expected = settings.admin.hook_token or admin_token
        self.body_timeout_s = settings.server.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if not token_matches(headers.get("x-sidecar-token"), self.expected):
                raise Unauthorized("missing or invalid x-sidecar-token")
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_HOOK_BODY:
                raise PayloadTooLarge(f"request body over {MAX_HOOK_BODY} bytes")
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    raw = await read_body(receive, MAX_HOOK_BODY)
            except BodyTooLarge:
                raise PayloadTooLarge(f"request body over {MAX_HOOK_BODY} bytes") from None
            except TimeoutError:
                message = f"request body not received within {self.body_timeout_s:g} s"
                raise RequestTimeout(message) from None
            decided = await decide(self.runtime, raw, headers)
        except ConnectionResetError:
            return
        except SidecarError as exc:
            body = error_body(exc.status, exc.message, exc.type, exc.code or "", exc.param)
            await _send(send, exc.status, body, {})
            return
        await _send(send, decided.status, _encode(decided.body), decided.headers)


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    out = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})
