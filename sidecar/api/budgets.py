"""`/v2/budgets`: runtime budgets per identity, tag or key owner, their reset and alert log."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from sidecar.api.deps import BudgetsDep
from sidecar.api.identities import INVALID
from sidecar.budgets.model import BudgetCreate, BudgetPatch, BudgetView, Kind
from sidecar.budgets.outbox import Delivery
from sidecar.errors import InvalidRequest

PREFIX = "/v2/budgets"


class BudgetList(msgspec.Struct):
    data: list[BudgetView]
    has_more: bool
    object: Literal["list"] = "list"


class DeliveryList(msgspec.Struct):
    data: list[Delivery]
    has_more: bool
    object: Literal["list"] = "list"


class BudgetController(Controller):
    path = PREFIX
    tags = ["budgets"]

    @post(status_code=HTTP_201_CREATED, operation_id="createBudget", responses=INVALID)
    async def create(self, data: JSONBody[BudgetCreate], budgets: BudgetsDep) -> BudgetView:
        return await budgets.create(data)

    @get(operation_id="listBudgets", responses=INVALID)
    async def list(
        self,
        budgets: BudgetsDep,
        scope_kind: FromQuery[Kind | None] = None,
        scope_target: Annotated[str | None, QueryParameter(max_length=255)] = None,
        is_active: FromQuery[bool | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 25,
        starting_after: Annotated[str | None, QueryParameter(max_length=64)] = None,
        ending_before: Annotated[str | None, QueryParameter(max_length=64)] = None,
    ) -> BudgetList:
        if starting_after and ending_before:
            raise InvalidRequest(
                "send starting_after or ending_before, not both", param="ending_before"
            )
        data, has_more = await budgets.page(
            kind=scope_kind,
            target=scope_target,
            active=is_active,
            limit=limit,
            starting_after=starting_after,
            ending_before=ending_before,
        )
        return BudgetList(data=data, has_more=has_more)

    @get("/{budget_id:str}", operation_id="getBudget", responses=INVALID)
    async def read(self, budget_id: FromPath[str], budgets: BudgetsDep) -> BudgetView:
        return await budgets.get(budget_id)

    @patch("/{budget_id:str}", operation_id="updateBudget", responses=INVALID)
    async def update(
        self, budget_id: FromPath[str], data: JSONBody[BudgetPatch], budgets: BudgetsDep
    ) -> BudgetView:
        return await budgets.patch(budget_id, data)

    @delete(
        "/{budget_id:str}",
        status_code=HTTP_204_NO_CONTENT,
        operation_id="deleteBudget",
        responses=INVALID,
    )
    async def remove(self, budget_id: FromPath[str], budgets: BudgetsDep) -> None:
        await budgets.delete(budget_id)

    @post(
        "/{budget_id:str}/reset",
        status_code=HTTP_200_OK,
        operation_id="resetBudget",
        responses=INVALID,
    )
    async def reset(self, budget_id: FromPath[str], budgets: BudgetsDep) -> BudgetView:
        """This period's consumption back to zero; its alerts fire again."""
        return await budgets.reset(budget_id)

    @get("/{budget_id:str}/alerts", operation_id="listBudgetAlerts", responses=INVALID)
    async def alerts(
        self,
        budget_id: FromPath[str],
        budgets: BudgetsDep,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 25,
    ) -> DeliveryList:
        """The budget's alert deliveries, newest first: one per alert and notifier."""
        found = await budgets.deliveries(budget_id, limit + 1)
        return DeliveryList(data=found[:limit], has_more=len(found) > limit)
