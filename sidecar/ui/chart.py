from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import msgspec

# The geometry of the server-rendered SVG bar charts (templates/_chart.html draws them): no
# script, no external asset, readable without CSS.

WIDTH = 640
HEIGHT = 210
LEFT, RIGHT, TOP, BOTTOM = 70, 12, 30, 42
PLOT_W = WIDTH - LEFT - RIGHT
PLOT_H = HEIGHT - TOP - BOTTOM
BASE = TOP + PLOT_H  # the x axis's y


class Series(msgspec.Struct, frozen=True):
    name: str
    values: Sequence[float]
    css: str  # class of its bars (the page's stylesheet colours it)


class Segment(msgspec.Struct, frozen=True):
    css: str
    y: float
    height: float
    label: str  # its series and value, as the chart's unit reads


class Day(msgspec.Struct, frozen=True):
    day: str  # ISO date
    total: float  # the stack's total, as data-value
    label: str  # the total as the chart's unit reads
    x: float
    segments: list[Segment]  # bottom up
    dated: bool  # its date is written under it


class Gridline(msgspec.Struct, frozen=True):
    y: float
    label: str


class Key(msgspec.Struct, frozen=True):
    name: str
    css: str
    x: float


class Chart(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    title: str
    unit: str
    bar_w: float
    grid: list[Gridline]
    days: list[Day]
    legend: list[Key]  # right-aligned above the plot; empty for one series
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    base: int = BASE
    middle: float = TOP + PLOT_H / 2


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `value` (1 for none)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value * (1 - 1e-12):
            return step * power
    return 10.0 * power


def num(value: float) -> str:
    """A coordinate or value as an SVG attribute: at most 2 decimals, no trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def bars(
    *,
    title: str,
    unit: str,
    days: Sequence[str],
    series: Sequence[Series],
    fmt: Callable[[float], str],
    chart_id: str,
    legend: bool = True,
) -> Chart:
    """A bar per day, the series stacked; `days` are ISO dates (YYYY-MM-DD), oldest first.
    `legend` false: the page keys the colours itself (e.g. a table beside the chart)."""
    count = len(days)
    totals = [sum(s.values[i] for s in series) for i in range(count)]
    top = nice_ceiling(max(totals, default=0.0))
    slot = PLOT_W / max(count, 1)
    bar_w = max(1.0, slot * 0.7)
    grid = [Gridline(BASE - PLOT_H * fraction, fmt(top * fraction)) for fraction in (0.0, 0.5, 1.0)]
    out: list[Day] = []
    for i, day in enumerate(days):
        y = float(BASE)
        segments = []
        for s in series:
            h = PLOT_H * s.values[i] / top
            if h <= 0:
                continue
            y -= h
            segments.append(Segment(s.css, y, max(h, 0.5), f"{s.name}: {fmt(s.values[i])}"))
        x = LEFT + slot * i + (slot - bar_w) / 2
        # A date under every 7th bar, today's included.
        out.append(Day(day, totals[i], fmt(totals[i]), x, segments, (count - 1 - i) % 7 == 0))
    keys: list[Key] = []
    if legend and len(series) > 1:
        x = WIDTH - RIGHT
        for s in reversed(series):
            x -= 7 * len(s.name) + 18
            keys.append(Key(s.name, s.css, x))
    return Chart(id=chart_id, title=title, unit=unit, bar_w=bar_w, grid=grid, days=out, legend=keys)
