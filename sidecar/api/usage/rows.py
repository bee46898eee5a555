"""The rows of the usage export, one struct per kind of group, and the counters they sum."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from sidecar import money
from sidecar.usage import buckets

# Counters summed per identity, tag or cohort (`counts` names them); per model the same
# without rate-limited requests (a refused request reached no model): buckets.MODEL_COUNTERS,
# COUNTERS[:-1].
COUNTERS = (*buckets.MODEL_COUNTERS, buckets.RATE_LIMITED)
WIDTH = len(COUNTERS)


class IdentityUsage(msgspec.Struct, kw_only=True):
    id: str = msgspec.field(name="_id")
    external_id: str
    display_name: str | None
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str  # exact: nano-dollars as a decimal string
    unpriced_requests: int
    rate_limited_requests: int
    # Answered with success without telling what they used: counted without tokens or cost.
    unreported_requests: int


class TagUsage(msgspec.Struct, kw_only=True):
    tag: str
    identities: int  # with usage in the range
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str
    unpriced_requests: int
    rate_limited_requests: int
    unreported_requests: int


class CohortUsage(msgspec.Struct, kw_only=True):
    value: str  # the metadata key's value as text, or "(none)"
    identities: int
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str
    unpriced_requests: int
    rate_limited_requests: int
    unreported_requests: int


class ModelUsage(msgspec.Struct, kw_only=True):
    model: str
    identities: int  # that used it in the range
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str
    unpriced_requests: int
    unreported_requests: int


class IdentityModelUsage(msgspec.Struct, kw_only=True):
    id: str = msgspec.field(name="_id")
    external_id: str
    display_name: str | None
    model: str
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str
    unpriced_requests: int
    unreported_requests: int


class OneModelUsage(msgspec.Struct, kw_only=True):
    """One identity's usage of one model (`/v2/identities/{id}/metrics?group_by=model`)."""

    model: str
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str
    unpriced_requests: int
    unreported_requests: int


class UsageRow(msgspec.Struct, kw_only=True):
    """A row of any kind, as documented (msgspec cannot describe a union of them): identity
    rows have `_id`, `external_id` and `display_name`, tag rows `tag` and `identities`,
    cohort rows `value` and `identities`, model rows `model` and `identities`, identity and
    model rows the identity's fields and `model`; model rows have no
    `rate_limited_requests`."""

    id: str | None = msgspec.field(name="_id", default=None)
    external_id: str | None = None
    display_name: str | None = None
    tag: str | None = None
    value: str | None = None
    model: str | None = None
    identities: int | None = None
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str
    unpriced_requests: int
    rate_limited_requests: int | None = None
    unreported_requests: int


class UsageExport(msgspec.Struct, kw_only=True):
    object: Literal["usage_export"] = "usage_export"
    group_by: str
    from_: str = msgspec.field(name="from")
    to: str
    note: str | None = None
    data: list[UsageRow]  # last: the rows are streamed after the rest


def counts(sums: list[int]) -> dict[str, Any]:
    """The fields of COUNTERS sums (or of MODEL_COUNTERS sums: no rate-limited field)."""
    out = {
        "requests": sums[0],
        "errors": sums[1],
        "input_tokens": sums[2],
        "cached_input_tokens": sums[3],
        "cache_write_tokens": sums[4],
        "output_tokens": sums[5],
        "reasoning_tokens": sums[6],
        "cost_usd": money.exact(sums[7]),
        "unpriced_requests": sums[8],
        "unreported_requests": sums[9],
    }
    if len(sums) > len(buckets.MODEL_COUNTERS):
        out["rate_limited_requests"] = sums[10]
    return out


def header(kind: type[msgspec.Struct]) -> list[str]:
    return [field.encode_name for field in msgspec.structs.fields(kind)]
