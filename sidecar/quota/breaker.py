"""A circuit breaker for the limiter's store calls."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class Breaker:
    """Stops a Redis outage from costing every request the full timeout: after `threshold`
    failures in a row, spread over at least `span_s`, the limiter does not ask Redis for
    `open_s`, then lets one call try. The span keeps one burst of timeouts (a busy event loop
    answering late, all at once) from looking like an outage."""

    def __init__(
        self,
        threshold: int = 5,
        open_s: float = 2.0,
        span_s: float = 0.2,
        clock: Clock = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.span_s = span_s
        self.clock = clock
        self.failures = 0
        self.first_failure = 0.0
        self.opened_at: float | None = None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at >= self.open_s:
            self.opened_at = self.clock()  # one probe per period while half-open
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        now = self.clock()
        if self.failures == 0:
            self.first_failure = now
        self.failures += 1
        if self.failures >= self.threshold and now - self.first_failure >= self.span_s:
            self.opened_at = now

    @property
    def open(self) -> bool:
        return self.opened_at is not None
