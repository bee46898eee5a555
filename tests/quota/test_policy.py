from __future__ import annotations

import pytest

from sidecar.quota.policy import Dimension, LimitError, Match, parse_limit


@pytest.mark.parametrize(
    ("dimension", "text", "amount", "window", "calendar"),
    [
        (Dimension.REQUESTS, "600/minute", 600, 60, None),
        (Dimension.REQUESTS, "10 per 2 hours", 10, 7200, None),
        (Dimension.TOKENS, "2000000/hour", 2_000_000, 3600, None),
        (Dimension.REQUESTS, "20000/day", 20000, 86400, "day"),
        (Dimension.COST, "0.50/day", 500_000_000, 86400, "day"),
        (Dimension.COST, "500/month", 500_000_000_000, 2_592_000, "month"),
        (Dimension.COST, "0.000000001/second", 1, 1, None),
    ],
)
def test_limits_parse(
    dimension: Dimension, text: str, amount: int, window: int, calendar: str | None
) -> None:
    limit = parse_limit(dimension, text)
    assert (limit.amount, limit.window_s, limit.calendar) == (amount, window, calendar)


@pytest.mark.parametrize(
    ("dimension", "text"),
    [
        (Dimension.REQUESTS, "lots"),
        (Dimension.REQUESTS, "0.5/minute"),
        (Dimension.REQUESTS, "0/minute"),
        (Dimension.REQUESTS, "5/fortnight"),
        (Dimension.REQUESTS, "5/year"),
        (Dimension.REQUESTS, "5 per 2 days"),
        (Dimension.COST, "$5/day"),
        (Dimension.COST, "0/day"),
        (Dimension.COST, "-1/day"),
    ],
)
def test_bad_limits(dimension: Dimension, text: str) -> None:
    with pytest.raises(LimitError):
        parse_limit(dimension, text)


def test_changing_the_amount_keeps_the_window_key() -> None:
    five = parse_limit(Dimension.REQUESTS, "5/minute")
    ten = parse_limit(Dimension.REQUESTS, "10/minute")
    assert five.key_part == ten.key_part != parse_limit(Dimension.REQUESTS, "5/hour").key_part


def test_matching() -> None:
    pro = Match(metadata={"plan": "pro"})
    assert pro.holds("u", [], {"plan": "pro", "x": 1})
    assert not pro.holds("u", [], {"plan": "free"})
    assert not pro.holds("u", [], {})
    assert not Match(metadata={"seats": 1}).holds("u", [], {"seats": True})
    assert Match(tags=["a", "b"]).holds("u", ["z", "b"], {})
    assert not Match(tags=["a"]).holds("u", ["A"], {})
    assert Match(ids=["team-*"]).holds("team-x", [], {})
    assert not Match(ids=["team-*"]).holds("Team-x", [], {})
    both = Match(tags=["gold"], ids=["svc-*"])
    assert both.holds("svc-1", ["gold"], {}) and not both.holds("user", ["gold"], {})
