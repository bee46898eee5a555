from __future__ import annotations

import msgspec
from litestar.response import Template

from sidecar.identity.model import Identity
from sidecar.quota import windows
from sidecar.quota.decision import PolicyUsage
from sidecar.quota.policy import Dimension, Limit, Policy
from sidecar.ui import chart
from sidecar.ui.budget_pages import BudgetRow
from sidecar.ui.pages import metrics
from sidecar.ui.render import compact, money, page
from sidecar.usage import buckets, by_model
from sidecar.usage.by_model import ModelSums
from sidecar.usage.counters import Series

CHART_MODELS = 5  # the most expensive models get a colour each; the rest share one
REST = "m-rest"
_AT = {c: i for i, c in enumerate(buckets.MODEL_COUNTERS)}

# An identity's page: profile, 30-day metrics and chart, policy and limit usage, sources.


class LimitRow(msgspec.Struct, frozen=True, kw_only=True):
    key: str  # data-limit: the limit as the policy writes it
    dimension: str
    text: str
    window: str
    used: str
    amount: str
    remaining: str
    share: float | None = None  # of the limit used, 0 to 1 (None: no bar)
    reset: str = ""


def _window(limit: Limit) -> str:
    if limit.calendar == "once":
        return "one-time (never resets)"
    if limit.calendar:
        return f"calendar {limit.calendar} (UTC)"
    units = ((86_400, "day"), (3_600, "hour"), (60, "minute"), (1, "second"))
    size, unit = next((size, unit) for size, unit in units if limit.window_s % size == 0)
    n = limit.window_s // size
    return f"sliding {n} {unit}{'s' if n != 1 else ''}"


def _amount(limit: Limit, value: float) -> str:
    if limit.dimension is Dimension.COST:
        return money(round(value))
    return f"{value:,.1f}".removesuffix(".0")


def limit_rows(policy: Policy, usage: PolicyUsage | None) -> list[LimitRow]:
    if usage is None:
        return []
    rows = [
        LimitRow(
            key=item.limit.text,
            dimension=item.limit.dimension.value,
            text=item.limit.text,
            window=_window(item.limit),
            used=_amount(item.limit, item.used),
            amount=_amount(item.limit, item.limit.amount),
            remaining=_amount(item.limit, item.remaining),
            share=min(1.0, item.used / item.limit.amount) if item.limit.amount else 0.0,
            reset=windows.duration(item.reset_ms),
        )
        for item in usage.limits
    ]
    if usage.in_flight is not None and policy.concurrency:
        rows.append(
            LimitRow(
                key="concurrency",
                dimension="concurrency",
                text=f"{policy.concurrency} at once",
                window="in flight",
                used=str(usage.in_flight),
                amount=str(policy.concurrency),
                remaining=str(max(0, policy.concurrency - usage.in_flight)),
            )
        )
    return rows


def charts(series: Series) -> list[chart.Chart]:
    days = [p.start[:10] for p in series.points]
    cost = chart.bars(
        title="Cost",
        unit="USD",
        days=days,
        series=[chart.Series("cost", [p.cost_nanos for p in series.points], "cost")],
        fmt=lambda v: money(round(v)),
        chart_id="chart-cost",
    )
    tokens = chart.bars(
        title="Tokens",
        unit="tokens",
        days=days,
        series=[
            chart.Series("input", [p.input_tokens for p in series.points], "input"),
            chart.Series("output", [p.output_tokens for p in series.points], "output"),
        ],
        fmt=compact,
        chart_id="chart-tokens",
    )
    return [cost, tokens]


class ModelRow(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    css: str  # its colour in the cost chart
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    share: float | None  # of the identity's cost over the days (None: no cost at all)


def model_rows(days: list[ModelSums]) -> list[ModelRow]:
    """The models used over `days`, the most expensive first."""
    totals = by_model.total(days)
    cost = sum(sums[_AT[buckets.COST]] for sums in totals.values())
    out = []
    for n, model in enumerate(by_model.by_cost(totals)):
        sums = totals[model]
        out.append(
            ModelRow(
                model=model,
                css=f"m{n}" if n < CHART_MODELS else REST,
                requests=sums[_AT[buckets.REQUESTS]],
                errors=sums[_AT[buckets.ERRORS]],
                input_tokens=sums[_AT[buckets.INPUT]],
                output_tokens=sums[_AT[buckets.OUTPUT]],
                cost_nanos=sums[_AT[buckets.COST]],
                share=sums[_AT[buckets.COST]] / cost if cost else None,
            )
        )
    return out


def model_chart(
    day_labels: list[str], days: list[ModelSums], models: list[ModelRow]
) -> chart.Chart:
    """Cost per day, stacked by model (the table of `models` is its key)."""
    at = _AT[buckets.COST]
    named = [m for m in models if m.css != REST]
    series = [
        chart.Series(m.model, [d[m.model][at] if m.model in d else 0 for d in days], m.css)
        for m in named
    ]
    rest = {m.model for m in models if m.css == REST}
    if rest:
        values = [sum(s[at] for model, s in d.items() if model in rest) for d in days]
        series.append(chart.Series("other models", values, REST))
    return chart.bars(
        title="Cost by model",
        unit="USD",
        days=day_labels,
        series=series,
        fmt=lambda v: money(round(v)),
        chart_id="chart-models",
        legend=False,
    )


def identity_page(
    identity: Identity,
    series: Series,
    policy: Policy | None,
    usage: PolicyUsage | None,
    model_days: list[ModelSums],
    *,
    budgets: list[BudgetRow],
    new_budget: str,
    csrf: str | None,
) -> Template:
    """`model_days`: usage by model on each day of `series` (day granularity)."""
    models = model_rows(model_days)
    day_labels = [p.start[:10] for p in series.points]
    return page(
        "identity.html",
        identity.display_name or identity.external_id,
        csrf=csrf,
        identity=identity,
        metrics=metrics(identity),
        series=series,
        charts=charts(series),
        models=models,
        max_models=buckets.MAX_MODELS,
        model_chart=model_chart(day_labels, model_days, models),
        policy=policy,
        limits=[] if policy is None else limit_rows(policy, usage),
        budgets=budgets,
        new_budget=new_budget,
    )
