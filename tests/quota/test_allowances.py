"""The allowances a process holds, on a clock of the test's own (no Redis)."""

from __future__ import annotations

from sidecar.quota.allowances import HOLD_S, MAX_HOLD_S, Allowances
from sidecar.quota.policy import Dimension, parse_limit

LIMIT = parse_limit(Dimension.REQUESTS, "1000/minute")
SPAN = (60_000, 120_000)  # the bucket's start and end, ms
NOW_MS = 61_000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def held(clock: Clock, grant: int = 32) -> Allowances:
    book = Allowances(32, clock)
    assert book.granted("b", "id", LIMIT, SPAN, 121, grant, (0, grant + 1)) == []
    return book


def test_an_allowance_in_use_is_kept_until_it_is_max_hold_old() -> None:
    clock = Clock()
    book = held(clock)
    for _ in range(int(MAX_HOLD_S / (HOLD_S / 2)) - 1):
        clock.now += HOLD_S / 2
        allowance = book.find("id", LIMIT, NOW_MS, 1)
        assert allowance is not None
        allowance.left -= 1
        allowance.touched = clock.now
        assert book.due(NOW_MS) == []
    clock.now += HOLD_S / 2 + 0.01  # MAX_HOLD_S after the grant, though used just now
    left = book.held["b"].left
    assert book.due(NOW_MS) == [("b", left, 121)]
    assert book.held == {} and book.by_limit == {}


def test_an_idle_allowance_goes_back_after_hold() -> None:
    clock = Clock()
    book = held(clock)
    clock.now += HOLD_S - 0.01
    assert book.due(NOW_MS) == []
    clock.now += 0.02
    assert book.due(NOW_MS) == [("b", 32, 121)]


def test_an_allowance_is_not_found_outside_its_bucket_nor_for_another_amount() -> None:
    clock = Clock()
    book = held(clock)
    assert book.find("id", LIMIT, SPAN[1], 1) is None  # the next bucket
    assert book.find("id", LIMIT, NOW_MS, 33) is None  # more than it holds
    other = parse_limit(Dimension.REQUESTS, "2000/minute")
    assert book.find("id", other, NOW_MS, 1) is None
    # A grant under another amount gives the old allowance back first.
    assert book.granted("b", "id", other, SPAN, 121, 5, (0, 40)) == [("b", 32, 121)]
    found = book.find("id", other, NOW_MS, 5)
    assert found is not None and found.left == 5
    assert book.due(SPAN[1]) == [("b", 5, 121)]  # its bucket ended
