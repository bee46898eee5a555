from __future__ import annotations

import re

from sidecar.usage.model import Usage
from sidecar.usage.pricing import Cost

# Usage counters, per identity:
# - one hash of daily counters, fields "<day>:<counter>" (days since the epoch, UTC), kept
#   RETENTION_DAYS, with the sums of the last METRICS_DAYS days maintained beside them as
#   "s:<counter>" (lua/counters.lua): a 30-day metrics read is one small HMGET;
# - one hash per UTC hour (hours since the epoch) of the USAGE counters, kept HOUR_RETENTION
#   hours, for the hourly series. Daily buckets are the record: they are what the 30-day
#   metrics and the finance export read, and thirty of them cost one hash per identity. Hourly
#   ones cost a key each, so they are kept for the recent past only.
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
# Metered answers of success that told nothing of what they used (no usage, no cost header): a
# server that does not report it, a Responses call left in the background. Counted as requests
# without tokens or cost, and here, so that whose usage is unknown shows.
UNREPORTED = "ur"
# Requests by the source that named their identity (identity.resolve.Source values).
BY_SOURCE = {
    "body": "sb",
    "user_field": "su",
    "header": "sh",
    "api_key": "sk",
    "anonymous": "sa",
}
# Their first letter, which no other counter starts with: lua/record.lua tells them apart by it
# (a table to look them up in costs Redis more, built on every call, than the write it saves).
BY_SOURCE_FIRST = "s"
# What a request uses (or that it was refused), whoever it is for.
USAGE = (
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
    UNREPORTED,
)
# Every counter, in the order the Lua prelude (lua_prelude) lists them.
COUNTERS = (*USAGE, *BY_SOURCE.values())

# A key owner's own copy of what requests carrying its keys for others (end users it may
# assert) counted, per day only (`/v2/usage?group_by=api_key_owner`): the counters above,
# prefixed. Not in its metrics, series or rankings, which are its own requests'.
VIA = "k"
VIA_COUNTERS = tuple(VIA + c for c in USAGE)
_VIA = frozenset(VIA_COUNTERS)

# Per identity and UTC day, usage by model (Keys.usage_models: one hash per day, kept
# RETENTION_DAYS). The day's models take slots: field "=<model>" holds the model's slot, one
# character, and "<slot><counter>" its counters (MODEL_COUNTERS), so a long model name is
# written once a day rather than once per counter; MODEL_COUNT counts the named slots. At most
# MAX_MODELS models a day get a slot of their own (a..p); the rest of that day is counted
# under OTHER_MODEL (slot OTHER_SLOT). Model names are untrusted (the response's or the
# request's): model_name bounds them and takes out control characters, and no field of one
# kind can be read as the other ("=" names, a slot letter and a counter, "\x1f" the count).
MODEL_COUNTERS = (
    REQUESTS,
    ERRORS,
    INPUT,
    CACHED_INPUT,
    CACHE_WRITE,
    OUTPUT,
    REASONING,
    COST,
    UNPRICED,
    UNREPORTED,
)
MODEL_NAME = "="
MODEL_COUNT = "\x1fn"
MAX_MODELS = 16
FIRST_SLOT = "a"
OTHER_SLOT = "~"
MAX_MODEL_NAME = 128
OTHER_MODEL = "(other)"
UNKNOWN_MODEL = "(unknown)"  # a request that named no model and got no answer naming one
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

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


def lua_constants() -> str:
    """The counters and windows above, as Lua: the scripts that keep the 30-day sums start
    with these (then lua/counters.lua), so Python and Lua cannot disagree on them."""
    names = ", ".join(f"'{c}'" for c in COUNTERS)
    kept = ", ".join(f"'{c}'" for c in COUNTERS + VIA_COUNTERS)
    return (
        f"local COUNTERS = {{{names}}}\n"
        f"local KEPT = {{{kept}}}\n"
        f"local BY_SOURCE_FIRST = '{BY_SOURCE_FIRST}'\n"
        f"local VIA = '{VIA}'\n"
        f"local WINDOW = {METRICS_DAYS}\n"
        f"local RETENTION = {RETENTION_DAYS}\n"
    )


def lua_model_constants() -> str:
    """The by-model layout above, as Lua, with `model_slot` (lua/record.lua, lua/models.lua and
    lua/fold.lua start with it)."""
    counted = ", ".join(f"['{c}'] = true" for c in MODEL_COUNTERS)
    ordered = ", ".join(f"'{c}'" for c in MODEL_COUNTERS)
    return (
        f"local MODEL_COUNTERS = {{{counted}}}\n"
        f"local MODEL_ORDER = {{{ordered}}}\n"
        f"local MODEL_NAME = '{MODEL_NAME}'\n"
        f"local MODEL_COUNT = '\\31n'\n"
        f"local MAX_MODELS = {MAX_MODELS}\n"
        f"local FIRST_SLOT = {ord(FIRST_SLOT)}\n"
        f"local OTHER_SLOT = '{OTHER_SLOT}'\n"
        f"local OTHER_MODEL = '{OTHER_MODEL}'\n" + _MODEL_SLOT
    )


