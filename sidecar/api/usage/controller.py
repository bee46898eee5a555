"""`GET /v2/usage`: usage per identity, tag, API key owner, model, identity and model, or
metadata value (a cohort) over a range of UTC days, for cross-charging and analytics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from litestar import Controller, Request, get
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import FromQuery, QueryParameter
from litestar.response import Stream

from sidecar.api.deps import CatalogDep
from sidecar.api.usage import days, groups, rows, stream
from sidecar.errors import ErrorResponse, InvalidRequest

PREFIX = "/v2/usage"
PARAMS = frozenset({"group_by", "from", "to", "format"})


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
            200: ResponseSpec(rows.UsageExport, generate_examples=False, description="The usage"),
            400: ResponseSpec(ErrorResponse, generate_examples=False, description="Invalid"),
        },
    )
    async def export(
        self,
        request: Request[Any, Any, Any],
        catalog: CatalogDep,
        group_by: Annotated[
            str,
            QueryParameter(
                max_length=128,
                description="identity, tag, api_key_owner, model, identity,model or metadata.<key>",
            ),
        ] = "identity",
        from_: Annotated[
            str | None,
            QueryParameter(name="from", max_length=10, description="first UTC day, YYYY-MM-DD"),
        ] = None,
        to: Annotated[
            str | None, QueryParameter(max_length=10, description="last UTC day, YYYY-MM-DD")
        ] = None,
        format: FromQuery[Literal["json", "csv"]] = "json",
    ) -> Stream:
        """Requests, errors, tokens and cost per identity, tag, API key owner, model,
        identity and model, or value of a metadata key, over UTC days, both included
        (default: the 30 days up to `to`, today by default, as the identities' metrics);
        kept 32 days. Groups without usage in the range are left out. Per tag, an identity
        with several tags counts under each; identities without tags are under `(untagged)`.
        Per key owner: the owner's own requests and those its keys carried for the end users
        it may assert. Per metadata value (`metadata.plan`): identities without the key are
        under `(none)`."""
        for name in request.query_params:
            if name not in PARAMS:
                raise InvalidRequest(f"unknown parameter {name[:64]!r}", param=name[:64])
        grouping = groups.group_by(group_by)
        first, last = days.day_range(from_, to, catalog.clock())
        export = groups.export(grouping, catalog, first, last)
        await export.start()  # a store that is down is a 503, not a cut stream
        headers = {"cache-control": "no-store"}
        if export.note is not None:
            headers["x-sidecar-note"] = export.note
        if format == "csv":
            name = f"usage-by-{grouping.name.replace(',', '-')}-{days.iso(first)}-{days.iso(last)}"
            headers["content-disposition"] = f'attachment; filename="{_safe(name)}.csv"'
            return Stream(
                stream.as_csv(export), media_type="text/csv; charset=utf-8", headers=headers
            )
        head = rows.UsageExport(
            group_by=grouping.name,
            from_=days.iso(first),
            to=days.iso(last),
            note=export.note,
            data=[],
        )
        return Stream(stream.as_json(head, export), media_type="application/json", headers=headers)


def _safe(name: str) -> str:
    """A file name for the content-disposition header: a metadata key may hold anything."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)
