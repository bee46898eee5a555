from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import unquote

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.openapi import ResponseSpec
from litestar.params import FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT
from msgspec import UNSET

from sidecar.api.deps import BudgetsDep, CatalogDep, MergerDep, UsageCountersDep
from sidecar.api.usage import days, rows
from sidecar.budgets import model as budget_model
from sidecar.budgets.model import BudgetView
from sidecar.budgets.service import Budgets
from sidecar.errors import ErrorResponse, InvalidRequest, NotFound
from sidecar.identity import model
from sidecar.identity.model import (
    Identity,
    IdentityCreate,
    IdentityPatch,
    InvalidField,
    Metrics,
)
from sidecar.usage import by_model
from sidecar.usage.counters import Series, UsageCounters

PREFIX = "/v2/identities"
MAX_REF = 255
# A 400 has the sidecar's one error shape (sidecar.api.errors), not Litestar's default body.
INVALID = {400: ResponseSpec(ErrorResponse, generate_examples=False, description="Invalid request")}


class IdentityMetrics(msgspec.Struct):
    identity: Identity
    totals: Metrics
    series: Series
    object: Literal["identity.metrics"] = "identity.metrics"


class IdentityModelMetrics(msgspec.Struct, kw_only=True):
    identity: Identity
    from_: str = msgspec.field(name="from")
    to: str
    data: list[rows.OneModelUsage]  # the most expensive first
    object: Literal["identity.metrics_by_model"] = "identity.metrics_by_model"


class IdentityList(msgspec.Struct):
    data: list[Identity]  # IdentityBudgets with include_budget
    has_more: bool
    object: Literal["list"] = "list"


class MergeBody(msgspec.Struct, forbid_unknown_fields=True):
    from_: str = msgspec.field(name="from")  # the merged identity: its _id or external id


class MergedIdentity(Identity, kw_only=True):
    """The survivor of a merge, with every external id merged into it (its aliases)."""

    merged_from: list[str] = msgspec.field(default_factory=list)


class IdentityBudgets(Identity, kw_only=True):
    """An identity with the budgets in force that apply to it, each with its consumption."""

    budgets: list[BudgetView] = msgspec.field(default_factory=list)


async def with_budgets(budgets: Budgets, identities: list[Identity]) -> list[Identity]:
    found = await budgets.for_identities([(i.external_id, i.tags) for i in identities])
    return [
        IdentityBudgets(
            **msgspec.structs.asdict(identity),
            budgets=[budget_model.view(b, used) for b, used in applying],
        )
        for identity, applying in zip(identities, found, strict=True)
    ]


def _profile(fields: IdentityCreate | IdentityPatch) -> model.Profile:
    try:
        return model.profile(fields)
    except InvalidField as exc:
        raise InvalidRequest(exc.message, param=exc.param) from None


