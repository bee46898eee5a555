"""The limit check: every limit of every subject of a request, checked and counted at once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import msgspec
from redis.asyncio.cluster import RedisCluster

from sidecar import ids
from sidecar.errors import StoreUnavailable
from sidecar.observe.counters import Counters
from sidecar.quota import windows
from sidecar.quota.allowances import SHARE, Allowance, Allowances, Lent
from sidecar.quota.breaker import Breaker
from sidecar.quota.decision import (
    Admission,
    Decision,
    LimitUsage,
    PolicyUsage,
    RequestId,
    Reserve,
    Subject,
    charged,
    made,
)
from sidecar.quota.packing import KIND, PRELUDE, Packed, rate_headers, reserved
from sidecar.quota.policy import Dimension, Limit, Policy
from sidecar.store.connect import RedisClient
from sidecar.store.deadline import StoreDeadline
from sidecar.store.errors import call, translated
from sidecar.store.hotline import HotLine
from sidecar.store.keys import Keys
from sidecar.store.scripts import Coalescer, Script, pipeline

__all__ = ["Admission", "Breaker", "Decision", "LimitUsage", "Limiter", "PolicyUsage", "Subject"]

log = logging.getLogger("sidecar.quota")
# How long a charge's token is kept (Limiter.charge): well past its last retry (Settlement).
CHARGE_ONCE_S = 120
# How long what requests admitted unchecked used is tried to be charged: within CHARGE_ONCE_S,
# so that a retry after a lost reply is still known to be one.
OWED_FOR_S = 100.0


def _lifetime(limit: Limit, left_ms: int) -> int:
    """How long (s) a bucket of `limit` is kept, `left_ms` before it ends: a sliding window's
    two windows (the next one weighs it), a calendar window's end and an hour."""
    return 2 * limit.window_s + 1 if not limit.calendar else left_ms // 1000 + 3600


class _Debt(NamedTuple):
    """A batch of what requests admitted unchecked owe one identity's buckets."""

    more: list[tuple[str, int, int]]  # (bucket, units, lifetime), as `Limiter.charge` takes
    once: str  # its token: the same for each try
    since: float  # monotonic time it was made


Clock = Callable[[], float]


