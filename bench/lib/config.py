"""The sidecar's config for a run: a given TOML file, with the benchmark's settings on top."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
LIMITS_POLICY = ROOT / "bench" / "limits-policy.toml"


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Enough TOML for a sidecar config: top-level tables, anything deeper inline."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{toml_key(key)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def sidecar_config(
    directory: Path,
    source: str | None = None,
    *,
    workers: int | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Path, int]:
    """The config a sidecar runs with, and its worker count: the given file (if any) with each
    table of `overrides` merged in and `[server] workers` set.

    Written to DIRECTORY/sidecar.toml, so relative policy paths are made absolute against the
    original file's folder. Ports, URLs, token and data dir come from the environment, which wins.
    """
    raw: dict[str, Any] = {}
    if source:
        path = Path(source).resolve()
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        policies = raw.get("policies")
        if isinstance(policies, dict) and isinstance(policies.get("paths"), list):
            policies["paths"] = [
                os.path.normpath(path.parent / p)
                if isinstance(p, str) and not Path(p).is_absolute()
                else p
                for p in policies["paths"]
            ]
    for name, table in (overrides or {}).items():
        current = raw.setdefault(name, {})
        if not isinstance(current, dict):
            raise ValueError(f"[{name}] in the sidecar config is not a table")
        current.update(table)
    server = raw.setdefault("server", {})
    if not isinstance(server, dict):
        raise ValueError("[server] in the sidecar config is not a table")
    if workers is not None:
        server["workers"] = workers
    server.setdefault("workers", 1)
    written = directory / "sidecar.toml"
    written.write_text(toml_dumps(raw), encoding="utf-8")
    return written, int(server["workers"])


def limits(enabled: bool = True) -> dict[str, dict[str, Any]]:
    """Overrides that put bench/limits-policy.toml (three limits per request) on the path."""
    return {"policies": {"paths": [str(LIMITS_POLICY)]}} if enabled else {}


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--sidecar-env expects NAME=VALUE, got {pair!r}")
        out[name] = value
    return out
