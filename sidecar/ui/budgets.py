"""The dashboard's budget forms: new, edit and reset, with the same sign-in and CSRF rules as
every other form (see controller.form_of)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.params import FromPath
from litestar.response import Response

from sidecar.errors import InvalidRequest
from sidecar.ui import budget_pages
from sidecar.ui.budget_forms import BudgetForm
from sidecar.ui.controller import BudgetsDep, SessionsDep, form_of, signed_in, ui_error
from sidecar.ui.render import redirect

NEW = "new"


class BudgetPages(Controller):
    path = "/ui/budgets"
    include_in_schema = False
    exception_handlers = {Exception: ui_error}

    @get("/{ref:str}", operation_id="uiBudgetForm")
    async def show(
        self,
        request: Request[Any, Any, Any],
        ref: FromPath[str],
        sessions: SessionsDep,
        budgets: BudgetsDep,
    ) -> Response[Any]:
        auth = await signed_in(request, sessions)
        if ref == NEW:
            params = request.query_params
            prefilled = BudgetForm(
                kind=params.get("kind", "identity"), target=params.get("target", "")
            )
            return budget_pages.form(prefilled, csrf=auth.csrf)
        budget = await budgets.found(ref)
        return budget_pages.form(BudgetForm.of(budget), csrf=auth.csrf, budget=budget)

    @post("/{ref:str}", operation_id="uiSaveBudget")
    async def save(
        self,
        request: Request[Any, Any, Any],
        ref: FromPath[str],
        sessions: SessionsDep,
        budgets: BudgetsDep,
    ) -> Response[Any]:
        auth, fields = await form_of(request, sessions)
        form = BudgetForm.from_fields(fields)
        budget = None if ref == NEW else await budgets.found(ref)
        if budget is not None:  # the scope is not the form's to change
            form.kind, form.target = budget.scope.kind, budget.scope.target
        try:
            if budget is None:
                data = form.to_create()
                if data is not None:
                    made = await budgets.create(data)
                    budget = await budgets.found(made.id)
                    return redirect(budget_pages.back_to(budget))
            else:
                patch = form.to_patch(budget)
                if patch is not None:
                    await budgets.patch(budget.id, patch)
                    return redirect(budget_pages.back_to(budget))
        except InvalidRequest as exc:
            form.refused(exc.param, exc.message)
        return budget_pages.form(form, csrf=auth.csrf, budget=budget, status=400)

    @post("/{ref:str}/reset", operation_id="uiResetBudget")
    async def reset(
        self,
        request: Request[Any, Any, Any],
        ref: FromPath[str],
        sessions: SessionsDep,
        budgets: BudgetsDep,
    ) -> Response[Any]:
        await form_of(request, sessions)
        budget = await budgets.found(ref)
        await budgets.reset(budget.id)
        return redirect(budget_pages.back_to(budget))
