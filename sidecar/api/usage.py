"""`GET /v2/usage`: usage per identity, per tag or per API key owner over a range of UTC days,
for cross-charging.

Reads the daily counters (the `<day>:<counter>` fields of each identity's day hash, kept
RETENTION_DAYS days), walking the identities in creation order a page at a time, with one
pipelined HMGET per page. The answer is streamed: an export of every identity is never held
in memory (per tag, only the running sums of each tag are)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import FromQuery, QueryParameter
from litestar.response import Stream

from sidecar import money
from sidecar.api.deps import CatalogDep
from sidecar.errors import ErrorResponse, InvalidRequest
from sidecar.identity.model import Identity
from sidecar.usage import buckets

PREFIX = "/v2/usage"
PAGE = 200  # identities per round trip
UNTAGGED = "(untagged)"
TAG_NOTE = (
    "an identity with several tags counts in full under each of them, so the rows can add up "
    f"to more than all usage; identities without tags are under {UNTAGGED}"
)
PARAMS = frozenset({"group_by", "from", "to", "format"})
EPOCH = date(1970, 1, 1)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

# Counters summed, in the order of the rows' fields after the group's own.
_COUNTERS = (
    buckets.REQUESTS,
    buckets.ERRORS,
    buckets.INPUT,
    buckets.CACHED_INPUT,
    buckets.CACHE_WRITE,
    buckets.OUTPUT,
    buckets.REASONING,
    buckets.COST,
    buckets.UNPRICED,
    buckets.RATE_LIMITED,
)
_WIDTH = len(_COUNTERS)
# Per key owner: its own counters, then what its keys carried for others (buckets.VIA).
_OWNER_COUNTERS = (*_COUNTERS, buckets.BY_SOURCE["api_key"], *(buckets.VIA + c for c in _COUNTERS))
GroupBy = Literal["identity", "tag", "api_key_owner"]


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


class UsageRow(msgspec.Struct, kw_only=True):
    """A row of either kind, as documented (msgspec cannot describe a union of the two):
    identity rows have `_id`, `external_id` and `display_name`, tag rows `tag` and
    `identities`."""

    id: str | None = msgspec.field(name="_id", default=None)
    external_id: str | None = None
    display_name: str | None = None
    tag: str | None = None
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
    rate_limited_requests: int


class UsageExport(msgspec.Struct, kw_only=True):
    object: Literal["usage_export"] = "usage_export"
    group_by: GroupBy
    from_: str = msgspec.field(name="from")
    to: str
    note: str | None = None
    data: list[UsageRow]  # last: the rows are streamed after the rest


def _sums_fields(sums: list[int]) -> dict[str, Any]:
    (requests, errors, input_tokens, cached, cache_write, output, reasoning, cost, unpriced,
     limited) = sums  # fmt: skip
    return {
        "requests": requests,
        "errors": errors,
        "input_tokens": input_tokens,
        "cached_input_tokens": cached,
        "cache_write_tokens": cache_write,
        "output_tokens": output,
        "reasoning_tokens": reasoning,
        "cost_usd": money.exact(cost),
        "unpriced_requests": unpriced,
        "rate_limited_requests": limited,
    }


def _day(value: str, param: str) -> int:
    if not _DATE.fullmatch(value):
        raise InvalidRequest(f"{param} must be a date as YYYY-MM-DD, got {value!r}", param=param)
    try:
        return (date.fromisoformat(value) - EPOCH).days
    except ValueError:
        raise InvalidRequest(f"{param}: {value!r} is not a calendar date", param=param) from None


def _date(day: int) -> str:
    return (EPOCH + timedelta(days=day)).isoformat()


def day_range(given_from: str | None, given_to: str | None, now: float) -> tuple[int, int]:
    """First and last day (inclusive, days since the epoch) of a valid range. Default: up to
    today, from 30 days before `to` (the window of the identities' metrics) or the oldest
    day kept, whichever is later."""
    today = buckets.day(now)
    oldest = today - buckets.RETENTION_DAYS + 1
    last = today if given_to is None else _day(given_to, "to")
    if given_from is None:
        first = max(oldest, last - buckets.METRICS_DAYS + 1)
    else:
        first = _day(given_from, "from")
    if last > today:
        raise InvalidRequest(f"to: {_date(last)} is after today ({_date(today)}, UTC)", param="to")
    for day, param in ((first, "from"), (last, "to")):
        if day < oldest:
            raise InvalidRequest(
                f"{param}: {_date(day)} is older than the {buckets.RETENTION_DAYS} days of "
                f"usage kept (the oldest day is {_date(oldest)})",
                param=param,
            )
    if first > last:
        raise InvalidRequest(f"from ({_date(first)}) is after to ({_date(last)})", param="from")
    return first, last


Row = tuple[Identity, list[int]]


class _Reader:
    """Identities in creation order with their sums over the days, a page at a time; with
    `owners`, only API key owners, each with what requests carrying its keys counted: its
    own, and those it made for others (its VIA counters)."""

    def __init__(self, catalog: CatalogDep, first: int, last: int, owners: bool = False) -> None:
        self.catalog = catalog
        self.first = first
        self.last = last
        self.owners = owners
        self.bound: bytes | None = b"-"

    async def page(self) -> list[Row]:
        """The next page's identities that have usage in the range; [] at the end (and,
        rarely, for a page where none has). Raises StoreUnavailable."""
        if self.bound is None:
            return []
        members = await self.catalog.listing.all_ids(self.bound, PAGE)
        # Past the last member read, whether or not it is deleted meanwhile.
        self.bound = b"(" + members[-1] if len(members) == PAGE else None
        found = await self.catalog.records.many([m[:26].decode() for m in members])
        ids = [i.id for i in found]
        rows = []
        if self.owners:
            days = await self.catalog.counters.days(ids, self.first, self.last, _OWNER_COUNTERS)
            for identity, all_sums in zip(found, days, strict=True):
                own, by_key, via = all_sums[:_WIDTH], all_sums[_WIDTH], all_sums[_WIDTH + 1 :]
                if by_key or any(via):  # an owner: a listed key named it, or carried others
                    rows.append((identity, [a + b for a, b in zip(own, via, strict=True)]))
            return rows
        days = await self.catalog.counters.days(ids, self.first, self.last, _COUNTERS)
        for identity, sums in zip(found, days, strict=True):
            if any(sums):
                rows.append((identity, sums))
        return rows

    async def rows(self, first_page: list[Row]) -> AsyncIterator[list[Row]]:
        page = first_page
        while True:
            if page:
                yield page
            if self.bound is None:
                return
            page = await self.page()


def _identity_row(identity: Identity, sums: list[int]) -> IdentityUsage:
    return IdentityUsage(
        id=identity.id,
        external_id=identity.external_id,
        display_name=identity.display_name,
        **_sums_fields(sums),
    )


async def _by_tag(reader: _Reader, first_page: list[Row]) -> list[TagUsage]:
    totals: dict[str, tuple[int, list[int]]] = {}
    async for page in reader.rows(first_page):
        for identity, sums in page:
            for tag in identity.tags or (UNTAGGED,):
                count, tag_sums = totals.get(tag) or (0, [0] * _WIDTH)
                totals[tag] = (count + 1, [a + b for a, b in zip(tag_sums, sums, strict=True)])
    return [
        TagUsage(tag=tag, identities=count, **_sums_fields(sums))
        for tag, (count, sums) in sorted(totals.items())
    ]


_encode = msgspec.json.Encoder().encode


async def _json(
    export: UsageExport, reader: _Reader, first_page: list[Row]
) -> AsyncIterator[bytes]:
    head = _encode(export)
    assert head.endswith(b"[]}")
    yield head[:-2]
    if export.group_by == "tag":
        rows: list[Any] = await _by_tag(reader, first_page)
        yield b",".join(_encode(row) for row in rows)
    else:
        separator = b""
        async for page in reader.rows(first_page):
            yield separator + b",".join(_encode(_identity_row(*row)) for row in page)
            separator = b","
    yield b"]}"


# What a spreadsheet may read as the start of a formula (OWASP, CSV injection). A text cell
# starting with one of them gets a `'` in front, which spreadsheets read as "text" and do not
# show. Numeric columns stay as they are: they hold digits (a cost is never negative).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_TEXT_COLUMNS = frozenset({"_id", "external_id", "display_name", "tag"})


def spreadsheet_text(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


def _csv_header(group_by: str) -> list[str]:
    kind = TagUsage if group_by == "tag" else IdentityUsage
    return [field.encode_name for field in msgspec.structs.fields(kind)]


def _csv_lines(rows: list[Any]) -> bytes:
    if not rows:
        return b""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    text = [f.encode_name in _TEXT_COLUMNS for f in msgspec.structs.fields(rows[0])]
    for row in rows:
        writer.writerow(
            "" if v is None else spreadsheet_text(v) if is_text else v
            for v, is_text in zip(msgspec.structs.astuple(row), text, strict=True)
        )
    return out.getvalue().encode()


async def _csv(group_by: str, reader: _Reader, first_page: list[Row]) -> AsyncIterator[bytes]:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(_csv_header(group_by))
    yield out.getvalue().encode()
    if group_by == "tag":
        yield _csv_lines(await _by_tag(reader, first_page))
        return
    async for page in reader.rows(first_page):
        yield _csv_lines([_identity_row(*row) for row in page])


@dataclass
class _JsonOrCsv(Operation):
    """The 200 answer is documented as JSON; `format=csv` gives CSV."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/csv"] = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))


