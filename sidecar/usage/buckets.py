from __future__ import annotations

# Usage counters: per identity, one hash of daily counters with maintained 30-day sums (see
# lua/counters.lua), and one hash per UTC hour. Days and hours are numbered since the Unix
# epoch, so scripts can name a range with arithmetic. Field names are short: they repeat.
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

# Lua prelude that keeps the 30-day sums (Script(..., prelude=COUNTERS_LUA)).
COUNTERS_LUA = "sidecar.usage.lua/counters"
METRICS_DAYS = 30
# Buckets outlive the 30-day window by a margin, so the oldest day is whole when it is read.
RETENTION_DAYS = 32
DAY = 86_400
HOUR = 3_600


def day(now: float) -> int:
    return int(now // DAY)


def hour(now: float) -> int:
    return int(now // HOUR)


def window(now: float, days: int = METRICS_DAYS) -> tuple[int, int]:
    """First and last day (inclusive) of the `days` UTC days ending today."""
    today = day(now)
    return today - days + 1, today
