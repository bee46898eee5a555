"""A merged identity's limit windows, reservations and concurrency leases, added to its
survivor's (identity/merge.py), so that a merge never frees quota.

As usage/fold.py: read the merged identity's state, add it in the survivor's slot in one
script that marks the move there first (a second run adds nothing), delete it. The windows
moved are those of every limit of the policies in force (their current buckets, and the
previous one of a sliding window: the only ones an admission reads)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from sidecar.identity.merge import MergePlan
from sidecar.quota import windows
from sidecar.quota.live import LiveConfig
from sidecar.quota.policy import Limit
from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, pipeline

Clock = Callable[[], float]


def _limits(live: LiveConfig) -> list[Limit]:
    """One limit per window the policies in force keep (their key parts)."""
    found: dict[str, Limit] = {}
    for policy in live.policies:
        for limit in policy.limits:
            found.setdefault(limit.key_part, limit)
    return list(found.values())


def _flat(reply: Any) -> list[str]:
    """(member, score) pairs of a WITHSCORES reply as [member, score, ...] (RESP2 or 3)."""
    out: list[str] = []
    for member, score in reply:
        out += [member.decode(), str(int(float(score)))]
    return out


class LimitsMover:
    name = "limits"

    def __init__(
        self, client: RedisClient, keys: Keys, live: LiveConfig, clock: Clock = time.time
    ) -> None:
        self.client = client
        self.keys = keys
        self.live = live
        self.clock = clock
        self._fold = Script("sidecar.quota.lua", "fold")

    @property
    def scripts(self) -> list[Script]:
        return [self._fold]

    def _buckets(self, identity_id: str, now_ms: int) -> list[str]:
        out: list[str] = []
        for limit in _limits(self.live):
            current, previous, _, _ = windows.bucket(limit, now_ms)
            base = self.keys.limit(identity_id, limit.key_part)
            out += [base + current] + ([base + previous] if previous is not None else [])
        return out

    async def move(self, plan: MergePlan) -> None:
        merged, into = plan.merged_id, plan.into_id
        now_ms = int(self.clock() * 1000)
        theirs = self._buckets(merged, now_ms)
        ours = self._buckets(into, now_ms)
        held = [
            self.keys.reservations(merged),
            self.keys.reservations_expiry(merged),
            self.keys.leases(merged),
        ]

        def read(pipe: Any) -> None:
            for key in theirs:
                pipe.get(key)
                pipe.pttl(key)
            pipe.hgetall(held[0])
            pipe.zrange(held[1], 0, -1, withscores=True)
            pipe.zrange(held[2], 0, -1, withscores=True)
            for key in held:
                pipe.pttl(key)

        replies = await pipeline(self.client, read)
        counts = replies[: 2 * len(theirs)]
        reserved, expiry, leases, *lifetimes = replies[2 * len(theirs) :]
        keys = [
            self.keys.merged_into(into),
            self.keys.reservations(into),
            self.keys.reservations_expiry(into),
            self.keys.leases(into),
        ]
        moved = []
        for i, key in enumerate(ours):
            count, left = counts[2 * i], counts[2 * i + 1]
            if count and int(count) > 0:
                keys.append(key)
                moved.append([int(count), int(left)])
        # A reservation names the buckets it holds: the merged identity's become the
        # survivor's (same limit part and bucket, another hash tag).
        tag, our_tag = f"{{{merged}}}", f"{{{into}}}"
        entries: list[str] = []
        for request_id, entry in reserved.items():
            entries += [request_id.decode(), entry.decode().replace(tag, our_tag)]
        payload = {
            "b": moved,
            "r": entries,
            "x": _flat(expiry),
            "l": _flat(leases),
            "t": [int(left) for left in lifetimes],
        }
        await self._fold(self.client, keys, [f"{merged}:limits", msgspec.json.encode(payload)])

        def drop(pipe: Any) -> None:
            for key in [*theirs, *held]:
                pipe.delete(key)

        await pipeline(self.client, drop)
