"""Runtime budgets: the record, its checks (each error names the field), the policy its limits
make, and how much of it a reading of its buckets says is used."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

from sidecar import money
from sidecar.identity import model as identity_model
from sidecar.identity.model import InvalidField, rfc3339
from sidecar.quota import windows
from sidecar.quota.policy import BUDGET_PREFIX, Dimension, Limit, Match, Policy

Kind = Literal["identity", "tag", "api_key_owner"]
Period = Literal["daily", "weekly", "monthly", "yearly", "one_time"]

KINDS: tuple[Kind, ...] = ("identity", "tag", "api_key_owner")
# A period's calendar window (quota.windows) and the unit its limits are written with.
CALENDAR: dict[str, str] = {
    "daily": "day",
    "weekly": "week",
    "monthly": "month",
    "yearly": "year",
    "one_time": "once",
}
UNIT = {"daily": "day", "weekly": "week", "monthly": "month", "yearly": "year"}
ONE_TIME = "one_time"
MAX_ALERTS = 10
MAX_TOKENS = 10**15
MAX_RPM = 10**9
POLICY_SOURCE = "budget"


class Scope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Kind
    target: str


class Alert(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    threshold_percent: int


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A budget as stored: money in nano-dollars, times in ms since the epoch."""

    id: str
    scope: Scope
    period: Period = "monthly"
    amount_nanos: int | None = None
    token_limit: int | None = None
    requests_per_minute: int | None = None
    thresholds: tuple[int, ...] = ()  # alert thresholds, percent, ascending
    is_active: bool = True
    expires_ms: int | None = None
    created_ms: int
    updated_ms: int

    def live(self, now_ms: int) -> bool:
        """Active and not expired: it gates requests."""
        return self.is_active and (self.expires_ms is None or now_ms < self.expires_ms)


# -- what the API takes --------------------------------------------------------------------


class BudgetCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    scope: Scope
    period: Period = "monthly"
    amount_usd: float | None = None
    token_limit: int | None = None
    requests_per_minute: int | None = None
    alerts: list[Alert] = msgspec.field(default_factory=list)
    is_active: bool = True
    expires_at: str | None = None


class BudgetPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Only the fields sent change; `null` removes a limit or the expiry."""

    scope: Scope | UnsetType = UNSET  # may be sent, unchanged
    period: Period | UnsetType = UNSET
    amount_usd: float | UnsetType | None = UNSET
    token_limit: int | UnsetType | None = UNSET
    requests_per_minute: int | UnsetType | None = UNSET
    alerts: list[Alert] | UnsetType = UNSET
    is_active: bool | UnsetType = UNSET
    expires_at: str | UnsetType | None = UNSET


# -- what the API shows --------------------------------------------------------------------


class Consumption(msgspec.Struct, kw_only=True):
    cost_usd: float | None  # None: the budget sets no amount, so its cost is not counted
    tokens: int | None  # None: the budget sets no token limit
    period_start: str | None  # one_time: when the budget was created
    resets_at: str | None  # one_time: never (None)


class BudgetView(msgspec.Struct, kw_only=True):
    id: str = msgspec.field(name="_id")
    scope: Scope
    period: Period
    amount_usd: float | None
    token_limit: int | None
    requests_per_minute: int | None
    alerts: list[Alert]
    is_active: bool
    expires_at: str | None
    created: str
    updated: str
    consumption: Consumption | UnsetType = UNSET


class Used(msgspec.Struct, frozen=True, kw_only=True):
    """A budget's current period, read from its buckets."""

    cost_nanos: int | None
    tokens: int | None
    period: str  # the period's bucket name (changes at each rollover)
    start_ms: int
    end_ms: int | None  # None: one_time, never resets


# -- checks ----------------------------------------------------------------------------------


def _target(scope: Scope) -> Scope:
    if scope.kind == "tag":
        target = identity_model.tag(scope.target, "scope.target")
    else:
        target = identity_model.external_id(scope.target, "scope.target")
    return Scope(scope.kind, target)