class Limiter:
    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        *,
        timeout_ms: int,
        on_error: str,
        lease_s: float,
        clock: Clock = time.time,
        counters: Counters | None = None,
        prefetch: int = 0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self.timeout = timeout_ms / 1000
        self.on_error = on_error
        self.lease_ms = int(lease_s * 1000)
        self.breaker = Breaker()
        self.errors = 0  # limit checks Redis did not answer
        self.ahead = 0  # limit checks answered from allowances, with no exchange
        self.metrics = counters
        # One script touches one cluster slot: an identity's keys share its slot, so on a
        # cluster each subject is admitted by a call of its own (see `_admit_in_turn`).
        self.one_slot = isinstance(client, RedisCluster)
        self._admit = Script("sidecar.quota.lua", "admit", prelude=PRELUDE)
        self._release = Script("sidecar.quota.lua", "release")
        self._settle = Script("sidecar.quota.lua", "settle")
        self._adjust = Script("sidecar.quota.lua", "adjust")
        self._record_script = Script("sidecar.quota.lua", "record")
        # On a single server admissions and settlements share one pipelined connection (in
        # that order at Redis); elsewhere many share a round trip under load (a Coalescer).
        self.line = HotLine.for_client(client)
        self._calls = Coalescer(client, self._admit, self.line)
        self._settles = Coalescer(client, self._settle, self.line)
        self._records = Coalescer(client, self._record_script, self.line)
        self._pinging: asyncio.Future[None] | None = None
        # Quota held ahead (`[limits] prefetch`, see allowances.py): on one server only.
        self.allowances = Allowances(prefetch) if prefetch > 0 and not self.one_slot else None
        self._sweeper: asyncio.Task[None] | None = None
        self._giving: set[asyncio.Task[None]] = set()
        # What requests admitted unchecked used (see `owe`): per identity _id, bucket ->
        # [units, lifetime]; made into batches (`_debts`) charged by one task while the store
        # does not take them.
        self._owed: dict[str, dict[str, list[int]]] = {}
        self._debts: list[_Debt] = []
        self._paying: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open the hot line, if this store has one. Raises StoreUnavailable."""
        if self.line is not None:
            with translated(replied=False):
                await self.line.open()
        if self.allowances is not None and self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.allowances is not None:
            back = self.allowances.due(int(self.clock() * 1000), everything=True)
            with contextlib.suppress(StoreUnavailable, TimeoutError):
                async with asyncio.timeout(self.timeout * 4):
                    await self._give_allowances(back)
            if self._giving:
                await asyncio.wait(self._giving, timeout=self.timeout * 4)
        if self._paying is not None and not self._paying.done():
            await asyncio.wait([self._paying], timeout=max(self.timeout * 4, 1.0))
            self._paying.cancel()
            dropped = len(self._debts) + len(self._owed)
            if dropped:
                log.error(
                    "%d identities' usage admitted unchecked not charged to limits: stopping",
                    dropped,
                )
        if self.line is not None:
            await self.line.aclose()

    def deadline(self) -> StoreDeadline:
        """`timeout_ms`, counted while the store is not answering (see store.deadline)."""
        return StoreDeadline(self.timeout, self._probe)

    def _probe(self) -> None:
        """A PING, unless one is in flight: its answer is the store's sign of life."""
        if self._pinging is None or self._pinging.done():
            self._pinging = asyncio.ensure_future(self._ping())

    async def _ping(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # no sign of life: the deadline fails
            await call(self.client.ping())

    @property
    def script(self) -> Script:
        return self._admit

    @property
    def scripts(self) -> list[Script]:
        return [self._admit, self._release, self._settle, self._adjust, self._record_script]

    def _buckets(self, identity_id: str, limit: Limit, now_ms: int) -> tuple[str, str, int, int]:
        current, previous, elapsed, left = windows.bucket(limit, now_ms)
        base = self.keys.limit(identity_id, limit.key_part)
        return base + current, base + (previous or current), elapsed, left

    def _pack(
        self,
        subjects: Sequence[Subject],
        now_ms: int,
        request_id: str,
        reserve: Reserve | None = None,
        portable: bool = False,
    ) -> Packed:
        out = Packed()
        out.subjects = list(subjects)
        groups: list[str] = []
        for subject in subjects:
            mine: list[str] = []
            for limit in subject.policy.limits:
                current, previous, elapsed, left = self._buckets(subject.identity_id, limit, now_ms)
                out.keys += [current, previous]
                window = 0 if limit.calendar else limit.window_s * 1000
                lifetime = _lifetime(limit, left)
                amount = reserved(limit, reserve)
                paid = self._prepay(out, current, limit, amount)
                out.packed.append(
                    f"{KIND[limit.dimension]} {limit.amount} {window} {elapsed} {lifetime} "
                    f"{amount} {paid} "
                )
                out.spans.append((elapsed, left))
                out.lifetimes.append(lifetime)
                out.limits.append((subject, limit))
                out.reserves.append(amount)
                if amount:
                    mine.append(str(len(out.limits)))
            if mine:
                out.reserving.append(subject)
                groups.append(",".join(mine))
        for subject in subjects:
            if subject.policy.concurrency:
                key = self.keys.leases(subject.identity_id)
                out.leases.append((subject, key))
                out.caps.append(str(subject.policy.concurrency))
        out.keys += [key for _, key in out.leases]
        asks = ""
        if (
            self.allowances is not None
            and not out.leases
            and self.allowances.wanted(subjects[0].identity_id)
        ):
            asks = self._asks(out)
        for subject in out.reserving:
            out.keys += [
                self.keys.reservations(subject.identity_id),
                self.keys.reservations_expiry(subject.identity_id),
            ]
        out.args = [
            "".join(out.packed),
            now_ms,
            " ".join(out.caps),
            request_id,
            self.lease_ms,
            " ".join(groups),
            self.lease_ms,
            asks,
            SHARE,
            "0" if portable else "1",
        ]
        return out

    def _prepay(self, out: Packed, bucket: str, limit: Limit, amount: int) -> int:
        """What this request takes of the limit from an allowance this process holds, sent
        to admit.lua as paid (not checked, not counted again); 0: none."""
        ahead = self.allowances
        paid = 0
        if ahead is not None and ahead.held:
            need = windows.need(limit, amount)
            allowance = ahead.usable(bucket, limit.amount, need) if need > 0 else None
            if allowance is not None:
                allowance.left -= need
                out.paid.append((allowance, need))
                paid = need
        out.prepaid.append(paid)
        return paid

    def _repay(self, packs: list[Packed]) -> None:
        """What a refused (or unanswered) request took from allowances goes back to them, or
        to its bucket when the allowance was given back meanwhile."""
        back = []
        for pack in packs:
            for allowance, need in pack.paid:
                if allowance.touched:
                    allowance.left += need
                else:
                    back.append((allowance.key, need, allowance.lifetime))
            pack.paid = []
        if back:
            self._give_later(back)

    def _asks(self, pack: Packed) -> str:
        """ARGV[8] of admit.lua: per limit, the allowance asked for and the least worth having
        (one request's need); '' when some limit would have none (a token or cost limit the
        request reserves nothing of): every request of these subjects then goes to Redis."""
        assert self.allowances is not None
        prefetch = self.allowances.prefetch
        parts = []
        for (_, limit), amount in zip(pack.limits, pack.reserves, strict=True):
            need = windows.need(limit, amount)
            if need <= 0:
                return ""
            parts.append(f"{need * prefetch} {need} ")
        return "".join(parts)

    async def admit(
        self,
        subjects: Sequence[Subject],
        request_id: RequestId,
        policy: Policy | None = None,
        reserve: Reserve | None = None,
        portable: bool = False,
    ) -> Decision:
        """Admit a request against every limit of every subject, or refuse it having counted
        nothing; `policy` is the identity's own. `reserve`: what the request may use at most,
        reserved against every token and cost limit (see `settle`). On a single server that is
        one script call, or none when allowances this process holds cover the request.
        `portable`: its settlement may come to another sidecar (hook mode): a reservation taken
        from an allowance is then recorded in Redis as any other is."""
        limited = [s for s in subjects if s.policy.limited]
        if not limited:
            return Decision(admitted=True, policy=policy, subjects=tuple(subjects))
        ahead = self.allowances
        if ahead is not None and ahead.held:
            decision = self._admit_ahead(limited, subjects, policy, request_id, reserve, portable)
            if decision is not None:
                if portable:
                    await self.written()  # its reservations recorded before it is answered
                return decision
        if not self.breaker.allow():
            return self.unavailable(policy, limited)
        request_id = made(request_id)
        now_ms = int(self.clock() * 1000)
        metrics = self.metrics
        started = time.perf_counter()
        local: Decision | None = None
        try:
            # A deadline, not wait_for: no task per check on the request path.
            async with self.deadline():
                admitted, packs, replies = await self._exchange(
                    limited, now_ms, request_id, reserve, portable
                )
                if not admitted and ahead is not None:
                    # Refused counting what this process holds ahead, which may have come
                    # since the request was sent: spent on it here, or paying for those of its
                    # limits it can in one more check.
                    self._repay(packs)
                    local = self._admit_ahead(
                        limited, subjects, policy, request_id, reserve, portable
                    )
                    if local is None and self._payable(packs):
                        admitted, packs, replies = await self._exchange(
                            limited, now_ms, request_id, reserve, portable
                        )
                        if not admitted:
                            self._repay(packs)
        except (StoreUnavailable, TimeoutError) as exc:
            self.failed(exc)
            return self.unavailable(policy, limited)
        if metrics is not None:
            metrics.limit_check.observe(time.perf_counter() - started)
        self.breaker.success()
        if local is not None:
            if portable:
                await self.written()
            return local
        if not admitted and ahead is not None:
            self._give_back_for(packs, now_ms)  # for the next request to find
        return self._decide(
            subjects, policy, admitted, packs, replies, request_id, now_ms, portable
        )

    async def _exchange(
        self,
        limited: list[Subject],
        now_ms: int,
        request_id: str,
        reserve: Reserve | None,
        portable: bool,
    ) -> tuple[bool, list[Packed], list[Any]]:
        """The admission at Redis: one script call (on a cluster, one per subject). Raises
        StoreUnavailable, or is cancelled by the check's deadline; what allowances paid for it
        is then theirs again, and a late answer is dealt with (`_late`)."""
        if self.one_slot and len(limited) > 1:
            return await self._admit_in_turn(limited, now_ms, request_id, reserve)
        pack = self._pack(limited, now_ms, request_id, reserve, portable)
        # Written on the line and its reply's future shielded (no task): when the deadline gives
        # up on it, Redis may still run it, and its late answer is dealt with (`_late`).
        sent = self._calls.write(pack.keys, pack.args)
        try:
            if sent is not None:
                reply = await self._calls.reply(sent, pack.keys, pack.args, shielded=True)
            else:  # the line is not open
                reply = await self._calls(pack.keys, pack.args)
        except BaseException:  # StoreUnavailable, or cancelled by the deadline
            if self.allowances is not None:
                self._repay([pack])
            if sent is not None and not sent.done():
                sent.add_done_callback(functools.partial(self._late, [pack], now_ms, request_id))
            raise
        return bool(reply[0]), [pack], [reply]

    def _payable(self, packs: list[Packed]) -> bool:
        """Whether allowances now pay a limit these packs did not have paid."""
        ahead = self.allowances
        assert ahead is not None
        for pack in packs:
            for i, (_, limit) in enumerate(pack.limits):
                need = windows.need(limit, pack.reserves[i])
                key = pack.keys[2 * i]
                if not pack.prepaid[i] and need and ahead.usable(key, limit.amount, need):
                    return True
        return False

    def _admit_ahead(
        self,
        limited: list[Subject],
        subjects: Sequence[Subject],
        policy: Policy | None,
        request_id: RequestId,
        reserve: Reserve | None,
        portable: bool,
    ) -> Decision | None:
        """Admitted from the allowances this process holds, with no exchange, when every limit
        of every subject has room in one; else None (the request goes to Redis)."""
        ahead = self.allowances
        assert ahead is not None
        now_ms = int(self.clock() * 1000)
        taken: list[tuple[Allowance, int, Subject, Limit, int, int]] = []
        # Each allowance pays as it is found (so one found twice pays twice); all are paid
        # back when some limit has none that can pay.
        for subject in limited:
            if subject.policy.concurrency:
                return self._unpaid(taken)
            identity_id = subject.identity_id
            for limit in subject.policy.limits:
                need = windows.need(limit, reserved(limit, reserve))
                allowance = ahead.find(identity_id, limit, now_ms, need) if need > 0 else None
                if allowance is None:
                    return self._unpaid(taken)
                allowance.left -= need
                elapsed, left = now_ms - allowance.starts_ms, allowance.ends_ms - now_ms
                taken.append((allowance, need, subject, limit, elapsed, left))
        if portable and reserve is not None and not self._record(taken, request_id):
            return self._unpaid(taken)
        rows = []
        lent = []
        now = ahead.clock()
        ahead.busy(limited[0].identity_id, now)
        for allowance, need, subject, limit, elapsed, left in taken:
            allowance.touched = now
            used = allowance.current - allowance.left
            rows.append((subject, limit, allowance.previous, used, elapsed, left))
            if limit.dimension is not Dimension.REQUESTS:
                lent.append(Lent(allowance, limit.dimension, need))
        self.ahead += 1
        metrics = self.metrics
        if metrics is not None:
            for subject in limited:
                metrics.admitted(subject.policy)
        return Decision(
            admitted=True,
            policy=policy,
            subjects=tuple(subjects),
            rows=rows,
            # Settled here (`settle_lent`) unless the settlement may come elsewhere (recorded).
            lent=() if portable else tuple(lent),
            charged=bool(lent),  # a token or cost limit lent
        )

    @staticmethod
    def _unpaid(taken: list[tuple[Allowance, int, Subject, Limit, int, int]]) -> None:
        """What allowances paid for a request they do not admit after all, paid back."""
        for allowance, need, *_ in taken:
            allowance.left += need

    def _record(
        self, taken: list[tuple[Allowance, int, Subject, Limit, int, int]], request_id: RequestId
    ) -> bool:
        """Write the reservations a request took from allowances where settle.lua (on any
        sidecar) and admit.lua (when it expires) find them, before the decision is answered;
        False when the line cannot take them now."""
        entries: dict[str, list[str]] = {}
        for allowance, need, subject, limit, _, _ in taken:
            if limit.dimension is not Dimension.REQUESTS:
                entries.setdefault(subject.identity_id, []).append(f"{allowance.key} {need}")
        if not entries:
            return True
        keys: list[str] = []
        for identity_id in entries:
            keys += [
                self.keys.reservations(identity_id),
                self.keys.reservations_expiry(identity_id),
            ]
        until = int(self.clock() * 1000) + self.lease_ms
        args = [
            made(request_id),
            until,
            self.lease_ms + 60_000,
            *(" ".join(p) for p in entries.values()),
        ]
        try:
            future = self._records.write(keys, args)  # on the socket by `written`
        except StoreUnavailable:
            return False
        if future is None:  # the line is not open
            return False
        future.add_done_callback(_logged)
        return True

    async def _admit_in_turn(
        self, subjects: list[Subject], now_ms: int, request_id: str, reserve: Reserve | None
    ) -> tuple[bool, list[Packed], list[Any]]:
        """On a cluster: each subject in a fixed order (by `_id`), each call atomic on its own
        slot; when one refuses, what the earlier ones took is given back. No subject is ever
        over-admitted; a request refused later may, for that moment, hold a slot another
        request then misses (it is given back at once)."""
        packs: list[Packed] = []
        replies: list[Any] = []
        for subject in sorted(subjects, key=lambda s: s.identity_id):
            pack = self._pack([subject], now_ms, request_id, reserve)
            reply = await self._calls(pack.keys, pack.args)
            packs.append(pack)
            replies.append(reply)
            if not reply[0]:
                taken = packs[:-1]
                if taken:
                    await self._give_back(taken, request_id)
                return False, packs, replies
        return True, packs, replies

    async def _give_back(self, packs: list[Packed], request_id: str) -> None:
        now_ms = int(self.clock() * 1000)

        def queue(pipe: Any) -> None:
            for pack in packs:
                buckets = pack.request_buckets()
                lease_sets = [key for _, key in pack.leases]
                self._release.queue(pipe, buckets + lease_sets, [len(buckets), request_id])
                for subject in pack.reserving:  # its reservation, settled at nothing
                    self._settle.queue(pipe, *self._settle_call(subject, request_id, 0, 0, now_ms))

        await pipeline(self.client, queue, [self._release, self._settle])

    def _decide(
        self,
        subjects: Sequence[Subject],
        policy: Policy | None,
        admitted: bool,
        packs: list[Packed],
        replies: list[Any],
        request_id: str,
        now_ms: int,
        portable: bool = False,
    ) -> Decision:
        metrics = self.metrics
        rows: list[tuple[Subject, Limit, int, int, int, int]] = []  # + prev, cur, elapsed, left
        refusing: list[tuple[Subject, Limit | None, int]] = []  # who, what, wait ms
        holding: dict[str, Allowance] = {}
        lent: list[Lent] = []
        if admitted and self.allowances is not None:
            self._granted(packs, replies, now_ms)
            holding = self.allowances.held  # not shown as used (as in `usage`)
            if not portable:
                lent = self._lent(packs, replies)
        for pack, reply in zip(packs, replies, strict=False):
            in_use, counts = reply[1], reply[2]
            for i, ((subject, limit), (elapsed, left)) in enumerate(
                zip(pack.limits, pack.spans, strict=True)
            ):
                previous, current = int(counts[2 * i]), int(counts[2 * i + 1])
                allowance = holding.get(pack.keys[2 * i]) if holding else None
                shown = current - allowance.left if allowance is not None else current
                rows.append((subject, limit, previous, shown, elapsed, left))
                need = pack.reserves[i]
                if pack.prepaid[i]:
                    continue  # paid from an allowance: not what refused
                if not reply[0] and not windows.admits(limit, previous, current, elapsed, need):
                    wait = windows.wait_ms(limit, previous, current, elapsed, left, need)
                    refusing.append((subject, limit, wait))
            if not reply[0]:
                for (subject, _), cap, held in zip(pack.leases, pack.caps, in_use, strict=True):
                    if int(held) >= int(cap):
                        refusing.append((subject, None, 1000))
        if admitted:
            if metrics is not None:
                for subject in subjects:
                    if subject.policy.limited:
                        metrics.admitted(subject.policy)
            leases = tuple(lease for pack in packs for lease in pack.leased(request_id))
            return Decision(
                admitted=True,
                policy=policy,
                subjects=tuple(subjects),
                rows=rows,  # its headers worked out when used (packing.headers_of)
                leases=leases,
                lent=tuple(lent),
                charged=charged(subjects),
            )
        if not refusing:  # the script saw a limit at its edge that the float math here does not
            refusing.append((packs[-1].subjects[0], None, 1000))
        # The limit that frees last binds; a concurrency refusal frees when a request ends.
        by, binding, wait = max(refusing, key=lambda r: r[2])
        dimension = binding.dimension if binding is not None else Dimension.CONCURRENCY
        if metrics is not None:
            metrics.refused(by.policy.name, dimension.value)
        return Decision(
            admitted=False,
            policy=policy,
            subjects=tuple(subjects),
            refused_by=by,
            binding=binding,
            dimension=dimension,
            headers=rate_headers(rows),
            retry_after=max(1, math.ceil(wait / 1000)),
            charged=charged(subjects),
        )

    def _lent(self, packs: list[Packed], replies: list[Any]) -> list[Lent]:
        """A request granted allowances (on every limit: admit.lua grants all or none) is
        settled against them, as one admitted from them is: its reservations were not recorded
        (admit.lua's ARGV[10]). What each token and cost limit lends it: its reservation."""
        ahead = self.allowances
        assert ahead is not None
        lent = []
        for pack, reply in zip(packs, replies, strict=True):
            grants = reply[3] if len(reply) > 3 else None
            if not grants or not int(grants[0]):
                continue
            for i, (_, limit) in enumerate(pack.limits):
                if limit.dimension is Dimension.REQUESTS:
                    continue
                allowance = ahead.held.get(pack.keys[2 * i])
                assert allowance is not None  # granted just now (`_granted`)
                lent.append(Lent(allowance, limit.dimension, pack.reserves[i]))
        return lent

    def _late(
        self, packs: list[Packed], now_ms: int, request_id: str, sent: asyncio.Future[Any]
    ) -> None:
        """The reply to a check this process stopped waiting for: Redis ran it after all. What
        it granted is held (then used, or given back) rather than left counted; and with
        `on_error = "deny"` the request was refused (503), so what it counted of its own is
        given back (`_undo`): a refused request consumes nothing, an outage included. With
        "allow" it went upstream unchecked, and its count stands."""
        if sent.cancelled() or sent.exception() is not None:
            return
        reply = sent.result()  # an error reply (the script did not run) is a value
        if not isinstance(reply, list) or not reply[0]:
            return
        if self.allowances is not None:
            self._granted(packs, [reply], now_ms)
        if self.on_error == "deny":
            (pack,) = packs
            self._in_background(self._undo(pack, reply, request_id))

    async def _undo(self, pack: Packed, reply: list[Any], request_id: str) -> None:
        """Give back what admit.lua counted for a request that was refused after all: in each
        limit an allowance did not pay, one request or its reservation; its reservation
        records (only where one is still there: one that expired was given back already); its
        concurrency slots. A failure is logged: what was not given back stays counted (a
        reservation until it expires)."""
        grants = reply[3] if len(reply) > 3 else None
        # admit.lua records no reservation for a request granted allowances that this process
        # settles itself (ARGV[10] '1'): its reservations are in the buckets only.
        recorded = not (grants and all(int(g) > 0 for g in grants) and pack.args[9] == "1")
        back: list[tuple[str, int, int]] = []
        by_subject: dict[str, list[tuple[str, int, int]]] = {}
        for i, (subject, limit) in enumerate(pack.limits):
            if pack.prepaid[i]:
                continue  # paid from an allowance: not counted by admit.lua
            units = 1 if limit.dimension is Dimension.REQUESTS else pack.reserves[i]
            if not units:
                continue
            entry = (pack.keys[2 * i], units, pack.lifetimes[i])
            if limit.dimension is Dimension.REQUESTS or not recorded:
                back.append(entry)
            else:
                by_subject.setdefault(subject.identity_id, []).append(entry)
        leases = pack.leased(request_id)
        try:
            async with asyncio.timeout(self.timeout * 4):
                if recorded and pack.reserving:
                    ids = [subject.identity_id for subject in pack.reserving]

                    def queue(pipe: Any) -> None:
                        for identity_id in ids:
                            pipe.hdel(self.keys.reservations(identity_id), request_id)
                            pipe.zrem(self.keys.reservations_expiry(identity_id), request_id)

                    removed = await pipeline(self.client, queue)
                    for n, identity_id in enumerate(ids):
                        if removed[2 * n]:  # still there: not given back on expiry
                            back += by_subject.get(identity_id, [])
                if back:
                    await self.charge([(key, -units, life) for key, units, life in back])
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("a refused request's late count not given back (%s)", type(exc).__name__)
        await self.release(leases)

    def _granted(self, packs: list[Packed], replies: list[Any], now_ms: int) -> None:
        """Keep the allowances an admission was granted (admit.lua's fourth reply)."""
        ahead = self.allowances
        assert ahead is not None
        back = []
        for pack, reply in zip(packs, replies, strict=True):
            grants = reply[3] if len(reply) > 3 else None
            if not grants:
                continue
            counts = reply[2]
            for i, (subject, limit) in enumerate(pack.limits):
                elapsed, left = pack.spans[i]
                back += ahead.granted(
                    pack.keys[2 * i],
                    subject.identity_id,
                    limit,
                    (now_ms - elapsed, now_ms + left),
                    pack.lifetimes[i],
                    int(grants[i]),
                    (int(counts[2 * i]), int(counts[2 * i + 1])),
                )
        if back:
            self._give_later(back)

    def _give_back_for(self, packs: list[Packed], now_ms: int) -> None:
        """Give back the allowances a refused request's limits hold."""
        ahead = self.allowances
        assert ahead is not None
        keys = {pack.keys[2 * i] for pack in packs for i in range(len(pack.limits))}
        back = ahead.due(now_ms, only=keys)
        if back:
            self._give_later(back)

    def _give_later(self, back: list[tuple[str, int, int]]) -> None:
        self._in_background(self._give_allowances(back))

    def _in_background(self, work: Awaitable[None]) -> None:
        """Give-backs run off the request's path; `close` waits for them."""
        task = asyncio.ensure_future(work)
        self._giving.add(task)
        task.add_done_callback(self._giving.discard)

    async def _give_allowances(self, back: list[tuple[str, int, int]]) -> None:
        """Give units back to their buckets (negative) or charge them (positive): (bucket,
        units, lifetime). A failure is logged: units given back stay counted until their window
        passes, and a charge is lost."""
        if not back:
            return
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self.charge([(key, -units, lifetime) for key, units, lifetime in back])
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("%d allowance(s) not given back (%s)", len(back), type(exc).__name__)

    async def _sweep(self) -> None:
        """Give back what allowances hold that is not spent in time (see allowances.HOLD_S)."""
        ahead = self.allowances
        assert ahead is not None
        while True:
            await asyncio.sleep(SWEEP_S)
            back = ahead.due(int(self.clock() * 1000))
            if back:
                await self._give_allowances(back)

    def void(self, buckets: list[str]) -> None:
        """Buckets a budget reset emptied: what this process holds ahead in them ends."""
        if self.allowances is not None:
            self.allowances.void(buckets)

    def settle_lent(
        self, decision: Decision, tokens: int, nanos: int
    ) -> list[tuple[str, int, int]]:
        """Settle a request admitted from allowances: the surplus of its reservation returns
        to the allowance it came from (or to its bucket, the allowance given back since); what
        it used beyond comes from the allowance when that has room. One whose allowance a
        budget reset ended is charged what it used, in full (its reservation went with the
        reset). Returns what is left to `charge` at Redis before the response ends: (bucket,
        units, lifetime)."""
        back: list[tuple[str, int, int]] = []
        more: list[tuple[str, int, int]] = []
        for allowance, dimension, held in decision.lent:
            used = tokens if dimension is Dimension.TOKENS else nanos
            if allowance.void:
                if used > 0:
                    more.append((allowance.key, used, allowance.lifetime))
                continue
            delta = used - held
            if not delta:
                continue
            if allowance.touched and allowance.left >= delta:  # still held, with room
                allowance.left -= delta
            elif delta < 0:
                back.append((allowance.key, -delta, allowance.lifetime))
            else:
                more.append((allowance.key, delta, allowance.lifetime))
        if back:
            self._give_later(back)
        return more

    async def charge(self, more: list[tuple[str, int, int]], once: str | None = None) -> None:
        """Add units to buckets (see `settle_lent`; negative: give them back, see adjust.lua).
        `once`: a token naming this charge, sent again with each retry of it: Redis makes it at
        most once, though a lost reply leaves the sender not knowing whether it did. Raises
        StoreUnavailable."""
        keys = [key for key, _, _ in more]
        args: list[Any] = ["".join(f"{u} {life} " for _, u, life in more)]
        if once is not None:
            keys.append(self.keys.charge(once))
            args.append(CHARGE_ONCE_S)
        await self._adjust(self.client, keys, args)

    def failed(self, exc: BaseException) -> None:
        """A step of a limit check did not get its answer from Redis in time."""
        self.errors += 1
        self.breaker.failure()
        log.warning("limit check failed (%s); on_error=%s", type(exc).__name__, self.on_error)

    def unavailable(self, policy: Policy | None, subjects: Sequence[Subject] = ()) -> Decision:
        """The store did not answer: `on_error` decides. Let through, the request's token and
        cost limits among `subjects` are charged what it used once the store is back (`owe`)."""
        allow = self.on_error == "allow"
        unchecked = tuple(s for s in subjects if s.policy.charged) if allow else ()
        return Decision(
            admitted=allow,
            policy=policy,
            store_failed=True,
            retry_after=1,
            unchecked=unchecked,
        )

    def charges(self, subject: Subject, tokens: int, nanos: int) -> list[tuple[str, int, int]]:
        """What `tokens` and `nanos` used charge the token and cost limits of `subject`, in the
        buckets of now: (bucket, units, lifetime)."""
        now_ms = int(self.clock() * 1000)
        out = []
        for limit in subject.policy.limits:
            dimension = limit.dimension
            if dimension is Dimension.TOKENS:
                units = tokens
            elif dimension is Dimension.COST:
                units = nanos
            else:
                continue
            if units > 0:
                bucket, _, _, left = self._buckets(subject.identity_id, limit, now_ms)
                lifetime = _lifetime(limit, left)
                out.append((bucket, units, lifetime))
        return out

    def owe(self, subjects: Sequence[Subject], tokens: int, nanos: int) -> None:
        """Charge the token and cost limits of `subjects` what a request admitted unchecked
        (the store down, `on_error = "allow"`) used, in the buckets of now, once the store takes
        it: its usage still counts for every later admission, so that an identity's limits hold
        again once the store is back rather than admitting their amount again on top of what
        went through meanwhile. Tried for OWED_FOR_S at most, each batch made once (a retry
        after a lost reply changes nothing). Its request count is not charged: a check Redis ran
        late counted it already, and one never sent cannot be told from it."""
        for subject in subjects:
            more = self.charges(subject, tokens, nanos)
            if not more:
                continue
            owed = self._owed.setdefault(subject.identity_id, {})
            for bucket, units, lifetime in more:
                entry = owed.get(bucket)
                if entry is None:
                    owed[bucket] = [units, lifetime]
                else:
                    entry[0] += units
        if self._owed and (self._paying is None or self._paying.done()):
            self._paying = asyncio.ensure_future(self._pay())

    async def _pay(self) -> None:
        """Charge what is owed: each round, what was owed since the last becomes one batch per
        identity (its buckets share a cluster slot) under a token of its own, and every batch
        not yet taken is tried once; a batch owed over OWED_FOR_S ago is dropped (logged)."""
        delay = 0.1
        while self._owed or self._debts:
            now = time.monotonic()
            owed, self._owed = self._owed, {}
            for identity_id, buckets in owed.items():
                more = [(bucket, units, life) for bucket, (units, life) in buckets.items()]
                # The token in the identity's slot, as the buckets (adjust.lua takes both).
                self._debts.append(_Debt(more, f"{{{identity_id}}}{ids.ulid()}", now))
            unpaid, self._debts = self._debts, []
            for i, debt in enumerate(unpaid):
                try:
                    async with self.deadline():
                        await self.charge(debt.more, debt.once)
                except (StoreUnavailable, TimeoutError):
                    if now - debt.since < OWED_FOR_S:
                        self._debts.append(debt)
                    else:
                        log.error("usage admitted unchecked not charged to limits: store away")
                except Exception:  # not the store's absence: not tried again
                    log.exception("usage admitted unchecked not charged to limits")
                except asyncio.CancelledError:
                    self._debts += unpaid[i:]
                    raise
            if self._debts:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
            else:
                delay = 0.1

    def _settle_call(
        self,
        subject: Subject,
        request_id: str,
        tokens: int | None,
        nanos: int | None,
        now_ms: int,
        again: Reserve | None = None,
    ) -> tuple[list[str], list[Any]]:
        """`again`: this settles a request again whose earlier attempt Redis may have run, and
        which reserved this: a subject that reserved is then settled only while its
        reservation is there (the earlier attempt took it), so it is never counted twice.
        `tokens` and `nanos` None: what it used is not known, and what it reserved stands."""
        keys = [
            self.keys.reservations(subject.identity_id),
            self.keys.reservations_expiry(subject.identity_id),
        ]
        parts = []
        for limit in subject.policy.limits:
            dimension = limit.dimension
            if dimension is not Dimension.TOKENS and dimension is not Dimension.COST:
                continue
            amount = tokens if dimension is Dimension.TOKENS else nanos
            current, _, _, left = self._buckets(subject.identity_id, limit, now_ms)
            lifetime = _lifetime(limit, left)
            keys.append(current)
            parts.append(
                f"{'=' if amount is None else amount} {lifetime} "
                f"{self.keys.limit(subject.identity_id, limit.key_part)} "
            )
        reserving = again is not None and any(
            reserved(limit, again) > 0 for limit in subject.policy.limits
        )
        return keys, [request_id, ("R " if reserving else "") + "".join(parts)]

    async def settle(
        self,
        subjects: Sequence[Subject],
        request_id: str,
        tokens: int | None,
        nanos: int | None,
        again: Reserve | None = None,
    ) -> None:
        """What an answered request used replaces what it reserved, in every token and cost
        limit of its subjects (the actual is charged where nothing was reserved, or the
        reservation expired; with `tokens` and `nanos` None, what it used is not known and
        its reservation stands as its charge): durable before the client has the whole
        response. On one server
        that is one script call for all the subjects; on a cluster, one per subject, each atomic
        in its own slot. Concurrent settlements share round trips (a Coalescer, as admissions
        do). `again`: what the request reserved, when an earlier attempt may have been run
        (see `_settle_call`). Raises StoreUnavailable."""
        calls = self._settle_calls(subjects, request_id, tokens, nanos, again)
        if len(calls) == 1:
            await self._settles(*calls[0])
        elif calls:  # a cluster: one call per subject, each in its own slot
            await asyncio.gather(*(self._settles(keys, args) for keys, args in calls))

    def _settle_calls(
        self,
        subjects: Sequence[Subject],
        request_id: str,
        tokens: int | None,
        nanos: int | None,
        again: Reserve | None = None,
    ) -> list[tuple[list[str], list[Any]]]:
        """The settle.lua calls for the paying subjects: one on one server, as at admission;
        one per subject on a cluster; none when no subject has a token or cost limit."""
        paying = [s for s in subjects if s.policy.charged]
        now_ms = int(self.clock() * 1000)
        calls = [self._settle_call(s, request_id, tokens, nanos, now_ms, again) for s in paying]
        if len(calls) < 2 or self.one_slot:
            return calls
        keys = [key for call_keys, _ in calls for key in call_keys]
        return [(keys, [request_id, *(args[1] for _, args in calls)])]

    async def written(self) -> None:
        """Returns once every call this process sent on the hot line is on its socket."""
        if self.line is not None:
            await self.line.written()

    def settle_written(
        self, subjects: Sequence[Subject], request_id: str, tokens: int, nanos: int
    ) -> Awaitable[None] | None:
        """`settle`, sent on the hot line before this returns (on the socket once `written`
        returns): Redis applies it before any admission this process sends later. Its outcome
        (StoreUnavailable) is the awaitable's; None when the line is not open (then `settle`)."""
        line = self.line
        if line is None or not line.ready or self._settle.sha is None:
            return None
        calls = self._settle_calls(subjects, request_id, tokens, nanos)
        if not calls:
            return None
        ((keys, args),) = calls  # the line's server is a single one: one call
        future = self._settles.write(keys, args)
        assert future is not None  # the line is open: checked above, and no await since
        return self._settles.reply(future, keys, args)

    async def usage(self, identity_id: str, policy: Policy) -> PolicyUsage:
        """How much of each limit of `policy` the identity uses now: the buckets and window
        math of `admit`, read without consuming anything. Raises StoreUnavailable."""
        now_ms = int(self.clock() * 1000)
        keys: list[str] = []
        spans = []
        for limit in policy.limits:
            current, previous, elapsed, left = self._buckets(identity_id, limit, now_ms)
            keys += [current, previous]
            spans.append((elapsed, left))

        # GETs, not an MGET: a cluster pipeline refuses multi-key commands (one node, one
        # round trip either way: the identity's keys share its slot).
        def queue(pipe: Any) -> None:
            for key in keys:
                pipe.get(key)
            if policy.concurrency:
                pipe.zcount(self.keys.leases(identity_id), f"({now_ms}", "+inf")

        replies = await pipeline(self.client, queue) if keys or policy.concurrency else []
        values = [int(v or 0) for v in replies[: len(keys)]]
        ahead = self.allowances
        if ahead is not None:  # what this process holds ahead is not used yet
            for i in range(0, len(keys), 2):
                held = ahead.held.get(keys[i])
                if held is not None:
                    values[i] = max(0, values[i] - held.left)
        replies = replies[len(keys) :]
        limits = []
        for i, (limit, (elapsed, left)) in enumerate(zip(policy.limits, spans, strict=True)):
            in_bucket, in_previous = values[2 * i], values[2 * i + 1]
            used = windows.used(limit, in_previous, in_bucket, elapsed)
            limits.append(
                LimitUsage(
                    limit=limit,
                    used=used,
                    remaining=max(0.0, limit.amount - used),
                    reset_ms=windows.reset_ms(limit, in_previous, in_bucket, left),
                )
            )
        in_flight = int(replies[0]) if policy.concurrency else None
        return PolicyUsage(limits=limits, in_flight=in_flight)

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        """Give concurrency slots back: (identity _id, lease) pairs."""
        if not leases:
            return
        try:
            async with asyncio.timeout(self.timeout * 4):

                def queue(pipe: Any) -> None:
                    for identity_id, lease in leases:
                        pipe.zrem(self.keys.leases(identity_id), lease)

                await pipeline(self.client, queue)
        except (StoreUnavailable, TimeoutError) as exc:
            # The lease expires by itself; until then it holds a slot.
            log.warning("concurrency slot not released (%s); it expires", type(exc).__name__)

    # -- hook mode: what /hooks/authorize decided, for /hooks/usage to settle ----------------

    async def remember(self, request_id: str, admission: Admission) -> None:
        """Keep whom an authorized request counts for beyond its identity (its key's owner),
        for its usage report: `lease_s` long, as its concurrency slots. Raises
        StoreUnavailable."""
        key = self.keys.admission(request_id)
        await call(self.client.set(key, _admission(admission), px=self.lease_ms))

    async def recall(self, request_id: str) -> Admission | None:
        """What `remember` kept for a request, if anything."""
        raw = await call(self.client.get(self.keys.admission(request_id)))
        return msgspec.json.decode(raw, type=Admission) if raw else None


_admission = msgspec.json.Encoder().encode

SWEEP_S = 0.25  # how often allowances are looked over


def _logged(future: asyncio.Future[Any]) -> None:
    """The reply to `_record`'s call: a failure leaves the reservation counted unrecorded
    (the report then charges its actual on top, until the window passes)."""
    if future.cancelled():
        return
    result = future.exception() or future.result()
    if isinstance(result, Exception):
        log.warning("a reservation taken ahead was not recorded: %s", result)
