from __future__ import annotations

from sidecar.identity.resolve import Source
from sidecar.usage.model import Usage
from sidecar.usage.pricing import Cost

# Usage counters, per identity:
# - one hash of daily counters, fields "<day>:<counter>" (days since the epoch, UTC), kept
#   RETENTION_DAYS, with the sums of the last METRICS_DAYS days maintained beside them as
#   "s:<counter>" (lua/counters.lua): a 30-day metrics read is one small HMGET;
# - one hash per UTC hour (hours since the epoch), kept HOUR_RETENTION hours, for the hourly
#   series. Daily buckets are the record: they are what the 30-day metrics and the finance
#   export read, and thirty of them cost one hash per identity. Hourly ones cost a key each,
#   so they are kept for the recent past only.
# Field names are short: they repeat in every bucket.
REQUESTS = "r"
ERRORS = "e"
INPUT = "i"
CACHED_INPUT = "ci"
CACHE_WRITE = "cw"
OUTPUT = "o"
REASONING = "rs"
COST = "c"  # nano-dollars
RATE_LIMITED = "rl"
UNPRICED = "up"
BY_SOURCE = {Source.BODY: "sb", Source.HEADER: "sh", Source.API_KEY: "sk", Source.ANONYMOUS: "sa"}
# The order of lua/counters.lua's COUNTERS.
COUNTERS = (
    REQUESTS,
    ERRORS,
    INPUT,
    CACHED_INPUT,
    CACHE_WRITE,
    OUTPUT,
    REASONING,
    COST,
    RATE_LIMITED,
    UNPRICED,
    *BY_SOURCE.values(),
)

# Lua prelude that keeps the 30-day sums (Script(..., prelude=COUNTERS_LUA)).
COUNTERS_LUA = "sidecar.usage.lua/counters"
METRICS_DAYS = 30
RETENTION_DAYS = 32  # outlives the window by a margin, so the oldest day is whole when read
HOUR_RETENTION = 72
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


def increments(
    *,
    source: Source,
    failed: bool,
    usage: Usage | None,
    cost: Cost | None,
    rate_limited: bool = False,
) -> dict[str, int]:
    """What one request adds to its identity's counters (zeros left out)."""
    if rate_limited:
        return {RATE_LIMITED: 1}
    out = {REQUESTS: 1, BY_SOURCE[source]: 1}
    if failed:
        out[ERRORS] = 1
    if usage is not None:
        out |= {
            INPUT: usage.input_tokens,
            CACHED_INPUT: usage.cached_input_tokens,
            CACHE_WRITE: usage.cache_write_tokens,
            OUTPUT: usage.output_tokens,
            REASONING: usage.reasoning_tokens,
        }
    if cost is not None:
        out[COST] = cost.nanos
        if not cost.priced and usage is not None and usage.total_tokens:
            out[UNPRICED] = 1
    return {k: v for k, v in out.items() if v}
