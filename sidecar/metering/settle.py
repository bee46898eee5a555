"""Charging a request once it is answered: its usage counted, its concurrency slot given
back, its tokens and cost charged to its limits. One place for inline and hook mode."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sidecar.errors import StoreUnavailable
from sidecar.identity.identify import Identifier
from sidecar.identity.resolve import Resolved
from sidecar.metering.attribution import Attribution
from sidecar.observe.counters import Counters
from sidecar.quota.limiter import Decision
from sidecar.quota.service import Quota
from sidecar.tasks import Background
from sidecar.usage import buckets
from sidecar.usage.buckets import UNPRICED, increments
from sidecar.usage.model import Kind, Usage
from sidecar.usage.recorder import Recorded, Recorder

log = logging.getLogger("sidecar.metering")


@dataclass(slots=True)
class Meter:
    """What is known of a metered request while it is forwarded."""

    resolved: Resolved
    kind: Kind | None
    # The _id, the task that upserts and finds it, or None when the store could not say
    # (the usage is then counted under the external id, and the identity written with it).
    identity: str | asyncio.Task[str] | None
    model: str | None  # as requested; the response's own name wins when it has one
    decision: Decision | None = None  # the limit check's, when policies apply
    strip: bool = False  # the usage chunk the sidecar asked for is dropped from the stream
    refresh: bool = False  # the body profile is written once the response is out


class Settlement:
    def __init__(
        self,
        attribution: Attribution,
        identifier: Identifier,
        quota: Quota,
        recorder: Recorder,
        background: Background,
        counters: Counters | None = None,
    ) -> None:
        self.attribution = attribution
        self.identifier = identifier
        self.quota = quota
        self.recorder = recorder
        self.background = background
        self.counters = counters

    def _counters(
        self,
        resolved: Resolved,
        kind: Kind | None,
        model: str | None,
        usage: Usage | None,
        header_cost: str | None,
        failed: bool,
    ) -> tuple[dict[str, int], int]:
        """What the request adds to its identity's counters, and its cost in nano-dollars."""
        cost = self.attribution.cost(kind, model, usage, header_cost)
        counters = increments(source=resolved.source.value, failed=failed, usage=usage, cost=cost)
        if UNPRICED in counters and self.counters is not None:
            self.counters.unpriced(model)
        return counters, cost.nanos if cost is not None else 0

    def answered(
        self, meter: Meter, failed: bool, usage: Usage | None, header_cost: str | None
    ) -> None:
        """An inline request is over (answered, failed or abandoned): count it."""
        resolved = meter.resolved
        model = usage.model if usage is not None and usage.model else meter.model
        counters, nanos = self._counters(resolved, meter.kind, model, usage, header_cost, failed)
        if meter.refresh:
            self.background.spawn(self._refresh(resolved))
        identity = meter.identity
        if isinstance(identity, asyncio.Task):
            self.background.spawn(self._when_known(identity, resolved, counters))
            return
        charges = {}
        decision = meter.decision
        if identity is not None and decision is not None:
            limiter = self.quota.limiter
            if decision.lease is not None:
                self.background.spawn(limiter.release(identity, decision.lease))
            tokens = usage.total_tokens if usage is not None else 0
            charges = limiter.charges(identity, decision.policy, tokens, nanos, limiter.clock())
        self.recorder.add(
            identity,
            counters,
            source=resolved.source.value,
            external_id=resolved.external_id,
            profile=resolved.profile,
            charges=charges,
        )

    def refused(self, identity_id: str | None, resolved: Resolved) -> None:
        """A request the limits refused: counted as rate limited only."""
        counters = increments(
            source=resolved.source.value, failed=False, usage=None, cost=None, rate_limited=True
        )
        self.recorder.add(
            identity_id,
            counters,
            source=resolved.source.value,
            external_id=resolved.external_id,
            profile=resolved.profile,
        )

    async def reported(
        self,
        resolved: Resolved,
        *,
        request_id: str,
        kind: Kind,
        model: str | None,
        usage: Usage,
        failed: bool,
        within_s: float,
        sourced: bool = True,
    ) -> Recorded:
        """A hook-mode usage report: counted now, once per request id. `sourced` false: the
        report named no source, so no source counter is bumped."""
        counters, nanos = self._counters(resolved, kind, model, usage, None, failed)
        if not sourced:
            counters.pop(buckets.BY_SOURCE[resolved.source.value], None)
        quota = self.quota
        charges = {}
        identity_id: str | None = None
        try:
            async with asyncio.timeout(within_s):
                identity_id = await self.identifier.identify(resolved)
                if quota.active:
                    # The slot authorize took, if any, is free again (a retry finds it gone).
                    await quota.limiter.release(identity_id, request_id)
                    policy = await quota.policy_for(identity_id, resolved)
                    charges = quota.limiter.charges(
                        identity_id, policy, usage.total_tokens, nanos, quota.limiter.clock()
                    )
        except (StoreUnavailable, TimeoutError) as exc:
            # Kept in the backlog and counted when the store is back; a slot it held frees
            # when its lease expires, and the limits are not charged for it.
            log.warning("usage report %s kept for later: %s", request_id, exc)
        return await self.recorder.record(
            identity_id,
            counters,
            source=resolved.source.value,
            request_id=request_id,
            charges=charges,
            external_id=resolved.external_id,
            profile=resolved.profile,
            within_s=within_s,
        )

    async def _refresh(self, resolved: Resolved) -> None:
        """Write a known identity's body profile, after its request was answered."""
        try:
            await self.identifier.identify(resolved)
        except StoreUnavailable as exc:  # the next request with it tries again
            log.warning("profile of %s not written now: %s", resolved.external_id, exc)

    async def _when_known(
        self, identify: asyncio.Task[str], resolved: Resolved, counters: dict[str, int]
    ) -> None:
        identity_id: str | None
        try:
            identity_id = await identify
        except StoreUnavailable as exc:
            # Counted under the external id; the identity is written with the usage.
            log.warning("identity %s not written now: %s", resolved.external_id, exc)
            identity_id = None
        self.recorder.add(
            identity_id,
            counters,
            source=resolved.source.value,
            external_id=resolved.external_id,
            profile=resolved.profile,
        )
