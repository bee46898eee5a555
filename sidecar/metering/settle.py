"""Charging a request once it is answered: its usage counted, its concurrency slot given
back, its tokens and cost charged to its limits. One place for inline and hook mode."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial

import msgspec

from sidecar import ids, logs
from sidecar.errors import Conflict, SidecarError, StoreUnavailable
from sidecar.identity.identify import Identifier
from sidecar.identity.resolve import Resolved
from sidecar.metering import spans
from sidecar.metering.attribution import Attribution
from sidecar.observe.counters import Counters
from sidecar.observe.tracing import Span, Tracer
from sidecar.quota.decision import Decision, Reserve, Subject
from sidecar.quota.packing import covered
from sidecar.quota.policy import Policy
from sidecar.quota.service import OPAQUE, OPAQUE_SUFFIX, Quota
from sidecar.tasks import Background
from sidecar.usage import buckets
from sidecar.usage.buckets import UNPRICED, increments
from sidecar.usage.extract import Unread, read
from sidecar.usage.model import Kind, Usage
from sidecar.usage.pricing import Cost
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
    # Known when admitted: its body profile, when due, is written once the response is out.
    refresh: bool = False
    # The admission's (its leases' and reservations' name); "" when its admission needed none
    # (admitted from allowances): see `named`.
    request_id: str = ""
    settled: bool = False  # its token and cost limits are charged (Settlement.settle)
    reserve: Reserve | None = None  # what its admission reserved of its token and cost limits
    admitted_at: float = 0.0  # time.monotonic() of the admission
    span: Span | None = None  # with [telemetry] enabled
    # What `settle` priced (the usage it was given, and its cost), for `answered` to reuse.
    priced: tuple[Usage | None, Cost | None] | None = None
    upstream_status: int | None = None  # the upstream's answer's, once it came

    def charges(self, usage: Usage | None, nanos: int | None) -> tuple[int, int]:
        """What its token and cost limits are charged: the tokens and nano-dollars it used.
        When the upstream answered a call the sidecar reads usage from with success (2xx)
        without saying what it used (no usage in the answer, no cost header: a server that does
        not report it, or leaves it out of a stream the sidecar asked it of, a response
        left to run in the background), what it reserved: the work was done and billed, and an
        answer that hides its usage must not count as free; one that told its cost only (a cost
        header, no usage) is charged that cost and the tokens it reserved. Nothing for an
        upstream failure, a redirect or no answer, nor for `extra_paths` (their answers are not
        read)."""
        if usage is not None:
            return usage.total_tokens, nanos or 0
        reserve = self.reserve if self._succeeded() else None
        if reserve is None:
            return 0, nanos or 0
        return reserve.tokens, reserve.nanos if nanos is None else nanos

    def hides_usage(self, usage: Usage | None, nanos: int | None) -> bool:
        """Whether the upstream answered a call the sidecar reads usage from with success (2xx)
        and told nothing of what it used (`nanos`: what a cost header or the usage priced
        said, None when nothing did)."""
        return usage is None and nanos is None and self._succeeded()

    def _succeeded(self) -> bool:
        """The upstream answered a call the sidecar reads usage from with success (2xx)."""
        status = self.upstream_status
        return self.kind is not None and status is not None and 200 <= status < 300

    @property
    def named(self) -> str:
        """Its request id for a log line, made now when its admission needed none (the same as
        the line's own `request_id`: the request's log context makes it)."""
        if not self.request_id:
            context = logs.current()
            self.request_id = context.request_id if context is not None else ids.ulid()
        return self.request_id

    @property
    def charged(self) -> bool:
        """Admitted under token or cost limits: what it used is charged before it ends
        (Settlement.settle)."""
        decision = self.decision
        return decision is not None and decision.admitted and decision.charged


class Settlement:
    def __init__(
        self,
        attribution: Attribution,
        identifier: Identifier,
        quota: Quota,
        recorder: Recorder,
        background: Background,
        counters: Counters | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.attribution = attribution
        self.identifier = identifier
        self.quota = quota
        self.recorder = recorder
        self.background = background
        self.counters = counters
        self.tracer = tracer

    def _counters(
        self,
        resolved: Resolved,
        model: str | None,
        usage: Usage | None,
        cost: Cost | None,
        failed: bool,
        unreported: bool = False,
    ) -> dict[str, int]:
        """What the request adds to its identity's counters."""
        counters = increments(
            source=resolved.source.value,
            failed=failed,
            usage=usage,
            cost=cost,
            unreported=unreported,
        )
        if UNPRICED in counters and self.counters is not None:
            self.counters.unpriced(model)
        return counters

    def answered(
        self,
        meter: Meter,
        failed: bool,
        usage: Usage | Unread | None,
        header_cost: str | None,
        *,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        """An inline request is over (answered, failed or abandoned): its concurrency slot is
        given back and a charge its limits still lack is made now; it is counted (its usage
        read when `usage` is an answer left Unread, priced, added up) with the requests
        answered around it (Recorder.later), or now when its span ends here. `status` is what
        the client was answered (None: nothing), `error` why it failed, for its span."""
        decision = meter.decision
        if isinstance(meter.identity, str) and decision is not None:
            if decision.leases:
                self.background.spawn(self.quota.limiter.release(decision.leases))
            unsettled = meter.charged and not meter.settled
            if unsettled or decision.unchecked:
                usage = read(usage)
                cost = self._cost(meter, usage, header_cost)
                tokens, charged = meter.charges(usage, _known(usage, header_cost, cost))
                if unsettled:
                    # Not settled before the response ended (it failed, or the client left):
                    # what upstream produced replaces the reservation now.
                    self.background.spawn(self._settle_later(meter, tokens, charged))
                else:
                    # Let through unchecked while the store was down: charged once it is back.
                    self.quota.limiter.owe(decision.unchecked, tokens, charged)
        at = self.recorder.clock()
        if meter.span is not None:
            self._count(meter, failed, usage, header_cost, at, status, error)
        else:
            self.recorder.later(partial(self._count, meter, failed, usage, header_cost, at))

    def _cost(self, meter: Meter, usage: Usage | None, header_cost: str | None) -> Cost | None:
        """What the request cost (the one `settle` worked out for the same usage, when it
        did)."""
        priced = meter.priced
        if priced is not None and priced[0] is usage:
            return priced[1]
        model = usage.model if usage is not None and usage.model else meter.model
        cost = self.attribution.cost(meter.kind, model, usage, header_cost)
        meter.priced = (usage, cost)
        return cost

    def _count(
        self,
        meter: Meter,
        failed: bool,
        unread: Usage | Unread | None,
        header_cost: str | None,
        at: float,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        """What `answered` counts: the request in its identity's counters (and its key
        owner's), at `at`."""
        usage = read(unread)
        resolved = meter.resolved
        model = usage.model if usage is not None and usage.model else meter.model
        cost = self._cost(meter, usage, header_cost)
        known = _known(usage, header_cost, cost)
        # Counted as a request without tokens or cost, and as one whose usage is unknown.
        unreported = not failed and meter.hides_usage(usage, known)
        counters = self._counters(resolved, model, usage, cost, failed, unreported)
        if self.counters is not None:
            self.counters.metered_request(resolved.source.value)
            if unreported and meter.kind is not None:
                self.counters.unread(meter.kind.value)
        if meter.span is not None:
            decision = meter.decision
            policy = decision.policy if decision is not None else None
            self._trace(meter, status, usage, known, policy, error or spans.failure(status))
        if (
            meter.refresh
            and self.identifier.stale(resolved)
            and self.identifier.refresh_later(resolved)
        ):
            self.background.spawn(self._refresh())
        identity = meter.identity
        name = buckets.model_name(model)
        if isinstance(identity, asyncio.Task):
            self.background.spawn(self._when_known(identity, resolved, counters, name, at))
            self._via_owner(resolved, counters, None, {}, at)
            return
        owner_id: str | None = None
        decision = meter.decision
        if identity is not None and decision is not None and resolved.owner is not None:
            # Its key's owner, counted in turn (two levels).
            owner_id = next(
                (s.identity_id for s in decision.subjects if s.external_id == resolved.owner),
                None,
            )
        self.recorder.add(
            identity,
            counters,
            source=resolved.source.value,
            external_id=resolved.external_id,
            profile=resolved.profile,
            at=at,
            model=name,
        )
        self._via_owner(resolved, counters, owner_id, {}, at)

    async def settle(self, meter: Meter, usage: Usage | None, header_cost: str | None) -> None:
        """Before an inline response ends: when a token or cost limit applies, what the request
        used replaces what it reserved, in the store, so the client's next request (on any
        sidecar) sees it. Cheap requests (no such limit) do nothing here."""
        decision = meter.decision
        if decision is None or not meter.charged or meter.settled:
            return
        cost = self._cost(meter, usage, header_cost)
        tokens, nanos = meter.charges(usage, cost.nanos if cost is not None else None)
        limiter = self.quota.limiter
        meter.settled = True
        if decision.lent:
            await self._settle_lent(meter, tokens, nanos)
            return
        if self._covered(meter, tokens, nanos):
            # What it reserved, already counted, is at least what it used: the settlement
            # is written now (ahead of any later admission of this process) and its reply
            # not waited for; a failure is retried as below.
            written = limiter.settle_written(decision.subjects, meter.request_id, tokens, nanos)
            if written is not None:
                self.background.spawn(self._confirm(meter, written, tokens, nanos))
                await limiter.written()  # on its way to Redis before the response ends
                return
        try:
            async with limiter.deadline():
                await limiter.settle(decision.subjects, meter.request_id, tokens, nanos)
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("limits of %s not charged now (%s); retrying", meter.named, exc)
            self.background.spawn(self._settle_later(meter, tokens, nanos, tried=True))

    def _covered(self, meter: Meter, tokens: int, nanos: int) -> bool:
        """Its reservation covers the actual, and is still held (well within its lease)."""
        decision = meter.decision
        assert decision is not None
        fresh = time.monotonic() - meter.admitted_at < self.quota.limiter.lease_ms / 2000
        return fresh and covered(decision.subjects, meter.reserve, tokens, nanos)

    async def _confirm(
        self, meter: Meter, written: Awaitable[None], tokens: int, nanos: int
    ) -> None:
        try:
            await written
        except StoreUnavailable as exc:
            # Not applied (a settlement that Redis ran is answered): charged again, later.
            log.warning("limits of %s not charged now (%s); retrying", meter.named, exc)
            await self._settle_later(meter, tokens, nanos, tried=True)

    async def _settle_lent(self, meter: Meter, tokens: int, nanos: int) -> None:
        """A request admitted from allowances: settled against them; what they cannot pay is
        charged at Redis before the response ends (retried in the background on failure)."""
        decision = meter.decision
        assert decision is not None
        limiter = self.quota.limiter
        more = limiter.settle_lent(decision, tokens, nanos)
        if not more:
            return
        once = ids.ulid()  # the same for its retries: made once, whatever the replies
        try:
            async with limiter.deadline():
                await limiter.charge(more, once)
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("limits of %s not charged now (%s); retrying", meter.named, exc)
            self.background.spawn(self._charge_later(meter, more, once))

    async def _charge_later(
        self, meter: Meter, more: list[tuple[str, int, int]], once: str
    ) -> None:
        await self._retried(meter, lambda _: self.quota.limiter.charge(more, once))

    async def _settle_later(
        self, meter: Meter, tokens: int, nanos: int, tried: bool = False
    ) -> None:
        """Settle a request's limits in the background, retrying; `tried`: an attempt was made
        already, which Redis may have run (then only a reservation still there is settled, see
        Limiter._settle_call: no attempt counts twice)."""
        decision = meter.decision
        assert decision is not None
        meter.settled = True
        limiter = self.quota.limiter
        if decision.lent:  # what allowances cannot pay is charged at Redis
            more = limiter.settle_lent(decision, tokens, nanos)
            if more:
                await self._charge_later(meter, more, ids.ulid())
            return
        # Should it fail, its reservation is given back when it expires; the actual is not
        # charged.
        await self._retried(
            meter,
            lambda attempt: limiter.settle(
                decision.subjects,
                meter.request_id,
                tokens,
                nanos,
                again=meter.reserve if tried or attempt else None,
            ),
        )

    @staticmethod
    async def _retried(meter: Meter, charge: Callable[[int], Awaitable[None]]) -> None:
        """A charge of a request's limits, tried five times over about six seconds (each
        attempt is given its number)."""
        for attempt in range(5):
            try:
                await charge(attempt)
                return
            except StoreUnavailable as exc:
                if attempt == 4:
                    log.error("limits of %s not charged: %s", meter.named, exc)
                    return
                await asyncio.sleep(0.2 * 2**attempt)

    def _via_owner(
        self,
        resolved: Resolved,
        counters: dict[str, int],
        owner_id: str | None,
        charges: dict[str, tuple[int, int]],
        at: float | None = None,
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
            at=at,
        )

    def refused(
        self,
        identity_id: str | None,
        resolved: Resolved,
        decision: Decision,
        meter: Meter | None = None,
    ) -> None:
        """A request the limits refused: counted as rate limited only, with the requests
        answered around it (Recorder.later). `meter`: an inline request's, with its span,
        which ends now."""
        if meter is not None and meter.span is not None:
            # The sidecar doing its job: as for any 4xx a server answers, the span's status
            # stays unset. The policy is the one that refused (the key owner's, maybe).
            by = decision.refused_by
            self._trace(
                meter,
                429,
                None,
                None,
                by.policy if by is not None else decision.policy,
                None,
                decision.dimension.value if decision.dimension is not None else None,
                by.external_id if by is not None else None,
            )
        at = self.recorder.clock()
        self.recorder.later(partial(self._count_refused, identity_id, resolved, at))

    def _count_refused(self, identity_id: str | None, resolved: Resolved, at: float) -> None:
        counters = increments(
            source=resolved.source.value, failed=False, usage=None, cost=None, rate_limited=True
        )
        if self.counters is not None:
            self.counters.metered_request(resolved.source.value)
        self.recorder.add(
            identity_id,
            counters,
            source=resolved.source.value,
            external_id=resolved.external_id,
            profile=resolved.profile,
            at=at,
        )
        self._via_owner(resolved, counters, None, {}, at)

    def unanswered(self, meter: Meter, status: int, error: str | None) -> None:
        """An inline request the sidecar answered with an error of its own before forwarding
        it (nothing is counted): its span ends."""
        if meter.span is not None:
            self._trace(meter, status, None, None, None, error or str(status))

    def _trace(
        self,
        meter: Meter,
        status: int | None,
        usage: Usage | None,
        cost_nanos: int | None,
        policy: Policy | None,
        error: str | None,
        refused_in: str | None = None,
        refused_for: str | None = None,
    ) -> None:
        """End the request's span, with its attributes built once, here. `refused_in` is the
        dimension that refused it, `refused_for` whose limit that was."""
        span = meter.span
        if span is None or not span.recording:  # not sampled: nothing to build
            return
        attributes = spans.attributes(
            meter.resolved,
            meter.kind,
            meter.model,
            usage,
            cost_nanos=cost_nanos,
            policy=policy.name if policy is not None else None,
            status=status,
            request_id=meter.request_id or _made(),
        )
        if refused_in is not None:
            attributes["sidecar.limit.dimension"] = refused_in
        if refused_for is not None:
            attributes["sidecar.limit.identity"] = refused_for
        span.finish(attributes, time.time_ns(), error)

    async def reported(
        self,
        resolved: Resolved,
        *,
        request_id: str,
        kind: Kind,
        model: str | None,
        usage: Usage,
        status: int,
        within_s: float,
        sourced: bool = True,
        untold: bool = False,
        carrier: Mapping[str, str] | None = None,
    ) -> Recorded:
        """A hook-mode usage report: counted now, once per request id. `status` is the one
        upstream answered; `sourced` false: the report named no source, so no source counter
        is bumped; `untold`: it gave no usage for a kind whose answers tell it, so a success is
        charged the tokens its authorization reserved (and their cost, when it gave none either:
        then it counts as unreported), as inline (Meter.charges).
        `carrier`: the report's headers, whose trace context its span continues."""
        received_ns = time.time_ns()
        failed = status >= 400
        no_usage = untold and 200 <= status < 300
        unreported = no_usage and usage.cost_nanos is None
        cost = self.attribution.cost(kind, model, usage, None)
        counters = self._counters(resolved, model, usage, cost, failed, unreported)
        nanos = cost.nanos if cost is not None else 0
        if not sourced:
            counters.pop(buckets.BY_SOURCE[resolved.source.value], None)
        quota = self.quota
        identity_id: str | None = None
        owner: str | None = None
        subjects: list[Subject] = []
        looked_up = False  # whom it counts against, learnt from the store
        try:
            async with asyncio.timeout(within_s):
                if not await self.recorder.claim(request_id, resolved.external_id):
                    raise Conflict(
                        f"request_id {request_id!r} was reported for another identity: a "
                        "request counts once, for the identity its first report named",
                        param="identity",
                        code="reported_for_another_identity",
                    )
                identity_id = await self.identifier.identify(resolved)
                subjects, owner = await self._admitted(resolved, identity_id, request_id)
                looked_up = True
        except (StoreUnavailable, TimeoutError) as exc:
            # Kept in the backlog and counted when the store is back; a slot it held frees
            # when its lease expires, and its reservation is given back unsettled.
            log.warning("usage report %s kept for later: %s", request_id, exc)
        charges: dict[str, tuple[int, int]] = {}
        if not looked_up and not failed and not no_usage:
            # Whom it counts against not learnt: its identity's own token and cost limits, as
            # far as the process knows them, are charged with its counters (now or when the
            # store is back), in the same step that makes it counted once: a report counted
            # before, or after by another try, charges nothing again (record.lua).
            charges = quota.own_charges(resolved, usage.total_tokens, nanos)
        recorded = await self.recorder.record(
            identity_id,
            counters,
            source=resolved.source.value,
            request_id=request_id,
            charges=charges,
            external_id=resolved.external_id,
            profile=resolved.profile,
            within_s=within_s,
            model=buckets.model_name(usage.model or model),
        )
        if subjects and recorded.counted:  # a retried report is settled once
            try:
                async with asyncio.timeout(within_s):
                    # The slots authorize took, if any, are free again.
                    await quota.limiter.release([(s.identity_id, request_id) for s in subjects])
                    # What it reserved stands where it did not say what it used (None): not
                    # free for hiding its usage.
                    await quota.limiter.settle(
                        subjects,
                        request_id,
                        None if no_usage else usage.total_tokens,
                        None if unreported else nanos,
                    )
            except (StoreUnavailable, TimeoutError) as exc:
                log.warning("limits of report %s not charged: %s", request_id, exc)
        if owner is not None and (recorded.counted or recorded.spooled):
            # A retried report counts once, for the owner too.
            owner_id = next((s.identity_id for s in subjects if s.external_id == owner), None)
            with_owner = msgspec.structs.replace(resolved, owner=owner)
            self._via_owner(with_owner, counters, owner_id, {})
        if self.counters is not None and not recorded.duplicate:
            self.counters.metered_request(resolved.source.value)
            if unreported:
                self.counters.unread(kind.value)
        if self.tracer is not None and not recorded.duplicate:  # one span per request
            start_ns = spans.authorized_ns(request_id, received_ns)
            span = self.tracer.start(spans.name(kind, model), carrier or {}, start_ns, server=False)
            meter = Meter(resolved, kind, identity_id, model, request_id=request_id, span=span)
            policy = next((s.policy for s in subjects if s.identity_id == identity_id), None)
            self._trace(meter, status, usage, nanos, policy, spans.failure(status))
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
        if not quota.live.keys and not quota.budgets.active and not quota.opaque_one_at_a_time:
            # Nothing but the identity could have been counted against (no listed key, no
            # budget, no lease for input the estimate cannot see): no admission record to
            # read, no round trip.
            return out, None
        admission = await quota.limiter.recall(request_id)
        if admission is None:
            return out, None
        by_name = {p.name: p for p in quota.live.policies}
        for subject_id, name in admission.subjects:
            if name == OPAQUE.name and subject_id.endswith(OPAQUE_SUFFIX):  # its lease, given back
                out.append(Subject(subject_id, resolved.external_id, OPAQUE))
                continue
            if name.startswith("budget:"):
                budget = quota.budgets.subject(subject_id)
                if budget is not None:  # else: deleted since
                    out.append(budget)
                continue
            owner_policy = by_name.get(name)
            if owner_policy is not None:  # else: the policies changed since
                out.append(Subject(subject_id, admission.owner, owner_policy))
        return out, admission.owner or None

    async def _refresh(self) -> None:
        """Write known identities' body profiles, queued after their requests were answered."""
        try:
            await self.identifier.refresh_due()
        except SidecarError as exc:  # the store failed, or a creation cap: their next requests
            log.warning("body profiles not written now: %s", exc)

    async def _when_known(
        self,
        identify: asyncio.Task[str],
        resolved: Resolved,
        counters: dict[str, int],
        model: str,
        at: float | None = None,
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
            at=at,
            model=model,
        )


def _known(usage: Usage | None, header_cost: str | None, cost: Cost | None) -> int | None:
    """What a request cost in nano-dollars, None when nothing told (unknown, not free)."""
    if usage is None and header_cost is None:
        return None
    return cost.nanos if cost is not None else 0


def _made() -> str | None:
    """The request id a log line of this request made, if one did."""
    context = logs.current()
    return context.made if context is not None else None
