from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import msgspec

from sidecar import money
from sidecar.errors import StoreUnavailable
from sidecar.observe.counters import Counters
from sidecar.quota import windows
from sidecar.quota.policy import Dimension, Limit, Policy
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys
from sidecar.store.scripts import Coalescer, Script, pipeline

log = logging.getLogger("sidecar.quota")

Clock = Callable[[], float]

# How admit.lua is told each limit's dimension; the script's prelude gets them from here.
_KIND = {Dimension.REQUESTS: "r", Dimension.TOKENS: "t", Dimension.COST: "c"}
_PRELUDE = "".join(f"local {d.name} = '{code}'\n" for d, code in _KIND.items())
_HEADER = {Dimension.REQUESTS: "requests", Dimension.TOKENS: "tokens", Dimension.COST: "cost"}


class Decision(msgspec.Struct, kw_only=True):
    admitted: bool
    policy: Policy | None = None
    binding: Limit | None = None  # the limit that refused (None for concurrency)
    dimension: Dimension | None = None  # what refused
    retry_after: int = 0  # whole seconds, >= 1 when refused
    headers: list[tuple[str, str]] = msgspec.field(default_factory=list)
    lease: str | None = None  # a concurrency slot to give back when the request ends
    store_failed: bool = False  # Redis did not answer; `admitted` is what on_error says


class LimitUsage(msgspec.Struct, kw_only=True):
    limit: Limit
    used: float  # requests, tokens or nano-dollars the window holds now
    remaining: float
    reset_ms: int  # until the count is back to zero


class PolicyUsage(msgspec.Struct, kw_only=True):
    limits: list[LimitUsage]
    in_flight: int | None = None  # concurrency leases held, when the policy limits them


