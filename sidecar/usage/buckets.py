from __future__ import annotations

from datetime import UTC, datetime, timedelta

# Usage counters live in one hash per identity per UTC day and per UTC hour. Field names are
# short because there is one hash per identity per hour.
REQUESTS = "r"
ERRORS = "e"
INPUT = "i"
CACHED_INPUT = "ci"
CACHE_WRITE = "cw"
OUTPUT = "o"
REASONING = "rs"
COST = "c"  # nano-dollars
RATE_LIMITED = "rl"
FIELDS = (REQUESTS, ERRORS, INPUT, CACHED_INPUT, CACHE_WRITE, OUTPUT, REASONING, COST, RATE_LIMITED)

METRICS_DAYS = 30
# Buckets outlive the 30-day window by a margin, so the oldest day is whole when it is read.
RETENTION_DAYS = 32


def day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")


def hour(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%d%H")


def last_days(now: float, count: int = METRICS_DAYS) -> list[str]:
    """The UTC days of the window ending today, oldest first."""
    today = datetime.fromtimestamp(now, UTC)
    return [(today - timedelta(days=n)).strftime("%Y%m%d") for n in range(count - 1, -1, -1)]


def last_hours(now: float, count: int) -> list[str]:
    current = datetime.fromtimestamp(now, UTC)
    return [(current - timedelta(hours=n)).strftime("%Y%m%d%H") for n in range(count - 1, -1, -1)]
