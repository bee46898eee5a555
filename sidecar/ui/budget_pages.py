"""What the dashboard shows of budgets: rows with consumption bars on an identity's page, the
"budget used" figure of the list, and the new and edit form."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from litestar.response import Template

from sidecar import money
from sidecar.budgets import model
from sidecar.budgets.model import Budget, Used
from sidecar.identity.model import rfc3339
from sidecar.ui.budget_forms import BudgetForm
from sidecar.ui.render import identity_path, moment, page, query

SCOPES = {"identity": "identity", "tag": "tag", "api_key_owner": "key owner"}


class Meter(msgspec.Struct, frozen=True, kw_only=True):
    dimension: str  # cost | tokens
    used: str
    limit: str
    share: float  # of the limit used, 0 to 1


class BudgetRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    scope: str
    period: str
    meters: list[Meter]
    rpm: int | None
    alerts: str
    resets: str  # "2027-01-01 00:00 UTC", or "never"
    edit: str  # the edit form's href
    reset: str  # the reset form's action


def _meters(budget: Budget, used: Used) -> list[Meter]:
    out = []
    if budget.amount_nanos is not None and used.cost_nanos is not None:
        share = min(1.0, used.cost_nanos / budget.amount_nanos)
        out.append(
            Meter(
                dimension="cost",
                used=money.display(used.cost_nanos),
                limit=money.display(budget.amount_nanos),
                share=share,
            )
        )
    if budget.token_limit is not None and used.tokens is not None:
        share = min(1.0, used.tokens / budget.token_limit)
        limit = f"{budget.token_limit:,}"
        out.append(Meter(dimension="tokens", used=f"{used.tokens:,}", limit=limit, share=share))
    return out


def rows(found: Sequence[tuple[Budget, Used]]) -> list[BudgetRow]:
    return [
        BudgetRow(
            id=budget.id,
            scope=f"{SCOPES[budget.scope.kind]} {budget.scope.target}",
            period=budget.period.replace("_", "-"),
            meters=_meters(budget, used),
            rpm=budget.requests_per_minute,
            alerts=", ".join(f"{t}%" for t in budget.thresholds),
            resets="never" if used.end_ms is None else moment(rfc3339(used.end_ms)) + " UTC",
            edit=f"/ui/budgets/{budget.id}",
            reset=f"/ui/budgets/{budget.id}/reset",
        )
        for budget, used in found
    ]


def used_share(found: Sequence[tuple[Budget, Used]]) -> float | None:
    """The most any of an identity's budgets has used of its amount or tokens (None: none
    applies)."""
    return max((model.share(b, u) for b, u in found), default=None)


def back_to(budget: Budget) -> str:
    """The page a budget belongs on: its identity's (or key owner's), else its tag's list."""
    scope = budget.scope
    if scope.kind == "tag":
        return "/ui" + query(tag=scope.target)
    if scope.target in (".", ".."):
        return "/ui" + query(q=scope.target)
    return identity_path(scope.target, scope.target)


def new_path(kind: str, target: str) -> str:
    return "/ui/budgets/new" + query(kind=kind, target=target)


def form(
    form: BudgetForm, *, csrf: str | None, budget: Budget | None = None, status: int = 200
) -> Template:
    """The new budget form, or `budget`'s edit form."""
    return page(
        "budget_form.html",
        "Edit budget" if budget is not None else "New budget",
        csrf=csrf,
        status=status,
        form=form,
        budget=budget,
        kinds=SCOPES,
        periods=list(model.CALENDAR),
        action=f"/ui/budgets/{budget.id}" if budget is not None else "/ui/budgets/new",
    )
