"""wrk: running it with bench/wrk/post_json.lua, reading its figures, saturating one target."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lib.client import Target, rotated
from bench.lib.payloads import CHAT_PATH
from bench.lib.processes import clean_env
from bench.lib.report import log
from bench.lib.sampling import CpuMeter, RssSampler

POST_JSON = Path(__file__).resolve().parent.parent / "wrk" / "post_json.lua"

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass(frozen=True)
class Load:
    threads: int = 2
    connections: int = 64


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def require_wrk() -> str:
    binary = wrk_binary()
    if binary is None:
        raise FileNotFoundError("wrk is required (apt-get install wrk)")
    return binary


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk_text(text: str) -> dict[str, Any]:
    """The figures of wrk's human-readable `--latency` report (rounded by wrk)."""
    out: dict[str, Any] = {}
    if m := re.search(r"Requests/sec:\s*([\d.]+)", text):
        out["requests_per_s"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+\w+),", text):
        out["requests"] = int(m.group(1))
        out["duration_s"] = _ms(m.group(2)) / 1000
    if "Latency Distribution" in text:
        dist = text.split("Latency Distribution", 1)[1]
        for pct, value in re.findall(r"^\s*(\d+)%\s+([\d.]+\w+)\s*$", dist, re.M):
            out[f"p{pct}_ms"] = round(_ms(value), 4)
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    ):
        errors = dict(zip(errors, map(int, m.groups()), strict=True))
    out["socket_errors"] = sum(errors.values())
    out["socket_error_kinds"] = errors
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["http_errors"] = int(m.group(1)) if m else 0
    out["source"] = "text"
    return out


def parse_wrk(text: str) -> dict[str, Any]:
    """Exact figures from the script's WRK_JSON line; the text report when that is missing."""
    match = re.search(r"^WRK_JSON (\{.*\})\s*$", text, re.M)
    if not match:
        return parse_wrk_text(text)
    raw = json.loads(match.group(1))
    lat = raw["latency_us"]
    errors = {k: raw["errors"][k] for k in ("connect", "read", "write", "timeout")}
    duration_s = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "duration_s": round(duration_s, 3),
        "requests_per_s": round(raw["requests"] / duration_s, 1) if duration_s else 0.0,
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "p999_ms": lat["p999"] / 1000,
        "mean_ms": round(lat["mean"] / 1000, 4),
        "max_ms": lat["max"] / 1000,
        # wrk counts status > 399 here; the text report calls them "Non-2xx or 3xx responses".
        "http_errors": raw["errors"]["status"],
        "socket_errors": sum(errors.values()),
        "socket_error_kinds": errors,
        "source": "lua",
    }


def run_wrk(
    url: str,
    duration: int,
    load: Load,
    *,
    script: Path | None = POST_JSON,
    env: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], float]:
    """One wrk run; its figures and the CPU seconds wrk itself used. `env` reaches the script
    (WRK_BODIES, WRK_HEADERS, WRK_API_KEY: see bench/wrk/post_json.lua)."""
    args = [require_wrk(), f"-t{load.threads}", f"-c{load.connections}", f"-d{duration}s"]
    args += ["--timeout", "5s", "--latency"]
    if script is not None:
        args += ["-s", str(script)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # run() kills wrk on timeout and on any exception (Ctrl-C included).
    done = subprocess.run(
        [*args, url],
        capture_output=True,
        text=True,
        env=clean_env() | dict(env or {}),
        timeout=duration + 60,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return parse_wrk(done.stdout), cpu


def saturate(
    target: Target,
    path: str,
    duration: int,
    load: Load,
    env: Mapping[str, str],
    meter: CpuMeter,
    rss: RssSampler | None = None,
) -> dict[str, Any]:
    """wrk against one target, with the cores each process group used (and its RSS, if asked);
    a `proxy` group's CPU time per answered request too."""
    meter.start()
    with contextlib.ExitStack() as stack:
        if rss is not None:
            stack.enter_context(rss)
        figures, wrk_cpu = run_wrk(f"http://127.0.0.1:{target.port}{path}", duration, load, env=env)
    meter.stop()
    wall = max(float(figures.get("duration_s") or duration), 1e-3)
    figures["cpu"] = {"wrk_cores": round(wrk_cpu / wall, 2)} | meter.cores(wall)
    if "proxy" in meter.used and figures.get("requests"):
        figures["cpu"]["proxy_us_per_request"] = round(
            meter.used["proxy"] / figures["requests"] * 1e6, 1
        )
    return figures


def saturation_rounds(
    targets: Sequence[Target],
    repeats: int,
    duration: int,
    load: Load,
    env: Mapping[str, str],
    meter: Callable[[Target], CpuMeter],
    label: str = "",
) -> list[dict[str, Any]]:
    """`repeats` rounds of wrk against every target in turn, the order rotated each round and
    reversed every other one, so that no target always runs first or after the same one (with
    two targets: the order alternates)."""
    runs: list[dict[str, Any]] = []
    for index in range(repeats):
        order = rotated(targets, index)
        if index % 2:
            order.reverse()
        run: dict[str, Any] = {"index": index, "order": [t.name for t in order]}
        for target in order:
            figures = saturate(target, CHAT_PATH, duration, load, env, meter(target))
            run[target.name] = figures
            log(
                f"{label}run {index + 1}, {target.name}: {figures['requests_per_s']:,.0f} "
                f"requests/s, p99 {figures['p99_ms']:.1f} ms"
            )
        runs.append(run)
    return runs
