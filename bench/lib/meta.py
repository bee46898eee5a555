"""Where and with what a run was made: date, commit, machine, tool versions, options."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.lib.processes import ROOT, nginx_binary
from bench.lib.wrk import wrk_binary


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def tool_version(args: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    if not text:
        return None
    line = re.sub(r"\s*Copyright.*", "", text.splitlines()[0])
    return line.removeprefix("nginx version: ")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def bare_description() -> str:
    return (
        f"raw ASGI + aiohttp {package_version('aiohttp')} under uvicorn "
        f"{package_version('uvicorn')} (uvloop, httptools), 1 process"
    )


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def metadata(command: str, options: Mapping[str, Any]) -> dict[str, Any]:
    status = git("status", "--porcelain", "--untracked-files=no")
    wrk = wrk_binary()
    nginx = nginx_binary()
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "command": command,
        "machine": {
            "nproc": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": cpu_model(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "kernel": platform.release(),
        },
        "versions": {
            "python": platform.python_version(),
            "wrk": tool_version([wrk, "-v"]) if wrk else None,
            "nginx": tool_version([nginx, "-v"]) if nginx else None,
        },
        "options": dict(options),
    }


def finish(meta: dict[str, Any]) -> None:
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]


def heading(title: str, meta: Mapping[str, Any]) -> list[str]:
    """A report's first lines: what was run, when, on which commit and machine."""
    machine = meta["machine"]

    def load(values: Sequence[float]) -> str:
        return " / ".join(f"{x:.2f}" for x in values)

    loads = f"load average at start {load(machine['loadavg_start'])}"
    if meta.get("loadavg_end"):
        loads += f", at end {load(meta['loadavg_end'])}"
    dirty = " (with uncommitted changes)" if meta.get("uncommitted_changes") else ""
    versions = meta["versions"]
    return [
        f"# {title}",
        "",
        f"- Date (UTC): {meta['date_utc']}",
        f"- Commit: `{meta['commit']}`{dirty}",
        f"- Machine: {machine['nproc']} CPUs ({machine.get('cpu_model') or 'unknown'}), {loads}",
        f"- Tools: Python {versions['python']}, {versions.get('wrk') or 'no wrk'}, "
        f"{versions.get('nginx') or 'no nginx'}",
        f"- Command: `{meta['command']}`",
        "",
    ]