def identity_ref(request: Request[Any, Any, Any], sub: str | None = None) -> str:
    """The `{id}` of `/v2/identities/{id}[/sub]`, read from the raw path so that an encoded
    '/' stays inside the id."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    segments = raw.split(b"?", 1)[0].decode("latin-1")[len(PREFIX) + 1 :].split("/")
    if len(segments) != (1 if sub is None else 2) or (sub is not None and segments[1] != sub):
        raise NotFound(f"no route for {request.method} {request.url.path}")
    try:
        ref = unquote(segments[0], errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("id is not valid percent-encoded UTF-8", param="id") from None
    if not ref:
        raise NotFound(f"no route for {request.method} {request.url.path}")
    if len(ref) > MAX_REF:
        raise InvalidRequest(f"id must be at most {MAX_REF} characters", param="id")
    return ref


async def _find(catalog: CatalogDep, ref: str, include_metrics: bool = False) -> Identity:
    identity = await catalog.get(ref, include_metrics=include_metrics)
    if identity is None:
        raise NotFound(f"no identity with _id or external_id {ref!r}", param="id")
    return identity


async def _by_model(
    identity: Identity, counters: UsageCounters, first: int, last: int
) -> IdentityModelMetrics:
    (models,) = await counters.models([identity.id], first, last)
    return IdentityModelMetrics(
        identity=identity,
        from_=days.iso(first),
        to=days.iso(last),
        data=[
            rows.OneModelUsage(model=model, **rows.counts(models[model]))
            for model in by_model.by_cost(models)
        ],
    )


class IdentityController(Controller):
    path = PREFIX
    tags = ["identities"]

    @post(status_code=HTTP_201_CREATED, operation_id="createIdentity", responses=INVALID)
    async def create(self, data: JSONBody[IdentityCreate], catalog: CatalogDep) -> Identity:
        try:
            external_id = model.external_id(data.external_id)
        except InvalidField as exc:
            raise InvalidRequest(exc.message, param=exc.param) from None
        return await catalog.create(external_id, _profile(data))

    @get(operation_id="listIdentities", responses=INVALID)
    async def list(
        self,
        catalog: CatalogDep,
        budgets: BudgetsDep,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 10,
        starting_after: Annotated[str | None, QueryParameter(max_length=64)] = None,
        ending_before: Annotated[str | None, QueryParameter(max_length=64)] = None,
        search: Annotated[str | None, QueryParameter(max_length=255)] = None,
        tags: Annotated[list[str] | None, QueryParameter(name="filter_by.tags")] = None,
        include_metrics: FromQuery[bool] = False,
        include_budget: Annotated[
            bool, QueryParameter(description="adds `budgets`: those that apply, with consumption")
        ] = False,
        sort: Annotated[
            Literal["created", "cost", "requests", "error_rate"],
            QueryParameter(
                description="created: newest first. cost, requests, error_rate: highest first "
                "over the last 30 days, then identities without any, newest first"
            ),
        ] = "created",
    ) -> IdentityList:
        if starting_after and ending_before:
            raise InvalidRequest(
                "send starting_after or ending_before, not both", param="ending_before"
            )
        if search and model.has_control(search):
            raise InvalidRequest("search must not contain control characters", param="search")
        if tags and (len(tags) > 50 or any(model.has_control(t) for t in tags)):
            raise InvalidRequest(
                "filter_by.tags: at most 50 printable tags", param="filter_by.tags"
            )
        page = await catalog.page(
            limit=limit,
            starting_after=starting_after,
            ending_before=ending_before,
            search=search,
            tags=tags or (),
            include_metrics=include_metrics,
            sort=sort,
        )
        data = await with_budgets(budgets, page.data) if include_budget else page.data
        return IdentityList(data=data, has_more=page.has_more)

    @get("/{ref:path}", operation_id="getIdentity", responses=INVALID)
    async def get(
        self,
        request: Request[Any, Any, Any],
        catalog: CatalogDep,
        usage_counters: UsageCountersDep,
        budgets: BudgetsDep,
        include_metrics: FromQuery[bool] = False,
        include_budget: FromQuery[bool] = False,
        granularity: FromQuery[Literal["day", "hour"]] = "day",
        group_by: Annotated[
            Literal["model"] | None,
            QueryParameter(description="model: /metrics sums each model's usage over the range"),
        ] = None,
        from_: Annotated[
            str | None,
            QueryParameter(name="from", max_length=10, description="first UTC day, YYYY-MM-DD"),
        ] = None,
        to: Annotated[
            str | None, QueryParameter(max_length=10, description="last UTC day, YYYY-MM-DD")
        ] = None,
    ) -> Identity | IdentityMetrics | IdentityBudgets | IdentityModelMetrics:
        """`/v2/identities/{id}`: the identity; `/v2/identities/{id}/metrics`: its usage over
        time (`granularity=day`: the 30-day window; `hour`: the retained hours), or with
        `group_by=model` by model over UTC days `from`..`to` (default: the last 30)."""
        path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
        on_metrics = path.count(b"/") == 4 and path.endswith(b"/metrics")
        if group_by is None or not on_metrics:
            for value, param in ((group_by, "group_by"), (from_, "from"), (to, "to")):
                if value is not None:
                    raise InvalidRequest(
                        f"{param} is for /v2/identities/{{id}}/metrics?group_by=model",
                        param=param,
                    )
        if on_metrics and group_by == "model":
            first, last = days.day_range(from_, to, catalog.clock())
            identity = await _find(catalog, identity_ref(request, "metrics"))
            return await _by_model(identity, usage_counters, first, last)
        if on_metrics:
            identity = await _find(catalog, identity_ref(request, "metrics"), include_metrics=True)
            identity_totals = identity.metrics
            assert isinstance(identity_totals, Metrics)
            usage = await usage_counters.series(identity.id, granularity)
            identity.metrics = UNSET
            return IdentityMetrics(identity=identity, totals=identity_totals, series=usage)
        identity = await _find(catalog, identity_ref(request), include_metrics)
        return (await with_budgets(budgets, [identity]))[0] if include_budget else identity

    @post(
        "/{ref:path}",
        status_code=HTTP_200_OK,
        operation_id="mergeIdentity",
        responses={
            **INVALID,
            404: ResponseSpec(ErrorResponse, generate_examples=False, description="Not found"),
            409: ResponseSpec(ErrorResponse, generate_examples=False, description="Conflict"),
        },
    )
    async def merge(
        self, request: Request[Any, Any, Any], data: JSONBody[MergeBody], merger: MergerDep
    ) -> MergedIdentity:
        """`/v2/identities/{id}/merge`: the identity `from` names is merged into `{id}` (its
        usage, limit windows and budgets move; its external id becomes an alias)."""
        ref = identity_ref(request, "merge")
        if not data.from_.strip():
            raise InvalidRequest("from must not be empty", param="from")
        if len(data.from_) > MAX_REF:
            raise InvalidRequest(f"from must be at most {MAX_REF} characters", param="from")
        merged = await merger.merge(ref, data.from_.strip())
        return MergedIdentity(
            **msgspec.structs.asdict(merged.identity), merged_from=merged.merged_from
        )

    @patch("/{ref:path}", operation_id="updateIdentity", responses=INVALID)
    async def update(
        self, request: Request[Any, Any, Any], data: JSONBody[IdentityPatch], catalog: CatalogDep
    ) -> Identity:
        identity = await _find(catalog, identity_ref(request))
        if (
            data.external_id is not UNSET
            and catalog.normalize(data.external_id.strip()) != identity.external_id
        ):
            raise InvalidRequest(
                "external_id cannot be changed; create a new identity", param="external_id"
            )
        updated = await catalog.patch(identity, _profile(data))
        if updated is None:
            raise NotFound(f"identity {identity.external_id!r} was deleted", param="id")
        return updated

    @delete(
        "/{ref:path}",
        status_code=HTTP_204_NO_CONTENT,
        operation_id="deleteIdentity",
        responses=INVALID,
    )
    async def remove(self, request: Request[Any, Any, Any], catalog: CatalogDep) -> None:
        await catalog.delete(await _find(catalog, identity_ref(request)))