class Breaker:
    """Stops a Redis outage from costing every request the full timeout: after `threshold`
    failures in a row, spread over at least `span_s`, the limiter does not ask Redis for
    `open_s`, then lets one call try. The span keeps one burst of timeouts (a busy event loop
    answering late, all at once) from looking like an outage."""

    def __init__(
        self,
        threshold: int = 5,
        open_s: float = 2.0,
        span_s: float = 0.2,
        clock: Clock = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.span_s = span_s
        self.clock = clock
        self.failures = 0
        self.first_failure = 0.0
        self.opened_at: float | None = None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at >= self.open_s:
            self.opened_at = self.clock()  # one probe per period while half-open
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        now = self.clock()
        if self.failures == 0:
            self.first_failure = now
        self.failures += 1
        if self.failures >= self.threshold and now - self.first_failure >= self.span_s:
            self.opened_at = now

    @property
    def open(self) -> bool:
        return self.opened_at is not None


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
    ) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self.timeout = timeout_ms / 1000
        self.on_error = on_error
        self.lease_ms = int(lease_s * 1000)
        self.breaker = Breaker()
        self.errors = 0  # limit checks Redis did not answer
        self.metrics = counters
        self._admit = Script("sidecar.quota.lua", "admit", prelude=_PRELUDE)
        self._calls = Coalescer(client, self._admit)

    @property
    def script(self) -> Script:
        return self._admit

    def _buckets(self, identity_id: str, limit: Limit, now_ms: int) -> tuple[str, str, int, int]:
        current, previous, elapsed, left = windows.bucket(limit, now_ms)
        base = self.keys.limit(identity_id, limit.key_part)
        return base + current, base + (previous or current), elapsed, left

    async def admit(self, identity_id: str, policy: Policy | None, request_id: str) -> Decision:
        if policy is None or not policy.limited:
            return Decision(admitted=True, policy=policy)
        if not self.breaker.allow():
            return self.unavailable(policy)
        now_ms = int(self.clock() * 1000)
        keys: list[str] = []
        packed = []
        spans = []
        for limit in policy.limits:
            current, previous, elapsed, left = self._buckets(identity_id, limit, now_ms)
            keys += [current, previous]
            window = 0 if limit.calendar else limit.window_s * 1000
            lifetime = 2 * limit.window_s + 1 if not limit.calendar else left // 1000 + 3600
            packed.append(f"{_KIND[limit.dimension]} {limit.amount} {window} {elapsed} {lifetime} ")
            spans.append((elapsed, left))
        if policy.concurrency:
            keys.append(self.keys.leases(identity_id))
        args = ["".join(packed), now_ms, policy.concurrency or 0, request_id, self.lease_ms]
        metrics = self.metrics
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: no task per check on the request path.
            async with asyncio.timeout(self.timeout):
                reply = await self._calls(keys, args)
        except (StoreUnavailable, TimeoutError) as exc:
            self.failed(exc)
            return self.unavailable(policy)
        if metrics is not None:
            metrics.limit_check.observe(time.perf_counter() - started)
        self.breaker.success()
        admitted, leases = bool(reply[0]), int(reply[1])
        counts = [(int(reply[2 + 2 * i]), int(reply[3 + 2 * i])) for i in range(len(spans))]
        headers = self._headers(policy, counts, spans)
        if admitted:
            if metrics is not None:
                metrics.admitted(policy)
            lease = request_id if policy.concurrency else None
            return Decision(admitted=True, policy=policy, headers=headers, lease=lease)
        waits = [
            (windows.wait_ms(limit, p, c, e, left), limit)
            for limit, (p, c), (e, left) in zip(policy.limits, counts, spans, strict=True)
            if not windows.admits(limit, p, c, e)
        ]
        if waits:
            wait, binding = max(waits, key=lambda w: w[0])
            if metrics is not None:
                metrics.refused(policy.name, binding.dimension.value)
            return Decision(
                admitted=False,
                policy=policy,
                binding=binding,
                dimension=binding.dimension,
                headers=headers,
                retry_after=max(1, math.ceil(wait / 1000)),
            )
        del leases  # refused by concurrency: a slot frees when a request ends
        if metrics is not None:
            metrics.refused(policy.name, Dimension.CONCURRENCY.value)
        return Decision(
            admitted=False,
            policy=policy,
            dimension=Dimension.CONCURRENCY,
            headers=headers,
            retry_after=1,
        )

    def failed(self, exc: BaseException) -> None:
        """A step of a limit check did not get its answer from Redis in time."""
        self.errors += 1
        self.breaker.failure()
        log.warning("limit check failed (%s); on_error=%s", type(exc).__name__, self.on_error)

    def unavailable(self, policy: Policy | None) -> Decision:
        return Decision(
            admitted=self.on_error == "allow", policy=policy, store_failed=True, retry_after=1
        )

    def _headers(
        self, policy: Policy, counts: list[tuple[int, int]], spans: list[tuple[int, int]]
    ) -> list[tuple[str, str]]:
        """OpenAI's x-ratelimit-* headers; per dimension, the limit with the least left."""
        tightest: dict[Dimension, tuple[float, Limit, int]] = {}
        for limit, (previous, current), (elapsed, left) in zip(
            policy.limits, counts, spans, strict=True
        ):
            remaining = max(0.0, limit.amount - windows.used(limit, previous, current, elapsed))
            reset = windows.reset_ms(limit, previous, current, left)
            best = tightest.get(limit.dimension)
            if best is None or remaining / limit.amount < best[0] / best[1].amount:
                tightest[limit.dimension] = (remaining, limit, reset)
        headers = []
        for dimension, (remaining, limit, reset) in tightest.items():
            name = _HEADER[dimension]
            if dimension is Dimension.COST:
                shown_limit = money.plain(limit.amount)
                shown_left = money.plain(int(remaining))
            else:
                shown_limit, shown_left = str(limit.amount), str(math.floor(remaining))
            headers += [
                (f"x-ratelimit-limit-{name}", shown_limit),
                (f"x-ratelimit-remaining-{name}", shown_left),
                (f"x-ratelimit-reset-{name}", windows.duration(reset)),
            ]
        return headers

    def charges(
        self, identity_id: str, policy: Policy | None, tokens: int, cost_nanos: int, at: float
    ) -> dict[str, tuple[int, int]]:
        """Bucket key -> (amount, lifetime s): what a finished request adds to the token and
        cost windows of its policy."""
        out: dict[str, tuple[int, int]] = {}
        if policy is None:
            return out
        now_ms = int(at * 1000)
        for limit in policy.limits:
            amount = {Dimension.TOKENS: tokens, Dimension.COST: cost_nanos}.get(limit.dimension)
            if not amount:
                continue
            current, _, _, left = self._buckets(identity_id, limit, now_ms)
            lifetime = 2 * limit.window_s + 1 if not limit.calendar else left // 1000 + 3600
            out[current] = (amount, lifetime)
        return out

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

        # One slot (the identity's hash tag), so one MGET, on a cluster too.
        def queue(pipe: Any) -> None:
            if keys:
                pipe.mget(keys)
            if policy.concurrency:
                pipe.zcount(self.keys.leases(identity_id), f"({now_ms}", "+inf")

        replies = await pipeline(self.client, queue) if keys or policy.concurrency else []
        values = [int(v or 0) for v in replies.pop(0)] if keys else []
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

    async def release(self, identity_id: str, lease: str) -> None:
        try:
            async with asyncio.timeout(self.timeout * 4):
                await call(self.client.zrem(self.keys.leases(identity_id), lease))
        except (StoreUnavailable, TimeoutError) as exc:
            # The lease expires by itself; until then it holds a slot.
            log.warning("concurrency slot not released (%s); it expires", type(exc).__name__)
