"""The inline proxy benchmark's summary table (the sidecar against its references) and its
Markdown report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.lib.meta import heading
from bench.lib.payloads import SEQUENTIAL_SCENARIOS
from bench.lib.proxy import REFERENCES, TARGETS
from bench.lib.report import fmt, spread_text, table

Summary = Mapping[str, Mapping[str, Any]]

# label, direct's own figure, each target's figure, the sidecar's ratio to a reference, digits
ROWS: list[tuple[str, str, str, str, int]] = [
    *(
        (
            f"added {q}, {s} (ms)",
            f"latency.{s}.direct.{q}_ms",
            f"added_latency.{s}.{{t}}_minus_direct_{q}_ms",
            f"added_latency.{s}.sidecar_over_{{ref}}_{q}",
            3,
        )
        for q in ("p50", "p99")
        for s in SEQUENTIAL_SCENARIOS
    ),
    (
        "added p50, wrk -c1 (ms)",
        "wrk_sequential.direct.p50_ms",
        "wrk_sequential.{t}.added_p50_ms",
        "wrk_sequential_added.sidecar_over_{ref}_p50",
        3,
    ),
    (
        "stream TTFB added, p50 (ms)",
        "stream.direct.ttfb.p50_ms",
        "stream_added.ttfb.{t}_minus_direct_p50_ms",
        "stream_added.ttfb.sidecar_over_{ref}_p50",
        3,
    ),
    (
        "saturation (requests/s)",
        "saturation.direct.requests_per_s",
        "saturation.{t}.requests_per_s",
        "saturation_ratio.sidecar_over_{ref}",
        0,
    ),
    (
        "p99 at saturation (ms)",
        "saturation.direct.p99_ms",
        "saturation.{t}.p99_ms",
        "saturation_p99_ratio.sidecar_over_{ref}",
        1,
    ),
]


def available(result: Mapping[str, Any]) -> list[str]:
    return [t for t in TARGETS if result["targets"].get(t, {}).get("available")]


def cell(summary: Summary, key: str, digits: int = 3) -> str:
    return spread_text(summary.get(key), digits)


def total(summary: Summary, key: str) -> str:
    """A count summed over runs (errors: one in any run matters)."""
    entry = summary.get(key)
    return "-" if not entry else f"{sum(entry['runs']):,.0f}"


def summary_table(result: Mapping[str, Any]) -> list[str]:
    """The sidecar's figures beside the references of the same run, and as ratios to them:
    median over repeats (min-max)."""
    summary: Summary = result.get("summary", {})
    targets = available(result)
    refs = [r for r in REFERENCES if r in targets] if "sidecar" in targets else []
    rows = []
    for label, direct, each, over, digits in ROWS:
        if direct not in summary and not any(each.format(t=t) in summary for t in targets):
            continue  # not measured in this run (`--wrk-sequential 0`)
        row = [label]
        for t in targets:
            if t == "direct":
                row.append(cell(summary, direct, digits))
            else:
                row.append(cell(summary, each.format(t=t), digits))
        row += [cell(summary, over.format(ref=ref), 2) for ref in refs]
        rows.append(row)
    header = ["figure", *targets, *(f"sidecar / {ref}" for ref in refs)]
    runs = len(result.get("runs", []))
    return [
        f"Median of {runs} run(s)" + (" (min-max over runs)" if runs > 1 else "") + ". In the "
        "`added` rows direct shows its own latency, the others what they add to it; the "
        "ratios are the sidecar's figure over the reference's, taken within each run.",
        "",
        *table(header, rows),
    ]


def per_target(
    summary: Summary, targets: Sequence[str], base: str, columns: Sequence[tuple[str, int | None]]
) -> list[list[str]]:
    """One row per target: `base.{t}.column` for each column (digits None: a total)."""
    return [
        [t]
        + [
            total(summary, f"{base.format(t=t)}.{key}")
            if digits is None
            else cell(summary, f"{base.format(t=t)}.{key}", digits)
            for key, digits in columns
        ]
        for t in targets
    ]


def soak_section(result: Mapping[str, Any], opts: Mapping[str, Any]) -> list[str]:
    soak = result.get("soak")
    if not soak:
        return ["No soak run (`--soak SECONDS`).", ""]
    if "rss" not in soak:
        return [f"Soak skipped: {soak.get('skipped')}.", ""]
    out = [
        f"Soak: `wrk -c{opts['connections']} -d{soak['requested_s']}s` against the sidecar, "
        f"{fmt(soak.get('requests_per_s'), 0)} requests/s, {soak.get('http_errors', 0)} status "
        f">= 400, {soak.get('socket_errors', 0)} socket errors.",
        "",
    ]
    keys = ("start_kb", "end_kb", "max_kb", "slope_kb_per_min", "slope_second_half_kb_per_min")
    rows = [
        [f"{p['role']} (pid {p['pid']})", *(fmt(p.get(k), 0) for k in keys)]
        for p in soak["rss"]["processes"]
    ]
    rows.append(["process tree", *(fmt(soak["rss"]["tree"].get(k), 0) for k in keys)])
    out += table(["process", "start", "end", "max", "slope KB/min", "slope, 2nd half"], rows)
    memory = soak.get("redis")
    if memory:
        out += [
            f"Redis used_memory: {memory['used_memory_start']:,} B at the start, "
            f"{memory['used_memory_end']:,} B at the end, slope "
            f"{fmt(memory['slope_bytes_per_min'], 0)} B/min "
            f"({fmt(memory['slope_second_half_bytes_per_min'], 0)} B/min over the second "
            "half). Keys and their memory by class:",
            "",
        ]
        start, end = memory["by_class"]["start"], memory["by_class"]["end"]
        out += table(
            ["class", "keys at start", "bytes at start", "keys at end", "bytes at end"],
            [
                [name, *(f"{side[name][k]:,}" for side in (start, end) for k in ("keys", "bytes"))]
                for name in end
            ],
        )
    return out


def render_markdown(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    summary: Summary = result.get("summary", {})
    opts = meta["options"]
    targets = available(result)
    out = [*heading("Inline proxy benchmark", meta)]
    out += ["Targets, all in front of the same `sidecar mock-upstream` process:", ""]
    for name in TARGETS:
        info = result["targets"].get(name)
        if info is None:
            out.append(f"- **{name}**: not requested")
        elif info.get("available"):
            extra = f", {info['workers']} worker(s)" if name == "sidecar" else ""
            out.append(f"- **{name}**: {info['what']}{extra}")
        else:
            out.append(f"- **{name}**: unavailable ({info.get('reason')})")
    out += ["", "## Summary", "", *summary_table(result)]

    out += [
        "## 1. Sequential requests on one keep-alive connection",
        "",
        f"{opts['requests']} requests per target after {opts['warmup']} warm-up ones; targets "
        f"interleaved in blocks of {opts['block']}; `http.client` with TCP_NODELAY; "
        f"{opts['identities']} bench identities in rotation. Milliseconds.",
        "",
    ]
    columns: list[tuple[str, int | None]] = [
        ("p50_ms", 3),
        ("p90_ms", 3),
        ("p99_ms", 3),
        ("errors", None),
    ]
    rows = [
        [scenario, *row]
        for scenario in SEQUENTIAL_SCENARIOS
        for row in per_target(summary, targets, f"latency.{scenario}.{{t}}", columns)
    ]
    out += table(["request", "target", "p50", "p90", "p99", "errors"], rows)
    if any("wrk_sequential" in r for r in result.get("runs", [])):
        out += [
            f"With wrk as the client (`wrk -t1 -c1 -d{opts['wrk_sequential']}s`, the "
            "body-identity chat bodies, each target in turn):",
            "",
        ]
        columns = [("p50_ms", 3), ("p99_ms", 3), ("added_p50_ms", 3), ("added_p99_ms", 3)]
        rows = per_target(summary, targets, "wrk_sequential.{t}", columns)
        out += table(["target", "p50", "p99", "added p50", "added p99"], rows)

    out += [
        "## 2. Saturation",
        "",
        f"`wrk -t{opts['threads']} -c{opts['connections']} -d{opts['duration']}s --latency` with "
        "`bench/wrk/post_json.lua` (the body-identity chat completion), each target in turn "
        "(order rotated per run). The CPU columns are cores used, from /proc; machine busy "
        "counts everything on the machine, other tenants and loopback networking included.",
        "",
    ]
    columns = [("requests_per_s", 0), ("p50_ms", 3), ("p99_ms", 3)]
    columns += [("http_errors", None), ("socket_errors", None)]
    columns += [(f"cpu.{k}_cores", 2) for k in ("wrk", "upstream", "proxy", "redis")]
    columns += [("cpu.machine_busy_cores", 2)]
    header = ["target", "requests/s", "p50", "p99", "status >= 400", "socket errors"]
    header += ["wrk cores", "mock cores", "proxy cores", "redis cores", "machine busy cores"]
    out += table(header, per_target(summary, targets, "saturation.{t}", columns))

    out += [
        "## 3. Streams: time to first and last body byte",
        "",
        f"{opts['streams']} sequential streamed chat completions per target (mock paced: "
        f"`x-mock-chunks: {opts['stream_chunks']}`, `x-mock-chunk-delay-ms: "
        f"{opts['chunk_delay_ms']:g}`), one keep-alive connection each. Milliseconds.",
        "",
    ]
    columns = [("ttfb.p50_ms", 3), ("ttfb.p99_ms", 3), ("last_byte.p50_ms", 2)]
    columns += [("last_byte.p99_ms", 2), ("reads_median", 0), ("errors", None)]
    header = ["target", "TTFB p50", "TTFB p99", "last byte p50", "last byte p99", "reads"]
    out += table([*header, "errors"], per_target(summary, targets, "stream.{t}", columns))

    out += ["## 4. Sidecar RSS", ""]
    if "sidecar" not in targets:
        out += ["Not measured: the sidecar target is unavailable.", ""]
    else:
        out += [
            f"VmRSS of the `sidecar serve` process tree, sampled every {opts['rss_interval']:g} s "
            "during each saturation run (KB; slope by least squares).",
            "",
        ]
        columns = [("start_kb", 0), ("end_kb", 0), ("max_kb", 0), ("slope_kb_per_min", 0)]
        rss = "saturation.sidecar.rss.{t}"
        rows = per_target(summary, ["tree", "largest_worker"], rss, columns)
        rows[0][0], rows[1][0] = "process tree", "largest worker"
        out += table(["", "start", "end", "max", "slope KB/min"], rows)
        out += soak_section(result, opts)
        check = result.get("attribution")
        if check and check.get("available"):
            out += [
                f"Attribution check after the run: {check['identities']} bench identities in "
                f"the store, {check['recorded_requests']:,} requests recorded for them (the "
                f"harness saw {check['metered_2xx_sent']:,} metered 2xx answers through the "
                f"sidecar, warm-ups and wrk included), {check['rate_limited_requests']} "
                "rate-limited.",
                "",
            ]

    if len(result.get("runs", [])) > 1:
        out += ["## Each run", ""]
        header = ["run", "load avg (1 min)"]
        if "sidecar" in targets:
            header += [f"added p50, {s}" for s in SEQUENTIAL_SCENARIOS]
        header += [f"{t} req/s" for t in targets]
        rows = []
        for run in result["runs"]:
            row = [str(run["index"] + 1), f"{run['loadavg_start'][0]:.2f}"]
            if "sidecar" in targets:
                row += [
                    fmt(run["added_latency"][s].get("sidecar_minus_direct_p50_ms"))
                    for s in SEQUENTIAL_SCENARIOS
                ]
            row += [fmt(run["saturation"][t].get("requests_per_s"), 0) for t in targets]
            rows.append(row)
        out += table(header, rows)
    return "\n".join(out).rstrip() + "\n"
