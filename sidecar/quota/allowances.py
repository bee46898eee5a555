"""Quota a process holds ahead (`[limits] prefetch`): many admissions against one Redis exchange.

An admission that goes to Redis may ask, per limit, for an *allowance*, when a request of the same
identity was admitted by this process within `HOLD_S`, at Redis or from an allowance (a lone
request asks for none: an identity that calls now and then would only have its allowance given back
unused): up to `prefetch` requests' worth (what this request needs, times `prefetch`) counted in
the limit's current bucket at once, but never more than an eighth of what the limit has left (so
near a limit's edge there is none, and every request is checked at Redis). Later requests of the
same subjects are admitted from the allowances this process holds, with no exchange, when every one
of their limits has room in one; they count for every other sidecar already (the allowance is in
the bucket). What is left of an allowance goes back to its bucket when it has not been used or
topped up for `HOLD_S`, once it is `MAX_HOLD_S` old, when its bucket ends, or when the process
stops.

What this costs, and why it never over-admits:
- Units in an allowance were counted when the limit had room for them; spending them later in the
  same bucket of a sliding window cannot exceed the limit (the previous bucket only weighs less
  as time passes), and an allowance is never spent in a later bucket.
- Another sidecar can be refused while this one holds units it has not spent (at most an eighth
  of what was left, for at most `MAX_HOLD_S`): a limit admits at most its amount, and, for that
  moment, possibly less.
- A request's reservation is taken from an allowance, and its surplus returns to it; a request
  that used more than it reserved takes the difference from the allowance, or is charged at Redis
  before its response ends, as without allowances.
- A process that crashes leaves its unspent units counted until their window passes.
- A limit whose amount changes (a policy reload, a budget's update) stops using allowances
  taken under the old amount.
- A budget reset empties buckets that allowances were counted in: each process ends (`void`)
  what it holds in them when it sees the reset (the process that made it at once, the others
  at their next look at the budgets, within budgets.REFRESH_S), neither spending nor giving
  back any of it; a request it paid for is charged what it used, in full, when it ends. Until
  a process sees the reset, what it admits from those allowances counts nowhere (at most what
  it held), and what it is granted in the emptied buckets stays counted when ended unspent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from sidecar.quota.policy import Dimension, Limit

HOLD_S = 1.0  # an allowance neither used nor topped up for this long is given back
MAX_HOLD_S = 5.0  # and one held this long, however busy
SHARE = 8  # an allowance takes at most 1/SHARE of what its limit has left


class Allowance:
    """Units of one bucket that this process counted ahead and has not spent (`left`)."""

    __slots__ = (
        "amount",
        "current",
        "ends_ms",
        "index",
        "key",
        "left",
        "lifetime",
        "limit",
        "previous",
        "since",
        "starts_ms",
        "touched",
        "void",
    )

    def __init__(
        self, key: str, index: tuple[str, int], limit: Limit, span: tuple[int, int], lifetime: int
    ) -> None:
        self.key = key  # the bucket
        self.index = index  # (identity _id, id(limit)): how `find` looks it up
        self.limit = limit
        self.amount = limit.amount  # the limit's amount when it was granted
        self.starts_ms, self.ends_ms = span  # its bucket's
        self.lifetime = lifetime  # the bucket's lifetime (s), should a charge create it
        self.left = 0
        self.previous = 0  # the counts at the last exchange, `left` included in `current`
        self.current = 0
        self.touched = 0.0  # monotonic time of the last grant or use; 0: given back
        self.since = 0.0  # monotonic time of the first grant
        self.void = False  # ended by a reset of its bucket: nothing of it is given back


class Lent(NamedTuple):
    """What one token or cost limit of an admitted request took from an allowance."""

    allowance: Allowance
    dimension: Dimension
    reserved: int


class Allowances:
    """The allowances this process holds, by bucket key."""

    def __init__(self, prefetch: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.prefetch = prefetch
        self.clock = clock
        self.held: dict[str, Allowance] = {}
        # The same allowances by (identity _id, id(limit)): found without making the bucket's
        # key (the limit object is checked too, as an id can be reused once a policy is gone).
        self.by_limit: dict[tuple[str, int], Allowance] = {}
        # When a request of an identity (its _id) last went to Redis from this process, or was
        # admitted from its allowances (Limiter._admit_ahead notes it).
        self.asked: dict[str, float] = {}

    def wanted(self, identity_id: str) -> bool:
        """Whether a request of `identity_id` going to Redis asks for allowances: only when
        another went there, or was admitted from allowances, within HOLD_S (the identity is
        busy). Noted either way."""
        now = self.clock()
        last = self.asked.get(identity_id)
        self.asked[identity_id] = now
        return last is not None and now - last < HOLD_S

    def busy(self, identity_id: str, now: float) -> None:
        """A request of `identity_id` was admitted from its allowances at `now` (this clock's):
        when they run out or go back for their age, its next exchange asks for more (a lone
        request's would not, and the one after would go to Redis too)."""
        self.asked[identity_id] = now

    def find(self, identity_id: str, limit: Limit, now_ms: int, need: int) -> Allowance | None:
        """The allowance of `limit`'s current bucket for `identity_id`, when it can pay `need`."""
        allowance = self.by_limit.get((identity_id, id(limit)))
        if (
            allowance is None
            or allowance.limit is not limit
            or allowance.left < need
            or not allowance.starts_ms <= now_ms < allowance.ends_ms
        ):
            return None
        return allowance

    def usable(self, key: str, amount: int, need: int) -> Allowance | None:
        """The allowance of bucket `key` when it can pay `need` under the limit's `amount`."""
        allowance = self.held.get(key)
        if allowance is None or allowance.left < need or allowance.amount != amount:
            return None
        return allowance

    def granted(
        self,
        key: str,
        identity_id: str,
        limit: Limit,
        span: tuple[int, int],
        lifetime: int,
        grant: int,
        counts: tuple[int, int],
    ) -> list[tuple[str, int, int]]:
        """Record an admission's counts (previous, current) and what it was granted in bucket
        `key` of `limit` (its `span`: start and end, ms); (bucket, units, lifetime) to give
        back: an allowance taken under another amount."""
        back: list[tuple[str, int, int]] = []
        allowance = self.held.get(key)
        if allowance is not None and allowance.amount != limit.amount:
            back += self._drop(allowance)
            allowance = None
        if allowance is None:
            if not grant:
                return back
            index = (identity_id, id(limit))
            allowance = self.held[key] = Allowance(key, index, limit, span, lifetime)
        elif allowance.limit is not limit:  # the same limit, from a policy loaded again
            self.by_limit.pop(allowance.index, None)
            allowance.limit, allowance.index = limit, (identity_id, id(limit))
        self.by_limit[allowance.index] = allowance
        allowance.previous, allowance.current = counts
        if grant:
            allowance.left += grant
            allowance.touched = self.clock()
            if not allowance.since:
                allowance.since = allowance.touched
        return back

    def due(
        self, now_ms: int, everything: bool = False, only: set[str] | None = None
    ) -> list[tuple[str, int, int]]:
        """Take out the allowances to give back (idle for `HOLD_S`, held `MAX_HOLD_S`, their
        bucket ended, or `everything`; or those of the buckets `only`): (bucket, units left,
        lifetime) for those with units left."""
        now = self.clock()
        idle, old = now - HOLD_S, now - MAX_HOLD_S
        if only is None:  # identities not admitted for HOLD_S are not busy any more
            self.asked = {key: at for key, at in self.asked.items() if at >= idle}
        back = []
        held = self.held
        for key in list(held) if only is None else [key for key in only if key in held]:
            allowance = held[key]
            if (
                everything
                or only is not None
                or allowance.touched < idle
                or allowance.since < old
                or allowance.ends_ms <= now_ms
            ):
                back += self._drop(allowance)
        return back

    def void(self, keys: list[str]) -> None:
        """End the allowances of buckets a reset emptied: what they hold was counted there, so
        none of it is spent any more, nor given back (see the module)."""
        for key in keys:
            allowance = self.held.get(key)
            if allowance is not None:
                self._drop(allowance)
                allowance.void = True

    def _drop(self, allowance: Allowance) -> list[tuple[str, int, int]]:
        """Stop holding an allowance; what it has left, to give back."""
        del self.held[allowance.key]
        if self.by_limit.get(allowance.index) is allowance:
            del self.by_limit[allowance.index]
        allowance.touched = 0.0
        left, allowance.left = allowance.left, 0
        return [(allowance.key, left, allowance.lifetime)] if left else []
