"""How one admit.lua call is packed: its keys and arguments, for some subjects; and the
x-ratelimit-* headers read back from its counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar import money
from sidecar.quota import windows
from sidecar.quota.allowances import Allowance
from sidecar.quota.decision import Decision, Reserve, Subject
from sidecar.quota.policy import Dimension, Limit

# How admit.lua is told each limit's dimension; the script's prelude gets them from here.
KIND = {Dimension.REQUESTS: "r", Dimension.TOKENS: "t", Dimension.COST: "c"}
PRELUDE = "".join(f"local {d.name} = '{code}'\n" for d, code in KIND.items())
HEADER = {Dimension.REQUESTS: "requests", Dimension.TOKENS: "tokens", Dimension.COST: "cost"}


class Packed:
    """One admit.lua call's keys and arguments, for some subjects."""

    __slots__ = (
        "args",
        "caps",
        "keys",
        "leases",
        "lifetimes",
        "limits",
        "packed",
        "paid",
        "prepaid",
        "reserves",
        "reserving",
        "spans",
        "subjects",
    )

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.reserves: list[int] = []  # per limit: what the request reserves of it
        self.reserving: list[Subject] = []  # subjects that reserve (their reservations keys)
        self.packed: list[str] = []
        self.spans: list[tuple[int, int]] = []  # per limit: (elapsed, left) ms
        self.lifetimes: list[int] = []  # per limit: its current bucket's lifetime (s)
        self.prepaid: list[int] = []  # per limit: what an allowance paid of it (0: none)
        self.paid: list[tuple[Allowance, int]] = []  # the allowances that paid, and how much
        self.limits: list[tuple[Subject, Limit]] = []
        self.caps: list[str] = []
        self.leases: list[tuple[Subject, str]] = []  # (subject, its lease set key)
        self.subjects: list[Subject] = []
        self.args: list[Any] = []

    def leased(self, request_id: str) -> list[tuple[str, str]]:
        """The concurrency slots an admission took: (identity _id, lease) per lease set."""
        return [(subject.identity_id, request_id) for subject, _ in self.leases]

    def request_buckets(self) -> list[str]:
        """The buckets an admission counts one request in."""
        return [
            self.keys[2 * i]
            for i, (_, limit) in enumerate(self.limits)
            if limit.dimension is Dimension.REQUESTS
        ]


def rate_headers(
    rows: list[tuple[Subject, Limit, int, int, int, int]],
) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers, as the HTTP server takes them; per dimension, the limit
    with the least left (of every subject's). On every limited response: the window math of
    windows.used and windows.reset_ms, inlined (a third of this function's time as calls), and
    the dimensions told apart by identity (a dict keyed by them costs more than the math)."""
    # Per dimension (requests, tokens, cost): (remaining, limit, reset ms) of the tightest.
    tightest: list[tuple[float, Limit, int] | None] = [None, None, None]
    for _, limit, previous, current, elapsed, left in rows:
        if limit.calendar is None:
            window = limit.window_s * 1000
            used = previous * (window - elapsed) / window + current
            reset = left + window if current else (left if previous else 0)
        else:
            used = current
            reset = left if current else 0
        amount = limit.amount
        remaining = amount - used
        if remaining < 0:
            remaining = 0.0
        dimension = limit.dimension
        i = 0 if dimension is Dimension.REQUESTS else 1 if dimension is Dimension.TOKENS else 2
        best = tightest[i]
        if best is None or remaining * best[1].amount < best[0] * amount:
            tightest[i] = (remaining, limit, reset)
    headers = []
    for i, found in enumerate(tightest):
        if found is None:
            continue
        remaining, limit, reset = found
        names, shown_limit = _shown(limit)
        headers.append((names[0], shown_limit))
        if i == 2:  # cost: dollars
            headers.append((names[1], money.plain(int(remaining)).encode()))
        else:
            headers.append((names[1], b"%d" % remaining))  # floor: never negative
        headers.append((names[2], windows.duration(reset).encode()))
    return headers


def headers_of(decision: Decision) -> list[tuple[bytes, bytes]]:
    """A decision's x-ratelimit-* headers: an admission from allowances left its figures
    (`rows`), worked out here on first use."""
    rows = decision.rows
    if rows is not None:
        decision.headers, decision.rows = rate_headers(rows), None
    return decision.headers


_NAMES = {
    dimension: (
        b"x-ratelimit-limit-" + name.encode(),
        b"x-ratelimit-remaining-" + name.encode(),
        b"x-ratelimit-reset-" + name.encode(),
    )
    for dimension, name in HEADER.items()
}
_SHOWN: dict[int, tuple[Limit, tuple[bytes, bytes, bytes], bytes]] = {}  # id(limit) -> ...


def _shown(limit: Limit) -> tuple[tuple[bytes, bytes, bytes], bytes]:
    """A limit's header names and its amount as shown: worked out once per limit."""
    cached = _SHOWN.get(id(limit))
    if cached is None or cached[0] is not limit:
        if len(_SHOWN) > 4096:  # policies reloaded many times: start again
            _SHOWN.clear()
        amount = limit.amount
        shown = money.plain(amount) if limit.dimension is Dimension.COST else str(amount)
        cached = _SHOWN[id(limit)] = (limit, _NAMES[limit.dimension], shown.encode())
    return cached[1], cached[2]


def reserved(limit: Limit, reserve: Reserve | None) -> int:
    """What a request reserves of one limit: its estimate, but never more than the whole limit
    (a request estimated above it is admitted into an empty window, and may overshoot by its
    estimate's error, as any request may)."""
    if reserve is None:
        return 0
    if limit.dimension is Dimension.TOKENS:
        return min(limit.amount, max(0, reserve.tokens))
    if limit.dimension is Dimension.COST:
        return min(limit.amount, max(0, reserve.nanos))
    return 0


def covered(subjects: Sequence[Subject], reserve: Reserve | None, tokens: int, nanos: int) -> bool:
    """Whether what a request reserved at admission is at least what it used, in every token
    and cost limit of `subjects`: its reservation then already counts it in full."""
    if reserve is None:
        return False
    for subject in subjects:
        for limit in subject.policy.limits:
            if limit.dimension is Dimension.TOKENS and reserved(limit, reserve) < tokens:
                return False
            if limit.dimension is Dimension.COST and reserved(limit, reserve) < nanos:
                return False
    return True
