"""`/hooks/authorize`: a proxy asks before it forwards; the same decision inline mode makes."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import NamedTuple

import msgspec

from sidecar import ids, logs
from sidecar.errors import InvalidRequest, SidecarError, StoreUnavailable
from sidecar.identity.identify import Identifier
from sidecar.identity.resolve import encode_header_id
from sidecar.jsonbody import parse_optional
from sidecar.metering.attribution import Attribution
from sidecar.metering.settle import Settlement
from sidecar.quota.decision import Decision
from sidecar.quota.limiter import Admission
from sidecar.quota.packing import headers_of
from sidecar.quota.service import Quota, RateLimitError, refusal
from sidecar.usage.estimate import names_output_cap

log = logging.getLogger("sidecar.hooks")


# Unix time in milliseconds after which the caller no longer waits for the answer (it has let
# the request through, or refused it): a decision it would not see must count nothing. Only a
# trusted caller may set it: a proxy that passes client headers to the hook must drop a client's.
DEADLINE_HEADER = "x-sidecar-deadline"
# The answer's `output_cap`, for a proxy that copies response headers (it cannot change the body).
OUTPUT_CAP_HEADER = b"x-sidecar-output-cap"


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
    # With `[limits] cap_output`: the output cap the request was reserved for, when it named none
    # and a token or cost limit reserved for it. A caller that can change the body (the LiteLLM
    # callback) sets it, as inline mode does, so that the reservation is an upper bound.
    output_cap: int | None = None


class Decided(NamedTuple):
    status: int
    body: Authorization | RateLimitError
    headers: list[tuple[bytes, bytes]]  # as the HTTP server takes them


class Authorizer:
    def __init__(
        self,
        attribution: Attribution,
        identifier: Identifier,
        quota: Quota,
        settlement: Settlement,
        *,
        cap_output: bool = False,
    ) -> None:
        self.attribution = attribution
        self.identifier = identifier
        self.quota = quota
        self.settlement = settlement
        self.cap_output = cap_output
        self.header = attribution.header.lower().encode("latin-1")

    async def decide(self, raw: bytes, headers: dict[str, str], peer: str | None) -> Decided:
        """The original request's body and (lower-cased) headers in, the decision out; `peer`
        is the caller's address (the proxy asking). Raises SidecarError for a 4xx, 503 or
        504."""
        deadline = _deadline(headers)
        body = parse_optional(raw)
        resolved = self.attribution.resolve(body, headers, peer)
        request_id = ids.ulid()
        logs.bind(resolved.external_id, request_id)
        if deadline is not None and time.time() >= deadline:
            raise _too_late(deadline)
        known = self.identifier.known(resolved)
        identity_id: str | None
        if self.quota.active:
            reserve = None
            if self.quota.reserving:  # settled by the usage report with this request_id
                reserve = self.attribution.reserve(None, body or {}, len(raw))
            identity_id, decision = await self.quota.admit(
                resolved, request_id, known, reserve, portable=True
            )
        else:
            decision = Decision(admitted=True)
            try:
                identity_id = known or await self.identifier.identify(resolved)
            except StoreUnavailable as exc:  # nothing to enforce: the usage report writes it
                log.warning("identity %s not written now: %s", resolved.external_id, exc)
                identity_id = None
        if deadline is not None and time.time() >= deadline:
            # Decided, but after the caller stopped waiting: its concurrency slot is given back
            # (the request count the check took stays).
            await self.quota.limiter.release(decision.leases)
            raise _too_late(deadline)
        out = list(headers_of(decision))
        if not decision.admitted:
            if decision.store_failed:
                raise StoreUnavailable(
                    "the rate limiter cannot reach its store", code="rate_limiter_unavailable"
                )
            self.settlement.refused(identity_id, resolved, decision)
            out.append((b"retry-after", b"%d" % decision.retry_after))
            return Decided(429, refusal(decision, resolved.external_id), out)
        owner = self.quota.owner_of(resolved)
        others = [
            (s.identity_id, s.policy.name)
            for s in decision.subjects
            if s.identity_id != identity_id
        ]
        if owner is not None or others:
            # Its usage report counts for the key's owner and the budgets too: keep whom it
            # counted against.
            admission = Admission(owner.external_id if owner is not None else "", others)
            try:
                await self.quota.limiter.remember(request_id, admission)
            except StoreUnavailable as exc:
                log.warning("subjects of %s not kept for its report: %s", request_id, exc)
        # A proxy that copies response headers upstream (Envoy ext_authz) forwards these.
        header_id = encode_header_id(resolved.external_id).encode("latin-1")
        out += [(self.header, header_id), (b"x-sidecar-request-id", request_id.encode())]
        policy = decision.policy.name if decision.policy is not None else None
        identity = HookIdentity(resolved.external_id, resolved.source.value)
        cap = None
        if self.cap_output and decision.charged and not names_output_cap(None, body or {}):
            cap = self.attribution.default_output_reserve
            out.append((OUTPUT_CAP_HEADER, b"%d" % cap))
        return Decided(200, Authorization(request_id, identity, policy, cap), out)


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
    message = f"the caller's deadline ({DEADLINE_HEADER}) passed {late_ms:.0f} ms ago"
    return DeadlineExceeded(message)
