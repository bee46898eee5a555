from __future__ import annotations

import json
from html import escape

from sidecar.identity.model import Identity, Metrics
from sidecar.quota import windows
from sidecar.quota.limiter import PolicyUsage
from sidecar.quota.policy import Dimension, Limit, Policy
from sidecar.ui import chart
from sidecar.ui.render import attr, compact, count, money, percent, query, source_tag
from sidecar.usage.counters import Series

# An identity's page: profile, 30-day metrics and chart, policy and limit usage, sources.


def _window(limit: Limit) -> str:
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


def _moment(rfc3339: str | None) -> str:
    """'2026-11-18T11:06:40Z' -> '2026-11-18 11:06'."""
    return rfc3339[:16].replace("T", " ") if rfc3339 else "never"


def _profile(identity: Identity) -> str:
    tags = "".join(
        f'<a class="pill" href="{attr("/ui" + query(tag=t))}">{escape(t)}</a>'
        for t in identity.tags
    )
    metadata = (
        "".join(
            f"<div><code>{escape(k)}</code> = "
            f"<code>{escape(json.dumps(v, ensure_ascii=False))}</code></div>"
            for k, v in identity.metadata.items()
        )
        or '<span class="sub">none</span>'
    )
    rows = [
        ("External id", f"<code>{escape(identity.external_id)}</code>"),
        ("_id", f"<code>{escape(identity.id)}</code>"),
        ("Display name", escape(identity.display_name or "\u2013")),
        ("Email", escape(identity.email or "\u2013")),
        ("Avatar URL", escape(identity.avatar_url or "\u2013")),
        ("Tags", tags or '<span class="sub">none</span>'),
        ("Metadata", metadata),
        ("Created", escape(_moment(identity.created)) + " UTC"),
        ("Updated", escape(_moment(identity.updated)) + " UTC"),
    ]
    return (
        '<dl class="profile" id="profile">'
        + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in rows)
        + "</dl>"
    )


def _cards(m: Metrics, series: Series) -> str:
    cards = [
        ("requests", count(m.total_requests), "requests"),
        ("cost", money(round(m.total_cost * 1e9)), "cost"),
        (
            "tokens",
            count(m.total_tokens),
            f"tokens ({compact(m.input_tokens)} in, {compact(m.output_tokens)} out)",
        ),
        ("error-rate", percent(m.error_rate if m.total_requests else None), "error rate"),
        ("rate-limited", count(m.rate_limited_requests), "refused by limits"),
        ("last-seen", escape(_moment(series.last_seen)), "last request (UTC)"),
    ]
    return (
        '<div class="cards" id="metrics">'
        + "".join(
            f'<div class="card" id="metric-{key}"><b>{value}</b><span>{escape(label)}</span></div>'
            for key, value, label in cards
        )
        + "</div>"
    )


def _charts(series: Series) -> str:
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
    return f'<div class="charts">{cost}{tokens}</div>'


def _limits(policy: Policy | None, usage: PolicyUsage | None) -> str:
    if policy is None:
        return '<p id="policy">No policy matches this identity: it is not limited.</p>'
    head = (
        f'<p id="policy">Policy <b>{escape(policy.name)}</b> '
        f'<span class="sub">from {escape(policy.source)}</span></p>'
    )
    if usage is None or not (usage.limits or usage.in_flight is not None):
        return head + "<p>The policy sets no limits.</p>"
    rows = []
    for item in usage.limits:
        limit = item.limit
        share = min(1.0, item.used / limit.amount) if limit.amount else 0.0
        hot = " hot" if share >= 0.8 else ""
        rows.append(
            f'<tr class="limit" data-limit="{attr(limit.text)}">'
            f"<td>{escape(limit.dimension.value)}</td><td>{escape(limit.text)}</td>"
            f"<td>{escape(_window(limit))}</td>"
            f'<td class="num used">{escape(_amount(limit, item.used))}</td>'
            f'<td class="num">{escape(_amount(limit, limit.amount))}</td>'
            f'<td class="num remaining">{escape(_amount(limit, item.remaining))}</td>'
            f'<td><div class="bar"><i class="{hot.strip()}" '
            f'style="width:{share * 100:.0f}%"></i></div></td>'
            f'<td class="num">{escape(windows.duration(item.reset_ms))}</td></tr>'
        )
    if usage.in_flight is not None and policy.concurrency:
        rows.append(
            '<tr class="limit" data-limit="concurrency"><td>concurrency</td>'
            f"<td>{policy.concurrency} at once</td><td>in flight</td>"
            f'<td class="num used">{usage.in_flight}</td><td class="num">{policy.concurrency}</td>'
            f'<td class="num remaining">{max(0, policy.concurrency - usage.in_flight)}</td>'
            "<td></td><td></td></tr>"
        )
    return (
        head + '<table id="limits"><thead><tr><th>Dimension</th><th>Limit</th><th>Window</th>'
        '<th class="num">Used</th><th class="num">Limit</th><th class="num">Remaining</th>'
        '<th>Use</th><th class="num">Back to zero in</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _sources(series: Series) -> str:
    total = sum(series.by_source.values())
    rows = "".join(
        f'<tr data-source="{attr(source)}"><td>{source_tag(source)}</td>'
        f'<td class="num">{count(n)}</td>'
        f'<td class="num">{percent(n / total if total else None)}</td></tr>'
        for source, n in series.by_source.items()
    )
    return (
        '<table id="sources"><thead><tr><th>Source</th><th class="num">Requests</th>'
        f'<th class="num">Share</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def identity_page(
    identity: Identity, series: Series, policy: Policy | None, usage: PolicyUsage | None
) -> str:
    m = identity.metrics if isinstance(identity.metrics, Metrics) else Metrics()
    name = identity.display_name or identity.external_id
    return (
        f'<p class="sub"><a href="/ui">Identities</a> / {escape(identity.external_id)}</p>'
        f"<h1>{escape(name)} {source_tag(series.last_source)}</h1>"
        + _profile(identity)
        + "<h2>Last 30 days</h2>"
        + _cards(m, series)
        + "<h2>Daily usage</h2>"
        + _charts(series)
        + "<h2>Rate limits</h2>"
        + _limits(policy, usage)
        + "<h2>Requests by source (30 days)</h2>"
        + _sources(series)
    )