def _nanos(value: float | None) -> int | None:
    if value is None:
        return None
    nanos = money.from_number(value)
    if nanos is None or nanos <= 0:
        raise InvalidField("amount_usd", "amount_usd must be a positive number of dollars")
    return nanos


def _count(param: str, value: int | None, highest: int) -> int | None:
    if value is not None and not 1 <= value <= highest:
        raise InvalidField(param, f"{param} must be 1-{highest}")
    return value


def _thresholds(alerts: list[Alert]) -> tuple[int, ...]:
    if len(alerts) > MAX_ALERTS:
        raise InvalidField("alerts", f"alerts: at most {MAX_ALERTS}")
    for i, alert in enumerate(alerts):
        if not 1 <= alert.threshold_percent <= 100:
            raise InvalidField(f"alerts[{i}].threshold_percent", "threshold_percent must be 1-100")
    return tuple(sorted({a.threshold_percent for a in alerts}))


def parse_time(param: str, text: str) -> int:
    """An RFC 3339 time with its offset (`Z` or `+hh:mm`), as ms since the epoch."""
    problem = InvalidField(param, f"{param} must be an RFC 3339 time such as 2027-01-01T00:00:00Z")
    if len(text) > 64:
        raise problem
    try:
        when = datetime.fromisoformat(text.strip())
        if when.tzinfo is None:
            raise problem
        # Out of range once moved to UTC (year 1 with a positive offset, 9999 with a negative).
        return int(when.astimezone(UTC).timestamp() * 1000)
    except (ValueError, OverflowError):
        raise problem from None


def _expiry(text: str | None, now_ms: int) -> int | None:
    if text is None:
        return None
    expires = parse_time("expires_at", text)
    if expires <= now_ms:
        raise InvalidField("expires_at", "expires_at must be in the future")
    return expires


def _limited(budget: Budget) -> Budget:
    if (
        budget.amount_nanos is None
        and budget.token_limit is None
        and (budget.requests_per_minute is None)
    ):
        raise InvalidField(
            "amount_usd", "set at least one of amount_usd, token_limit, requests_per_minute"
        )
    return budget


def created(data: BudgetCreate, *, budget_id: str, now_ms: int) -> Budget:
    """A new budget from a create request; InvalidField names the field at fault."""
    return _limited(
        Budget(
            id=budget_id,
            scope=_target(data.scope),
            period=data.period,
            amount_nanos=_nanos(data.amount_usd),
            token_limit=_count("token_limit", data.token_limit, MAX_TOKENS),
            requests_per_minute=_count("requests_per_minute", data.requests_per_minute, MAX_RPM),
            thresholds=_thresholds(data.alerts),
            is_active=data.is_active,
            expires_ms=_expiry(data.expires_at, now_ms),
            created_ms=now_ms,
            updated_ms=now_ms,
        )
    )


def patched(budget: Budget, data: BudgetPatch, now_ms: int) -> tuple[Budget, bool]:
    """The budget with a patch applied, and whether its alerts re-arm (a changed amount or
    token limit); InvalidField names the field at fault."""
    if data.scope is not UNSET and _target(data.scope) != budget.scope:
        raise InvalidField("scope", "scope cannot be changed; create a new budget")
    changes: dict[str, object] = {"updated_ms": now_ms}
    if data.period is not UNSET:
        changes["period"] = data.period
    if data.amount_usd is not UNSET:
        changes["amount_nanos"] = _nanos(data.amount_usd)
    if data.token_limit is not UNSET:
        changes["token_limit"] = _count("token_limit", data.token_limit, MAX_TOKENS)
    if data.requests_per_minute is not UNSET:
        rpm = _count("requests_per_minute", data.requests_per_minute, MAX_RPM)
        changes["requests_per_minute"] = rpm
    if data.alerts is not UNSET:
        changes["thresholds"] = _thresholds(data.alerts)
    if data.is_active is not UNSET:
        changes["is_active"] = data.is_active
    if data.expires_at is not UNSET:
        changes["expires_ms"] = _expiry(data.expires_at, now_ms)
    after = _limited(msgspec.structs.replace(budget, **changes))
    rearm = (after.amount_nanos, after.token_limit) != (budget.amount_nanos, budget.token_limit)
    return after, rearm


