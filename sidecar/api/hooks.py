"""The hooks, as Litestar routes: `POST /hooks/usage`, and `POST /hooks/authorize` as the
OpenAPI schema describes it (the dispatcher answers authorize as raw ASGI, proxy/authorize.py,
with the same decision)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import Controller, Request, Response, post
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from sidecar import logs, money
from sidecar.api.deps import AuthorizerDep, LimiterDep, SettlementDep
from sidecar.asgi import lowered
from sidecar.errors import InvalidRequest
from sidecar.identity import model
from sidecar.identity.model import InvalidField
from sidecar.identity.resolve import Resolved, Source
from sidecar.usage.extract import check_reported, usage_from_mapping
from sidecar.usage.model import Kind, Usage, kind_for_path

REPORT_TIMEOUT_S = 1.0
TRACE_CONTEXT = ("traceparent", "tracestate")  # W3C trace context headers


class UsageReport(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    request_id: str
    identity: str
    model: str | None = None
    status: int = 200
    usage: dict[str, Any] | None = None
    cost_usd: float | str | None = None
    source: Literal["body", "user_field", "header", "api_key", "anonymous"] | None = None
    path: str | None = None  # the original request's path, to tell the usage shape apart


class Accepted(msgspec.Struct):
    request_id: str
    counted: bool
    duplicate: bool
    spooled: bool = False  # the store did not answer: kept, and counted once it does


class HookController(Controller):
    path = "/hooks"
    tags = ["hooks"]

    @post("/authorize", status_code=HTTP_200_OK, operation_id="authorize")
    async def authorize(
        self, request: Request[Any, Any, Any], authorizer: AuthorizerDep
    ) -> Response[Any]:
        """Resolve, upsert and check the identity of a request a proxy is about to send."""
        return await _authorize(request, authorizer)

    # Envoy's ext_authz appends the original path to the service's path prefix.
    @post(
        "/authorize/{original:path}",
        status_code=HTTP_200_OK,
        operation_id="authorizeWithPath",
        include_in_schema=False,
    )
    async def authorize_with_path(
        self, request: Request[Any, Any, Any], authorizer: AuthorizerDep
    ) -> Response[Any]:
        return await _authorize(request, authorizer)

    @post("/usage", status_code=HTTP_202_ACCEPTED, operation_id="reportUsage")
    async def usage(
        self, request: Request[Any, Any, Any], settlement: SettlementDep, limiter: LimiterDep
    ) -> Accepted:
        """Count a finished request; a report retried with the same request_id counts once.
        With telemetry on, the request's span continues the report's `traceparent`."""
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
        external_id = settlement.attribution.aliases.canonical(external_id)
        logs.bind(external_id, report.request_id)
        metered = kind_for_path(report.path or "")
        kind = metered or Kind.CHAT
        told = None
        if report.usage:
            check_reported(report.usage)
            # None for one without an input or output count (a total alone): as none given.
            # An output count is asked of a path known to produce output; a report without its
            # path may be an embedding's, whose usage has none.
            output = metered is not None and metered is not Kind.EMBEDDINGS
            told = usage_from_mapping(kind, report.usage, report.model, output=output)
        usage = told or Usage()
        upstream_cost = _cost(report.cost_usd)
        if upstream_cost is not None:
            usage = msgspec.structs.replace(usage, cost_nanos=upstream_cost)
        result = await settlement.reported(
            Resolved(external_id, Source(report.source or "header")),
            request_id=report.request_id,
            kind=kind,
            model=report.model,
            usage=usage,
            status=report.status,
            # A report comes after the response: it may wait longer than a limit check,
            # but not for the store's full socket timeout.
            within_s=max(limiter.timeout, REPORT_TIMEOUT_S),
            sourced=report.source is not None,
            # No usage, for a kind whose answers tell it (not an extra path's).
            untold=told is None and (metered is not None or report.path is None),
            # The span of the request continues the trace the report is part of.
            carrier={k: v for k in TRACE_CONTEXT if (v := request.headers.get(k)) is not None},
        )
        return Accepted(report.request_id, result.counted, result.duplicate, result.spooled)


def _cost(value: float | str | None) -> int | None:
    if value is None:
        return None
    nanos = money.from_text(value) if isinstance(value, str) else money.from_number(value)
    if nanos is None:
        raise InvalidRequest("cost_usd must be a non-negative number of dollars", param="cost_usd")
    return nanos


async def _authorize(request: Request[Any, Any, Any], authorizer: AuthorizerDep) -> Response[Any]:
    headers = lowered(request.scope, authorizer.attribution.single_headers)
    peer = request.client.host if request.client is not None else None
    decided = await authorizer.decide(await request.body(), headers, peer)
    out = {k.decode("latin-1"): v.decode("latin-1") for k, v in decided.headers}
    return Response(decided.body, status_code=decided.status, headers=out)
