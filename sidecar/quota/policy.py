from __future__ import annotations

import enum
import fnmatch
import functools
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import limits
import msgspec

from sidecar.money import from_usd as nanos_from_usd


class Dimension(enum.Enum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    COST = "cost"
    CONCURRENCY = "concurrency"

    # Hashed as the singletons they are: Enum's own __hash__ is a Python-level call (3x a dict
    # lookup's cost), and members key dicts on every request's path.
    __hash__ = object.__hash__


class Limit(msgspec.Struct, frozen=True, dict=True):
    """One limit of one policy: `amount` per window.

    Windows up to an hour slide (a weighted pair of fixed buckets); `day` and `month` are
    calendar windows in UTC, because budgets are read against invoices and calendars: a
    finance team's "$50 a day" resets at midnight UTC, and "$500 a month" on the 1st. Runtime
    budgets also count by `week` (from Monday), `year`, and `once` (a credit that never
    resets): see quota.windows.CALENDARS."""

    dimension: Dimension
    amount: int  # requests, tokens, or nano-dollars for cost
    window_s: int  # seconds, for sliding windows; the calendar unit's nominal length otherwise
    calendar: str | None  # a calendar window's name (windows.CALENDARS), else None
    text: str  # as written in the policy ("600/minute", "0.50/day")

    @functools.cached_property
    def key_part(self) -> str:
        # Not the amount: changing 5/minute to 10/minute keeps the window's count. Worked out
        # once per limit (`dict=True` gives the struct the __dict__ this keeps it in): a
        # request's admission at Redis reads it for every limit.
        return f"{self.dimension.value[0]}:{self.calendar or self.window_s}"


class Match(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tags: list[str] = msgspec.field(default_factory=list)
    metadata: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    ids: list[str] = msgspec.field(default_factory=list)

    def holds(self, external_id: str, tags: Sequence[str], metadata: Mapping[str, Any]) -> bool:
        """Every criterion given holds: any of the tags, all metadata pairs, any id glob."""
        if self.tags and not any(t in self.tags for t in tags):
            return False
        for key, value in self.metadata.items():
            if (
                key not in metadata
                or metadata[key] != value
                or type(metadata[key]) is not type(value)
            ):
                return False
        return not self.ids or any(fnmatch.fnmatchcase(external_id, g) for g in self.ids)

    @property
    def empty(self) -> bool:
        return not (self.tags or self.metadata or self.ids)


class Policy(msgspec.Struct, frozen=True):
    name: str
    match: Match
    limits: tuple[Limit, ...]
    concurrency: int | None
    source: str  # file it came from
    # Worked out from the fields above when the policy is made: read on every request's path.
    # limited: some limit applies. charged: a token or cost limit applies, so a request's usage
    # is settled before its response ends (Limiter.settle), not written behind.
    limited: bool = False
    charged: bool = False

    def __post_init__(self) -> None:
        limited = bool(self.limits) or self.concurrency is not None
        charged = any(limit.dimension is not Dimension.REQUESTS for limit in self.limits)
        msgspec.structs.force_setattr(self, "limited", limited)
        msgspec.structs.force_setattr(self, "charged", charged)


class RawPolicy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    match: Match | None = None
    requests: list[str] = msgspec.field(default_factory=list)
    tokens: list[str] = msgspec.field(default_factory=list)
    cost_usd: list[str] = msgspec.field(default_factory=list)
    concurrency: int | None = None


class PolicyFile(msgspec.Struct, forbid_unknown_fields=True):
    policy: list[RawPolicy] = msgspec.field(default_factory=list)


class LimitError(ValueError):
    pass


_COST = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/|per)\s*(.+?)\s*", re.IGNORECASE)
_CALENDAR = {"day", "month"}


def parse_limit(dimension: Dimension, text: str) -> Limit:
    """'600/minute', '10 per 2 hours', '2000000/hour'; for cost, dollars: '0.50/day'."""
    if dimension is Dimension.COST:
        match = _COST.fullmatch(text)
        if match is None:
            raise LimitError(f"{text!r} is not a limit such as '0.50/day'")
        try:
            nanos = nanos_from_usd(Decimal(match.group(1)))
        except InvalidOperation:
            nanos = None
        if nanos is None:
            raise LimitError(f"{text!r}: the amount is not a number of dollars")
        amount, rest = nanos, match.group(2)
    else:
        amount, rest = -1, ""
    try:
        item = limits.parse(f"1/{rest}" if dimension is Dimension.COST else text)
    except ValueError:
        raise LimitError(f"{text!r} is not a limit such as '600/minute'") from None
    if dimension is not Dimension.COST:
        amount = item.amount
    if amount <= 0:
        raise LimitError(f"{text!r}: the amount must be positive")
    granularity = item.GRANULARITY.name
    calendar = granularity if granularity in _CALENDAR else None
    if calendar and item.multiples != 1:
        raise LimitError(f"{text!r}: calendar windows (day, month) take no multiple")
    if granularity == "year":
        raise LimitError(f"{text!r}: the longest window is a month")
    return Limit(dimension, amount, item.get_expiry(), calendar, text.strip())


BUDGET_PREFIX = "budget:"  # the names of runtime budgets' policies (sidecar.budgets)


def build(raw: RawPolicy, source: str) -> Policy:
    """A checked policy; LimitError names the key at fault."""
    if not raw.name.strip() or len(raw.name) > 64 or not raw.name.isprintable():
        raise LimitError("name: 1-64 printable characters")
    if raw.name.strip().startswith(BUDGET_PREFIX):
        raise LimitError(f"name: {BUDGET_PREFIX!r} starts the names of runtime budgets")
    parsed: list[Limit] = []
    for dimension, texts in (
        (Dimension.REQUESTS, raw.requests),
        (Dimension.TOKENS, raw.tokens),
        (Dimension.COST, raw.cost_usd),
    ):
        key = "cost_usd" if dimension is Dimension.COST else dimension.value
        for text in texts:
            try:
                limit = parse_limit(dimension, text)
            except LimitError as exc:
                raise LimitError(f"{key}: {exc}") from None
            if any(p.key_part == limit.key_part for p in parsed):
                raise LimitError(f"{key}: two limits over the same window ({text!r})")
            parsed.append(limit)
    if raw.concurrency is not None and not 1 <= raw.concurrency <= 100_000:
        raise LimitError("concurrency: must be 1-100000")
    return Policy(raw.name.strip(), raw.match or Match(), tuple(parsed), raw.concurrency, source)


def choose(
    policies: Sequence[Policy], external_id: str, tags: Sequence[str], metadata: Mapping[str, Any]
) -> Policy | None:
    """The first policy whose match holds."""
    for policy in policies:
        if policy.match.holds(external_id, tags, metadata):
            return policy
    return None