# A model's slot in a day's by-model hash: a model new to the day takes the next of MAX_MODELS
# slots, or OTHER_MODEL's (recording and merging count alike).
_MODEL_SLOT = """local function model_slot(models, model)
  local slot = redis.call('HGET', models, MODEL_NAME .. model)
  if slot then return slot end
  local named = tonumber(redis.call('HGET', models, MODEL_COUNT) or '0')
  if model ~= OTHER_MODEL and named < MAX_MODELS then
    slot = string.char(FIRST_SLOT + named)
    redis.call('HSET', models, MODEL_NAME .. model, slot, MODEL_COUNT, named + 1)
    return slot
  end
  redis.call('HSET', models, MODEL_NAME .. OTHER_MODEL, OTHER_SLOT)
  return OTHER_SLOT
end
"""


# Names worked out before, by the model as given: requests name few models (bounded all the
# same, emptied when full).
_NAMED: dict[str, str] = {}
_NAMED_MAX = 1024


def model_name(raw: object) -> str:
    """The name a request's usage is counted under: the model as given, without control
    characters and surrounding blanks, at most MAX_MODEL_NAME characters; UNKNOWN_MODEL for
    none."""
    if not isinstance(raw, str):
        return UNKNOWN_MODEL
    name = _NAMED.get(raw)
    if name is None:
        name = _CONTROL.sub("", raw).strip()[:MAX_MODEL_NAME].rstrip() or UNKNOWN_MODEL
        if len(raw) <= 4 * MAX_MODEL_NAME:
            if len(_NAMED) >= _NAMED_MAX:
                _NAMED.clear()
            _NAMED[raw] = name
    return name


def model_day(usage: dict[str, dict[str, int]]) -> dict[str, str | int]:
    """A by-model day hash holding `usage` (model -> counter -> n), as lua/record.lua leaves
    it after counting the models in this order: for tools that write the layout directly."""
    out: dict[str, str | int] = {}
    named = 0
    for model, counters in usage.items():
        if model != OTHER_MODEL and named < MAX_MODELS:
            slot = chr(ord(FIRST_SLOT) + named)
            named += 1
        else:
            slot = OTHER_SLOT
        out[MODEL_NAME + (model if slot != OTHER_SLOT else OTHER_MODEL)] = slot
        for counter, n in counters.items():
            if counter in MODEL_COUNTERS:
                field = slot + counter
                out[field] = int(out.get(field, 0)) + n
    out[MODEL_COUNT] = named
    return out


def increments(
    *,
    source: str,
    failed: bool,
    usage: Usage | None,
    cost: Cost | None,
    rate_limited: bool = False,
    unreported: bool = False,
) -> dict[str, int]:
    """What one request adds to its identity's counters (zeros left out); `unreported`: it was
    answered with success and nothing told what it used (see UNREPORTED)."""
    if rate_limited:
        return {RATE_LIMITED: 1}
    out = {REQUESTS: 1, BY_SOURCE[source]: 1}
    if failed:
        out[ERRORS] = 1
    if unreported:
        out[UNREPORTED] = 1
    if usage is not None:
        if usage.input_tokens:
            out[INPUT] = usage.input_tokens
        if usage.cached_input_tokens:
            out[CACHED_INPUT] = usage.cached_input_tokens
        if usage.cache_write_tokens:
            out[CACHE_WRITE] = usage.cache_write_tokens
        if usage.output_tokens:
            out[OUTPUT] = usage.output_tokens
        if usage.reasoning_tokens:
            out[REASONING] = usage.reasoning_tokens
    if cost is not None:
        if cost.nanos:
            out[COST] = cost.nanos
        if not cost.priced and usage is not None and usage.total_tokens:
            out[UNPRICED] = 1
    return out


def via(counters: dict[str, int]) -> dict[str, int]:
    """A request's counters as its key's owner keeps them (see VIA)."""
    return {VIA + c: n for c, n in counters.items() if VIA + c in _VIA}


def error_rates(
    errors: list[tuple[bytes, float]], requests: list[float | None]
) -> dict[bytes, float]:
    """Errors / requests per identity (1.0 when its requests are unknown)."""
    return {
        member: min(1.0, e / float(r)) if r else 1.0
        for (member, e), r in zip(errors, requests, strict=True)
    }
