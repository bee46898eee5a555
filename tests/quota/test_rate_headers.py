"""The x-ratelimit-* headers worked out from a limit check's counts (packing.rate_headers), and
when: an admission from allowances leaves its counts, worked out while the upstream works."""

from __future__ import annotations

from typing import Any, cast

from sidecar.proxy.inline import _ThenHeaders
from sidecar.quota.decision import Decision, Subject
from sidecar.quota.packing import headers_of, rate_headers
from sidecar.quota.policy import Dimension, Limit, Match, Policy, parse_limit

REQUESTS = parse_limit(Dimension.REQUESTS, "100/minute")
TOKENS = parse_limit(Dimension.TOKENS, "10000/hour")
COST = parse_limit(Dimension.COST, "5/day")
POLICY = Policy("paid", Match(), (REQUESTS, TOKENS, COST), None, "test")
SUBJECT = Subject("01ID", "user-1", POLICY)
# Per limit: (subject, limit, previous bucket's count, current bucket's count, ms into the
# current bucket, ms left of it).
Rows = list[tuple[Subject, Limit, int, int, int, int]]


def shown(rows: Rows) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in rate_headers(rows)}


def test_each_dimension_shows_its_limit_what_is_left_and_when_it_is_back_to_zero() -> None:
    rows: Rows = [
        # 20 in the previous minute, 30 s into this one (half of them still weigh), 10 in it.
        (SUBJECT, REQUESTS, 20, 10, 30_000, 30_000),
        (SUBJECT, TOKENS, 0, 1_234, 600_000, 3_000_000),
        # $1.25 of $5 spent today, 13h53m20.5s to midnight.
        (SUBJECT, COST, 0, 1_250_000_000, 36_000_000, 50_000_500),
    ]
    assert shown(rows) == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "80",  # 100 - 20 / 2 - 10
        "x-ratelimit-reset-requests": "1m30s",  # this bucket's 30 s, then a whole window
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "8766",
        "x-ratelimit-reset-tokens": "1h50m0s",
        "x-ratelimit-limit-cost": "5",
        "x-ratelimit-remaining-cost": "3.75",
        "x-ratelimit-reset-cost": "13h53m20.5s",  # a calendar window: at its end
    }


def test_of_two_limits_of_a_dimension_the_one_with_the_least_left_is_shown() -> None:
    per_hour = parse_limit(Dimension.REQUESTS, "1000/hour")
    owner = Subject("01OWNER", "team", Policy("team", Match(), (per_hour,), None, "test"))
    # 90 of 100 a minute left (90%), 50 of 1000 an hour (5%): the hour's.
    rows: Rows = [
        (SUBJECT, REQUESTS, 0, 10, 1_000, 59_000),
        (owner, per_hour, 0, 950, 1_000, 3_599_000),
    ]
    assert shown(rows) == {
        "x-ratelimit-limit-requests": "1000",
        "x-ratelimit-remaining-requests": "50",
        "x-ratelimit-reset-requests": "1h59m59s",
    }


def test_over_a_limit_shows_nothing_left_never_less() -> None:
    rows: Rows = [(SUBJECT, TOKENS, 0, 12_000, 1_000, 3_599_000)]
    assert shown(rows)["x-ratelimit-remaining-tokens"] == "0"


def test_an_admission_from_allowances_leaves_its_figures_worked_out_on_first_use() -> None:
    rows: Rows = [(SUBJECT, REQUESTS, 0, 10, 1_000, 59_000)]
    decision = Decision(admitted=True, subjects=(SUBJECT,), rows=rows)
    assert decision.headers == []
    first = headers_of(decision)
    assert first == rate_headers(rows) and decision.rows is None
    assert headers_of(decision) is first  # worked out once
    made = Decision(admitted=True, headers=[(b"x-ratelimit-limit-requests", b"1")])
    assert headers_of(made) == [(b"x-ratelimit-limit-requests", b"1")]


async def test_the_proxy_works_them_out_once_the_request_body_is_written() -> None:
    rows: Rows = [(SUBJECT, REQUESTS, 0, 10, 1_000, 59_000)]
    decision = Decision(admitted=True, subjects=(SUBJECT,), rows=rows)
    written: list[bytes] = []

    class Writer:
        async def write(self, chunk: bytes) -> None:
            assert decision.rows is not None  # not before the body is on its way
            written.append(bytes(chunk))

    body = _ThenHeaders(b'{"model": "m"}', decision)
    await body.write_with_length(cast("Any", Writer()), None)
    assert b"".join(written) == b'{"model": "m"}'
    assert decision.rows is None and decision.headers == rate_headers(rows)
