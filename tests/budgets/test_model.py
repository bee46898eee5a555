"""The budget record: checks that name the field, the policy its limits make, periods,
thresholds crossed."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from sidecar.budgets import model
from sidecar.budgets.model import Budget, BudgetCreate, BudgetPatch, Scope, Used
from sidecar.identity.model import InvalidField, rfc3339
from sidecar.quota import windows
from sidecar.quota.policy import Dimension

NOW = int(datetime(2026, 12, 2, 13, 0, tzinfo=UTC).timestamp() * 1000)
ID = "01JDQ6ZK3N4X8V2B7C9D0E1F2G"


def create(**fields: object) -> BudgetCreate:
    raw = {"scope": {"kind": "identity", "target": "user_123"}, **fields}
    return msgspec.convert(raw, BudgetCreate)


def made(**fields: object) -> Budget:
    return model.created(create(**fields), budget_id=ID, now_ms=NOW)


def test_a_budget_as_the_spec_shows_it() -> None:
    budget = made(
        period="monthly",
        amount_usd=50.0,
        token_limit=2_000_000,
        requests_per_minute=60,
        alerts=[{"threshold_percent": 100}, {"threshold_percent": 80}, {"threshold_percent": 80}],
    )
    assert budget.amount_nanos == 50 * 10**9
    assert budget.thresholds == (80, 100)
    view = msgspec.to_builtins(model.view(budget, model.unused(budget, NOW)))
    assert view == {
        "_id": ID,
        "scope": {"kind": "identity", "target": "user_123"},
        "period": "monthly",
        "amount_usd": 50.0,
        "token_limit": 2_000_000,
        "requests_per_minute": 60,
        "alerts": [{"threshold_percent": 80}, {"threshold_percent": 100}],
        "is_active": True,
        "expires_at": None,
        "created": "2026-12-02T13:00:00Z",
        "updated": "2026-12-02T13:00:00Z",
        "consumption": {
            "cost_usd": 0.0,
            "tokens": 0,
            "period_start": "2026-12-01T00:00:00Z",
            "resets_at": "2027-01-01T00:00:00Z",
        },
    }


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({}, "amount_usd"),  # no limit at all
        ({"amount_usd": 0}, "amount_usd"),
        ({"amount_usd": -5.0}, "amount_usd"),
        ({"amount_usd": 1e30}, "amount_usd"),
        ({"token_limit": 0}, "token_limit"),
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": 10**10}, "requests_per_minute"),
        ({"amount_usd": 1, "alerts": [{"threshold_percent": 0}]}, "alerts[0].threshold_percent"),
        ({"amount_usd": 1, "alerts": [{"threshold_percent": 101}]}, "alerts[0].threshold_percent"),
        ({"amount_usd": 1, "alerts": [{"threshold_percent": p} for p in range(1, 12)]}, "alerts"),
        ({"amount_usd": 1, "expires_at": "tomorrow"}, "expires_at"),
        ({"amount_usd": 1, "expires_at": "2027-01-01T00:00:00"}, "expires_at"),  # no offset
        ({"amount_usd": 1, "expires_at": "2026-01-01T00:00:00Z"}, "expires_at"),  # past
        ({"amount_usd": 1, "expires_at": "9999-12-31T23:59:59-23:59"}, "expires_at"),
        ({"amount_usd": 1, "expires_at": "0001-01-01T00:00:00+01:00"}, "expires_at"),
        ({"amount_usd": 1, "scope": {"kind": "identity", "target": " "}}, "scope.target"),
        ({"amount_usd": 1, "scope": {"kind": "tag", "target": "x" * 65}}, "scope.target"),
        (
            {"amount_usd": 1, "scope": {"kind": "api_key_owner", "target": "a\u202eb"}},
            "scope.target",
        ),
    ],
)
def test_bad_input_names_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidField) as caught:
        made(**fields)
    assert caught.value.param == param


def test_the_policy_of_a_budget() -> None:
    policy = model.as_policy(
        made(period="weekly", amount_usd=12.5, token_limit=1000, requests_per_minute=60)
    )
    assert policy.name == f"budget:{ID}" and policy.limited and policy.concurrency is None
    cost, tokens, requests = policy.limits
    assert (cost.dimension, cost.amount, cost.calendar, cost.text) == (
        Dimension.COST, 12_500_000_000, "week", "12.5/week",
    )  # fmt: skip
    assert (tokens.dimension, tokens.amount, tokens.calendar, tokens.text) == (
        Dimension.TOKENS, 1000, "week", "1000/week",
    )  # fmt: skip
    assert (requests.amount, requests.window_s, requests.calendar, requests.text) == (
        60, 60, None, "60/minute",
    )  # fmt: skip
    one_time = model.as_policy(made(period="one_time", amount_usd=5))
    assert one_time.limits[0].calendar == "once" and one_time.limits[0].text == "5/one_time"
    assert one_time.limits[0].window_s == windows.CALENDARS["once"]


def test_periods() -> None:
    assert model.period(made(period="daily", amount_usd=1), NOW)[1:] == (
        NOW - 13 * 3_600_000, NOW + 11 * 3_600_000,
    )  # fmt: skip
    name, start, end = model.period(made(period="yearly", amount_usd=1), NOW)
    assert name == "2026" and rfc3339(start) == "2026-01-01T00:00:00Z"
    assert end is not None and rfc3339(end) == "2027-01-01T00:00:00Z"
    # A one-time budget's period starts when it was made and never ends.
    assert model.period(made(period="one_time", amount_usd=1), NOW + 5) == ("0", NOW, None)


def test_thresholds_cross_on_cost_or_tokens() -> None:
    budget = made(
        amount_usd=10, token_limit=1000, alerts=[{"threshold_percent": p} for p in (50, 80, 100)]
    )

    def used(cost_usd: float, tokens: int) -> Used:
        return Used(
            cost_nanos=int(cost_usd * 10**9), tokens=tokens, period="x", start_ms=0, end_ms=1
        )

    assert model.crossed(budget, used(4.99, 499)) == []
    assert model.crossed(budget, used(5.0, 0)) == [50]  # exactly at: crossed
    assert model.crossed(budget, used(0, 800)) == [50, 80]  # tokens alone
    assert model.crossed(budget, used(10.5, 0)) == [50, 80, 100]
    assert model.share(budget, used(2.5, 900)) == pytest.approx(0.9)


def test_a_patch_changes_what_it_sends_and_rearms_on_a_changed_amount() -> None:
    budget = made(amount_usd=10, requests_per_minute=5)
    later = NOW + 1000

    def patch(**fields: object) -> tuple[Budget, bool]:
        return model.patched(budget, msgspec.convert(fields, BudgetPatch), later)

    after, rearm = patch(requests_per_minute=None, alerts=[{"threshold_percent": 90}])
    assert (after.requests_per_minute, after.thresholds, after.amount_nanos) == (
        None, (90,), 10 * 10**9,
    )  # fmt: skip
    assert not rearm and after.updated_ms == later and after.created_ms == NOW
    assert patch(amount_usd=20)[1] and patch(token_limit=5)[1]
    assert not patch(amount_usd=10)[1]  # the same amount
    assert patch(scope={"kind": "identity", "target": "user_123"})[0].scope == budget.scope
    for fields, param in (
        ({"scope": {"kind": "tag", "target": "x"}}, "scope"),
        ({"amount_usd": None, "requests_per_minute": None}, "amount_usd"),  # nothing left
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ):
        with pytest.raises(InvalidField) as caught:
            patch(**fields)
        assert caught.value.param == param


def test_expiry_and_activity_decide_whether_it_is_in_force() -> None:
    budget = made(amount_usd=1, expires_at="2026-12-03T00:00:00+01:00")
    assert budget.expires_ms == NOW + 10 * 3_600_000
    assert budget.live(NOW) and not budget.live(budget.expires_ms)
    assert not msgspec.structs.replace(budget, is_active=False).live(NOW)
    assert (
        Scope("tag", "x")
        == model.created(
            create(scope={"kind": "tag", "target": " x "}, amount_usd=1), budget_id=ID, now_ms=NOW
        ).scope
    )
