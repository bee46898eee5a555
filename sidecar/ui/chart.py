from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

import msgspec

# Server-rendered SVG bar charts: no script, no external asset, readable without CSS.

WIDTH = 640
HEIGHT = 210
LEFT, RIGHT, TOP, BOTTOM = 70, 12, 30, 42


class Series(msgspec.Struct, frozen=True):
    name: str
    values: Sequence[float]
    css: str  # class of its bars (the page's stylesheet colours it)


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `value` (1 for none)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value * (1 - 1e-12):
            return step * power
    return 10.0 * power


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def bars(
    *,
    title: str,
    unit: str,
    days: Sequence[str],
    series: Sequence[Series],
    fmt: Callable[[float], str],
    chart_id: str,
) -> str:
    """A bar per day, the series stacked; `days` are ISO dates (YYYY-MM-DD), oldest first.
    Each bar carries data-day and data-value (its stack's total) for tests and tooling."""
    count = len(days)
    totals = [sum(s.values[i] for s in series) for i in range(count)]
    top = nice_ceiling(max(totals, default=0.0))
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    slot = plot_w / max(count, 1)
    bar_w = max(1.0, slot * 0.7)
    base = TOP + plot_h
    out = [
        f'<svg id="{escape(chart_id)}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="100%" role="img" aria-labelledby="{escape(chart_id)}-t" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(chart_id)}-t">{escape(title)}, by day (UTC)</title>',
        f'<text class="chart-title" x="{LEFT}" y="18">{escape(title)}</text>',
    ]
    for fraction in (0.0, 0.5, 1.0):  # grid lines and the y axis's labels
        y = base - plot_h * fraction
        out.append(
            f'<line class="grid" x1="{LEFT}" y1="{_num(y)}" x2="{WIDTH - RIGHT}" y2="{_num(y)}"/>'
        )
        out.append(
            f'<text class="tick" x="{LEFT - 6}" y="{_num(y + 4)}" text-anchor="end">'
            f"{escape(fmt(top * fraction))}</text>"
        )
    middle = TOP + plot_h / 2
    out.append(
        f'<text class="axis" x="14" y="{_num(middle)}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_num(middle)})">{escape(unit)}</text>'
    )
    for i, day in enumerate(days):
        x = LEFT + slot * i + (slot - bar_w) / 2
        out.append(f'<g class="day" data-day="{escape(day)}" data-value="{_num(totals[i])}">')
        out.append(f"<title>{escape(day)}: {escape(fmt(totals[i]))}</title>")
        y = base
        for s in series:
            h = plot_h * s.values[i] / top
            if h <= 0:
                continue
            y -= h
            out.append(
                f'<rect class="{escape(s.css)}" x="{_num(x)}" y="{_num(y)}" '
                f'width="{_num(bar_w)}" height="{_num(max(h, 0.5))}"/>'
            )
        out.append("</g>")
        if (count - 1 - i) % 7 == 0:  # a date under every 7th bar, today's included
            out.append(
                f'<text class="tick" x="{_num(x + bar_w / 2)}" y="{base + 16}" '
                f'text-anchor="middle">{escape(day[5:])}</text>'
            )
    out.append(
        f'<line class="axis-line" x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}"/>'
    )
    out.append(
        f'<text class="axis" x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 6}" '
        'text-anchor="middle">day (UTC)</text>'
    )
    if len(series) > 1:  # a legend, right-aligned above the plot
        x = WIDTH - RIGHT
        for s in reversed(series):
            label_w = 7 * len(s.name) + 18
            x -= label_w
            out.append(f'<rect class="{escape(s.css)}" x="{x}" y="9" width="10" height="10"/>')
            out.append(f'<text class="tick" x="{x + 14}" y="18">{escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)
