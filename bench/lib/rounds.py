"""Saturation of several sidecars against the same references, in one run: the mock upstream,
the bare pass-through and an nginx hop in front of it, and rounds of wrk over them all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.lib.client import Target
from bench.lib.payloads import API_KEY, CHAT_PATH, Scenario, chat
from bench.lib.processes import Launcher
from bench.lib.report import compare, compare_table, flatten, log, spread, spread_text
from bench.lib.report import table as report_table
from bench.lib.sampling import CpuMeter
from bench.lib.wrk import Load, require_wrk, run_wrk, saturation_rounds

KEY = "requests_per_s"


@dataclass
class Rig:
    """The mock upstream and the references in front of it; the sidecars joined to it later."""

    launcher: Launcher
    upstream: Target
    references: list[Target]
    probe: Scenario
    wrk_env: dict[str, str]
    redis_pids: dict[str, list[int]] = field(default_factory=dict)
    # Processes of a target measured apart as well (target name -> group name -> pids).
    extra_pids: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def reference_names(self) -> list[str]:
        return [t.name for t in self.references]

    def meter(self, target: Target) -> CpuMeter:
        """The target's process tree, the mock, and a sidecar's Redis processes."""
        single = {"upstream": [self.upstream.pid]}
        if target.name in self.redis_pids:
            single["redis"] = self.redis_pids[target.name]
        single |= self.extra_pids.get(target.name, {})
        return CpuMeter({"proxy": target.pid}, single)


def rig(launcher: Launcher, identities: int) -> Rig:
    require_wrk()
    upstream = launcher.mock()
    probe = chat(identities)
    launcher.checked(upstream, "the mock upstream", probe)
    references = launcher.references(upstream, probe, ("nginx", "bare"))
    bodies = probe.write_bodies(launcher.workdir / "chat-bodies.jsonl")
    return Rig(
        launcher, upstream, references, probe, {"WRK_BODIES": str(bodies), "WRK_API_KEY": API_KEY}
    )


def measure(
    rig: Rig,
    sidecars: Sequence[Target],
    *,
    repeats: int,
    duration: int,
    warmup: int,
    load: Load,
    label: str = "",
) -> dict[str, Any]:
    """Warm each sidecar up, then the rounds over references and sidecars; each figure's median
    (min-max) over the rounds, and each sidecar's ratio to each reference within a round."""
    for target in sidecars if warmup else ():
        log(f"{label}warm-up: wrk -d{warmup}s against {target.name}")
        run_wrk(f"http://127.0.0.1:{target.port}{CHAT_PATH}", warmup, load, env=rig.wrk_env)
    targets = [*rig.references, *sidecars]
    runs = saturation_rounds(targets, repeats, duration, load, rig.wrk_env, rig.meter, label)
    names = [t.name for t in sidecars]
    return {"runs": runs, "summary": compare(runs, KEY, names, rig.reference_names)}


def ratio_of(measured: Mapping[str, Any], subject: str, reference: str) -> dict[str, Any]:
    """`subject` over `reference` (two of the sidecars) within each round: median, min, max."""
    ratios: dict[str, Any] = compare(measured["runs"], KEY, [subject], [reference])[subject]
    return dict(ratios[f"over_{reference}"])


def table(measured: Mapping[str, Any], rig: Rig) -> list[str]:
    return compare_table(measured["summary"], KEY, "requests/s", rig.reference_names)


def details(
    measured: Mapping[str, Any], names: Sequence[str], columns: Sequence[tuple[str, str, int]]
) -> list[str]:
    """One row per target: the median (min-max) over the rounds of each `(key, label, digits)`
    column, a dotted path into a round's figures for the target."""
    rows = []
    for name in names:
        flat = [flatten(run[name]) for run in measured["runs"] if name in run]
        row = [name]
        for key, _, digits in columns:
            values = [f[key] for f in flat if key in f]
            row.append(spread_text(spread(values), digits) if values else "-")
        rows.append(row)
    return report_table(["target", *(label for _, label, _ in columns)], rows)


DETAILS = (
    ("p50_ms", "p50 ms", 2),
    ("p99_ms", "p99 ms", 2),
    ("http_errors", "status >= 400", 0),
    ("socket_errors", "socket errors", 0),
    ("cpu.proxy_cores", "proxy cores", 2),
    ("cpu.proxy_us_per_request", "proxy CPU us/request", 0),
    ("cpu.redis_cores", "Redis cores", 2),
)
