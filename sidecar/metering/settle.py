"""Charging a request once it is answered: its usage counted, its concurrency slot given
back, its tokens and cost charged to its limits. One place for inline and hook mode."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import msgspec

from sidecar.errors import StoreUnavailable
from sidecar.identity.identify import Identifier
from sidecar.identity.resolve import Resolved
from sidecar.metering.attribution import Attribution
from sidecar.observe.counters import Counters
from sidecar.quota.decision import Decision, Subject
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
        name = buckets.model_name(model)
        if isinstance(identity, asyncio.Task):
            self.background.spawn(self._when_known(identity, resolved, counters, name))
            self._via_owner(resolved, counters, None, {})
            return
        charges: dict[str, dict[str, tuple[int, int]]] = {}
        decision = meter.decision
        if identity is not None and decision is not None:
            limiter = self.quota.limiter
            if decision.leases:
                self.background.spawn(limiter.release(decision.leases))
            tokens = usage.total_tokens if usage is not None else 0
            charges = limiter.charges(decision.subjects, tokens, nanos, limiter.clock())
        self.recorder.add(
            identity,
            counters,
            source=resolved.source.value,
            external_id=resolved.external_id,
            profile=resolved.profile,
            charges=charges.pop(identity, None) if identity is not None else None,
            model=name,
        )
        owner_id, owner_charges = next(iter(charges.items()), (None, {}))
        self._via_owner(resolved, counters, owner_id, owner_charges)

    def _via_owner(
        self,
        resolved: Resolved,
        counters: dict[str, int],
        owner_id: str | None,
        charges: dict[str, tuple[int, int]],
    ) -> None:
        """A request that carried a listed key for someone else counts for the key's owner
        too: in its VIA counters, and in its limits (`charges`, when two levels applied)."""
        owner = resolved.owner
        if owner is None or owner == resolved.external_id:
            return
        self.recorder.add(
            owner_id,
            buckets.via(counters),
            source="",
            external_id=owner,
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
        self._via_owner(resolved, counters, None, {})

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
        charges: dict[str, dict[str, tuple[int, int]]] = {}
        identity_id: str | None = None
        owner: str | None = None
        try:
            async with asyncio.timeout(within_s):
                identity_id = await self.identifier.identify(resolved)
                subjects, owner = await self._admitted(resolved, identity_id, request_id)
                if subjects:
                    # The slots authorize took, if any, are free again (a retry finds them gone).
                    await quota.limiter.release([(s.identity_id, request_id) for s in subjects])
                    charges = quota.limiter.charges(
                        subjects, usage.total_tokens, nanos, quota.limiter.clock()
                    )
        except (StoreUnavailable, TimeoutError) as exc:
            # Kept in the backlog and counted when the store is back; a slot it held frees
            # when its lease expires, and the limits are not charged for it.
            log.warning("usage report %s kept for later: %s", request_id, exc)
        recorded = await self.recorder.record(
            identity_id,
            counters,
            source=resolved.source.value,
            request_id=request_id,
            charges=charges.pop(identity_id, None) if identity_id is not None else None,
            external_id=resolved.external_id,
            profile=resolved.profile,
            within_s=within_s,
            model=buckets.model_name(usage.model or model),
        )
        if owner is not None and (recorded.counted or recorded.spooled):
            # A retried report counts once, for the owner too.
            owner_id, owner_charges = next(iter(charges.items()), (None, {}))
            with_owner = msgspec.structs.replace(resolved, owner=owner)
            self._via_owner(with_owner, counters, owner_id, owner_charges)
        return recorded

    async def _admitted(
        self, resolved: Resolved, identity_id: str, request_id: str
    ) -> tuple[list[Subject], str | None]:
        """Whom a reported request counts against: its identity under its policy now, and the
        key owner its authorization counted it against (see Limiter.remember); and that
        owner's external id, when it carried a key for someone else."""
        quota = self.quota
        policy = await quota.policy_for(identity_id, resolved) if quota.active else None
        out = [Subject(identity_id, resolved.external_id, policy)] if policy is not None else []
        admission = await quota.limiter.recall(request_id)
        if admission is None:
            return out, None
        by_name = {p.name: p for p in quota.live.policies}
        for owner_id, name in admission.subjects:
            owner_policy = by_name.get(name)
            if owner_policy is not None:  # else: the policies changed since
                out.append(Subject(owner_id, admission.owner, owner_policy))
        return out, admission.owner

    async def _refresh(self, resolved: Resolved) -> None:
        """Write a known identity's body profile, after its request was answered."""
        try:
            await self.identifier.identify(resolved)
        except StoreUnavailable as exc:  # the next request with it tries again
            log.warning("profile of %s not written now: %s", resolved.external_id, exc)

    async def _when_known(
        self,
        identify: asyncio.Task[str],
        resolved: Resolved,
        counters: dict[str, int],
        model: str,
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
            model=model,
        )
