from __future__ import annotations


def test_breaker_opens_on_an_outage_not_on_one_burst() -> None:
    from sidecar.quota.breaker import Breaker

    now = [0.0]
    breaker = Breaker(threshold=5, open_s=2.0, span_s=0.2, clock=lambda: now[0])
    for _ in range(40):  # forty timeouts at once: a late event loop, not a dead Redis
        breaker.failure()
    assert not breaker.open
    breaker.success()
    for _ in range(5):
        breaker.failure()
        now[0] += 0.06
    assert breaker.open and not breaker.allow()
    now[0] += 2.0
    assert breaker.allow(), "one probe after open_s"
    assert not breaker.allow()
    breaker.success()
    assert not breaker.open and breaker.allow()
