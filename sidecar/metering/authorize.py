"""`/hooks/authorize`: a proxy asks before it forwards; the same decision inline mode makes."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import msgspec
from ulid import ULID

from sidecar import logs
from sidecar.errors import InvalidRequest, StoreUnavailable, Unauthorized
from sidecar.identity.identify import Identifier
from sidecar.identity.model import InvalidField
from sidecar.identity.resolve import MissingIdentity, encode_header_id
from sidecar.metering.attribution import Attribution
from sidecar.metering.settle import Settlement
from sidecar.quota.limiter import Decision
from sidecar.quota.service import Quota, RateLimitError, refusal

log = logging.getLogger("sidecar.hooks")

_decode = msgspec.json.Decoder().decode


class HookIdentity(msgspec.Struct):
    external_id: str
    source: str


class Authorization(msgspec.Struct):
    request_id: str
    identity: HookIdentity
    policy: str | None = None


class Decided(NamedTuple):
    status: int
    body: Authorization | RateLimitError
    headers: dict[str, str]


class Authorizer:
    def __init__(
        self,
        attribution: Attribution,
        identifier: Identifier,
        quota: Quota,
        settlement: Settlement,
    ) -> None:
        self.attribution = attribution
        self.identifier = identifier
        self.quota = quota
        self.settlement = settlement

    async def decide(self, raw: bytes, headers: dict[str, str]) -> Decided:
        """The original request's body and (lower-cased) headers in, the decision out.
        Raises SidecarError for a 4xx or 503."""
        body: dict[str, Any] | None = None
        if raw.strip():
            try:
                decoded = _decode(raw)
            except msgspec.DecodeError:
                raise InvalidRequest("request body is not valid JSON") from None
            body = decoded if isinstance(decoded, dict) else None
        try:
            resolved = self.attribution.resolve(body, headers)
        except InvalidField as exc:
            raise InvalidRequest(exc.message, param=exc.param, code="invalid_identity") from None
        except MissingIdentity:
            raise Unauthorized("an identity is required", code="identity_required") from None
        request_id = str(ULID())
        logs.bind(resolved.external_id, request_id)
        known = self.identifier.known(resolved)
        identity_id: str | None
        if self.quota.active:
            identity_id, decision = await self.quota.admit(resolved, request_id, known)
        else:
            decision = Decision(admitted=True)
            try:
                identity_id = known or await self.identifier.identify(resolved)
            except StoreUnavailable as exc:  # nothing to enforce: the usage report writes it
                log.warning("identity %s not written now: %s", resolved.external_id, exc)
                identity_id = None
        out = dict(decision.headers)
        if not decision.admitted:
            if decision.store_failed:
                raise StoreUnavailable(
                    "the rate limiter cannot reach its store", code="rate_limiter_unavailable"
                )
            self.settlement.refused(identity_id, resolved)
            out["retry-after"] = str(decision.retry_after)
            return Decided(429, refusal(decision, resolved.external_id), out)
        # A proxy that copies response headers upstream (Envoy ext_authz) forwards these.
        out[self.attribution.header] = encode_header_id(resolved.external_id)
        out["x-sidecar-request-id"] = request_id
        policy = decision.policy.name if decision.policy is not None else None
        identity = HookIdentity(resolved.external_id, resolved.source.value)
        return Decided(200, Authorization(request_id, identity, policy), out)
