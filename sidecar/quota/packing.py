"""How one admit.lua call is packed: its keys and arguments, for some subjects; and the
x-ratelimit-* headers read back from its counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sidecar import money
from sidecar.quota import windows
from sidecar.quota.allowances import Allowance
from sidecar.quota.decision import Decision, Reserve, Rows, Subject
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


def headers_of(decision: Decision) -> list[tuple[bytes, bytes]]:
    """A decision's x-ratelimit-* headers, worked out now when they were left for later."""
    rows = decision.rows
    if rows is not None:
        decision.headers = rate_headers(rows)
        decision.rows = None
    return decision.headers


def rate_headers(rows: Rows) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers, as the HTTP server takes them; per dimension, the limit
    with the least left (of every subject's). On every limited response, so what a limit's
    headers need besides its counts is worked out once per limit (`_Shown`), and the window
    math of windows.used and windows.reset_ms is inlined (as calls, a third of the time)."""
    # Per dimension slot (requests, tokens, cost): (remaining, amount, reset ms, shown).
    tightest: list[tuple[float, int, int, _Shown] | None] = [None, None, None]
    for _, limit, previous, current, elapsed, left in rows:
        shown = _SHOWN.get(id(limit))
        if shown is None or shown.limit is not limit:
            shown = _show(limit)
        window = shown.window_ms
        if window:  # sliding
            used = previous * (window - elapsed) / window + current
            reset = left + window if current else (left if previous else 0)
        else:
            used = current
            reset = left if current else 0
        amount = limit.amount
        remaining = amount - used
        if remaining < 0:
            remaining = 0
        best = tightest[shown.slot]
        if best is None or remaining * best[1] < best[0] * amount:
            tightest[shown.slot] = (remaining, amount, reset, shown)
    headers: list[tuple[bytes, bytes]] = []
    for found in tightest:
        if found is not None:
            remaining, _, reset, shown = found
            left_text = (
                money.plain(int(remaining)).encode() if shown.cost else b"%d" % remaining
            )  # floor: never negative
            headers += (
                shown.limit_header,
                (shown.remaining_name, left_text),
                (shown.reset_name, windows.duration(reset).encode()),
            )
    return headers


class _Shown(NamedTuple):
    """What a limit's x-ratelimit-* headers need besides its counts."""

    limit: Limit
    slot: int  # its dimension's place among the headers: requests, tokens, cost
    cost: bool  # its remaining amount is shown in dollars
    window_ms: int  # a sliding window's length; 0 for a calendar window
    limit_header: tuple[bytes, bytes]  # x-ratelimit-limit-*, and the amount as shown
    remaining_name: bytes
    reset_name: bytes


_SLOT = {Dimension.REQUESTS: 0, Dimension.TOKENS: 1, Dimension.COST: 2}
_SHOWN: dict[int, _Shown] = {}  # id(limit) -> its _Shown (the limit is checked too)


def _show(limit: Limit) -> _Shown:
    if len(_SHOWN) > 4096:  # policies reloaded many times: start again
        _SHOWN.clear()
    dimension = limit.dimension
    cost = dimension is Dimension.COST
    amount = money.plain(limit.amount) if cost else str(limit.amount)
    name = HEADER[dimension].encode()
    shown = _SHOWN[id(limit)] = _Shown(
        limit,
        _SLOT[dimension],
        cost,
        0 if limit.calendar is not None else limit.window_s * 1000,
        (b"x-ratelimit-limit-" + name, amount.encode()),
        b"x-ratelimit-remaining-" + name,
        b"x-ratelimit-reset-" + name,
    )
    return shown


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
