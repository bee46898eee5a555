"""Figures from samples and repeats: percentiles, medians with their spread over repeats, ratios
against the references measured in the same run; the printed table and the JSON record."""

from __future__ import annotations

import datetime as dt
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "out"


# -- samples ------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank on sorted samples; q in [0, 100]."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_stats(samples_ns: Sequence[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    ordered = sorted(s / 1e6 for s in samples_ns)
    return {
        "p50_ms": round(percentile(ordered, 50), 4),
        "p90_ms": round(percentile(ordered, 90), 4),
        "p99_ms": round(percentile(ordered, 99), 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
        "max_ms": round(ordered[-1], 4),
    }


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx = statistics.fmean(xs)
    my = statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx * 60


def rnd(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# -- repeats and references ---------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, Any]:
    """The median of a figure over repeats, its min and max, and every repeat's value."""
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "runs": [round(v, 4) for v in values],
    }


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("processes", "series", "error_kinds", "socket_error_kinds", "index"):
                continue
            out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per numeric figure (dotted path): its spread over the runs."""
    flat = [flatten(run) for run in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return {key: spread([f[key] for f in flat if key in f]) for key in keys}


def ratio(num: float | None, den: float | None, digits: int = 3) -> float | None:
    """num / den; undefined (None) when either is missing or den is not positive (noise)."""
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, digits)


def added_latency(
    by_target: Mapping[str, Mapping[str, Any]], key: str | None = None
) -> dict[str, Any]:
    """Differences to direct (ms); (sidecar - direct) over (nginx - direct) and (bare - direct)."""

    def get(target: str, q: str) -> float | None:
        stats = by_target.get(target)
        if not stats:
            return None
        if key is not None:
            stats = stats.get(key) or {}
        value = stats.get(f"{q}_ms")
        return float(value) if value is not None else None

    out: dict[str, Any] = {}
    for q in ("p50", "p99"):
        direct = get("direct", q)
        if direct is None:
            continue
        added = {t: get(t, q) for t in ("sidecar", "nginx", "bare")}
        added = {t: round(v - direct, 4) for t, v in added.items() if v is not None}
        for t, value in added.items():
            out[f"{t}_minus_direct_{q}_ms"] = value
        for ref in ("nginx", "bare"):
            if "sidecar" in added and ref in added:
                out[f"sidecar_over_{ref}_{q}"] = ratio(added["sidecar"], added[ref], 2)
    return out


def compare(
    runs: Sequence[Mapping[str, Mapping[str, Any]]],
    key: str,
    subjects: Sequence[str],
    references: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """For every subject (and reference): the spread of `key` over the runs, and of its ratio to
    each reference within the same run."""
    out: dict[str, dict[str, Any]] = {}
    for name in [*subjects, *references]:
        values = [float(r[name][key]) for r in runs if r.get(name, {}).get(key) is not None]
        if not values:
            continue
        entry: dict[str, Any] = {key: spread(values)}
        for ref in references:
            if ref == name:
                continue
            ratios = [
                ratio(r[name].get(key), r[ref].get(key)) for r in runs if name in r and ref in r
            ]
            kept = [x for x in ratios if x is not None]
            if kept:
                entry[f"over_{ref}"] = spread(kept)
        out[name] = entry
    return out


# -- text ---------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def spread_text(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """`median (min-max)`, or the one value of a single run."""
    if not entry:
        return "-"
    if len(entry["runs"]) == 1:
        return fmt(entry["median"], digits)
    low, high = fmt(entry["min"], digits), fmt(entry["max"], digits)
    between = " to " if entry["min"] < 0 else "-"
    return f"{fmt(entry['median'], digits)} ({low}{between}{high})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, which reads as well in a terminal."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def compare_table(
    comparison: Mapping[str, Mapping[str, Any]],
    key: str,
    label: str,
    references: Sequence[str],
    digits: int = 0,
) -> list[str]:
    """One row per target: the figure, then its ratio to each reference (median (min-max))."""
    rows = [
        [name, spread_text(entry.get(key), digits)]
        + [spread_text(entry.get(f"over_{ref}"), 2) for ref in references]
        for name, entry in comparison.items()
    ]
    return table(["target", label, *(f"/ {ref}" for ref in references)], rows)


# -- output -------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def emit(
    name: str,
    result: Mapping[str, Any],
    summary: str,
    *,
    json_path: str | None = None,
    markdown_path: str | None = None,
    markdown: str | None = None,
) -> Path:
    """The summary table to stderr, with the progress; the JSON to `json_path`, or else to
    stdout and to bench/out/NAME-DATE.json; the Markdown (the summary unless given) when asked."""
    text = json.dumps(result, indent=2) + "\n"
    if json_path:
        path = Path(json_path)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
        path = OUT / f"{name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown or summary, encoding="utf-8")
        log(f"Markdown written to {markdown_path}")
    print("\n" + summary.rstrip(), file=sys.stderr, flush=True)
    log(f"JSON written to {path}")
    return path