class UsageController(Controller):
    path = PREFIX
    tags = ["usage"]

    @get(
        operation_id="exportUsage",
        operation_class=_JsonOrCsv,
        responses={
            200: ResponseSpec(UsageExport, generate_examples=False, description="The usage"),
            400: ResponseSpec(ErrorResponse, generate_examples=False, description="Invalid"),
        },
    )
    async def export(
        self,
        request: Request[Any, Any, Any],
        catalog: CatalogDep,
        group_by: FromQuery[GroupBy] = "identity",
        from_: Annotated[
            str | None,
            QueryParameter(name="from", max_length=10, description="first UTC day, YYYY-MM-DD"),
        ] = None,
        to: Annotated[
            str | None, QueryParameter(max_length=10, description="last UTC day, YYYY-MM-DD")
        ] = None,
        format: FromQuery[Literal["json", "csv"]] = "json",
    ) -> Stream:
        """Requests, errors, tokens and cost per identity, per tag or per API key owner over
        UTC days, both included (default: the 30 days up to `to`, today by default, as the
        identities' metrics); kept 32 days. Groups without usage in the range are left out.
        Per tag, an identity with several tags counts under each; identities without tags are
        under `(untagged)`. Per key owner: the owner's own requests and those its keys carried
        for the end users it may assert."""
        for name in request.query_params:
            if name not in PARAMS:
                raise InvalidRequest(f"unknown parameter {name[:64]!r}", param=name[:64])
        first, last = day_range(from_, to, catalog.clock())
        reader = _Reader(catalog, first, last, owners=group_by == "api_key_owner")
        first_page = await reader.page()  # a store that is down is a 503, not a cut stream
        headers = {"cache-control": "no-store"}
        if group_by == "tag":
            headers["x-sidecar-note"] = TAG_NOTE
        if format == "csv":
            name = f"usage-by-{group_by}-{_date(first)}-{_date(last)}.csv"
            headers["content-disposition"] = f'attachment; filename="{name}"'
            return Stream(
                _csv(group_by, reader, first_page),
                media_type="text/csv; charset=utf-8",
                headers=headers,
            )
        export = UsageExport(
            group_by=group_by,
            from_=_date(first),
            to=_date(last),
            note=TAG_NOTE if group_by == "tag" else None,
            data=[],
        )
        return Stream(
            _json(export, reader, first_page), media_type="application/json", headers=headers
        )