# -- the policy its limits make ----------------------------------------------------------------


def as_policy(budget: Budget) -> Policy:
    """The budget's limits as a policy: the amount and the token limit per period (a calendar
    window, or one bucket for ever), requests per sliding minute."""
    calendar = CALENDAR[budget.period]
    length = windows.CALENDARS[calendar]
    unit = UNIT.get(budget.period, ONE_TIME)
    limits: list[Limit] = []
    if budget.amount_nanos is not None:
        text = f"{money.plain(budget.amount_nanos)}/{unit}"
        limits.append(Limit(Dimension.COST, budget.amount_nanos, length, calendar, text))
    if budget.token_limit is not None:
        text = f"{budget.token_limit}/{unit}"
        limits.append(Limit(Dimension.TOKENS, budget.token_limit, length, calendar, text))
    if budget.requests_per_minute:
        rpm = budget.requests_per_minute
        limits.append(Limit(Dimension.REQUESTS, rpm, 60, None, f"{rpm}/minute"))
    return Policy(BUDGET_PREFIX + budget.id, Match(), tuple(limits), None, POLICY_SOURCE)


def period(budget: Budget, now_ms: int) -> tuple[str, int, int | None]:
    """The budget's current period: its bucket name, start and end (ms; None: never ends)."""
    name, start_ms, end_ms = windows.calendar(CALENDAR[budget.period], now_ms)
    if budget.period == ONE_TIME:
        return name, budget.created_ms, None
    return name, start_ms, end_ms


def crossed(budget: Budget, used: Used) -> list[int]:
    """The alert thresholds the budget's cost or tokens are at or over."""
    out = []
    for threshold in budget.thresholds:
        cost = (
            budget.amount_nanos is not None
            and used.cost_nanos is not None
            and (used.cost_nanos * 100 >= budget.amount_nanos * threshold)
        )
        tokens = (
            budget.token_limit is not None
            and used.tokens is not None
            and (used.tokens * 100 >= budget.token_limit * threshold)
        )
        if cost or tokens:
            out.append(threshold)
    return out


def share(budget: Budget, used: Used) -> float:
    """The largest part of its amount or token limit the budget has used (0 to 1 and over)."""
    parts = [0.0]
    if budget.amount_nanos and used.cost_nanos is not None:
        parts.append(used.cost_nanos / budget.amount_nanos)
    if budget.token_limit and used.tokens is not None:
        parts.append(used.tokens / budget.token_limit)
    return max(parts)


# -- views ---------------------------------------------------------------------------------------


def consumption(used: Used) -> Consumption:
    return Consumption(
        cost_usd=None if used.cost_nanos is None else money.dollars(used.cost_nanos),
        tokens=used.tokens,
        period_start=rfc3339(used.start_ms),
        resets_at=None if used.end_ms is None else rfc3339(used.end_ms),
    )


def view(budget: Budget, used: Used | None = None) -> BudgetView:
    return BudgetView(
        id=budget.id,
        scope=budget.scope,
        period=budget.period,
        amount_usd=None if budget.amount_nanos is None else money.dollars(budget.amount_nanos),
        token_limit=budget.token_limit,
        requests_per_minute=budget.requests_per_minute,
        alerts=[Alert(t) for t in budget.thresholds],
        is_active=budget.is_active,
        expires_at=None if budget.expires_ms is None else rfc3339(budget.expires_ms),
        created=rfc3339(budget.created_ms),
        updated=rfc3339(budget.updated_ms),
        consumption=UNSET if used is None else consumption(used),
    )


def unused(budget: Budget, now_ms: int) -> Used:
    """A budget's current period with nothing counted in it (a budget just created)."""
    name, start_ms, end_ms = period(budget, now_ms)
    return Used(
        cost_nanos=None if budget.amount_nanos is None else 0,
        tokens=None if budget.token_limit is None else 0,
        period=name,
        start_ms=start_ms,
        end_ms=end_ms,
    )
