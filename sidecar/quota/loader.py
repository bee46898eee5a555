from __future__ import annotations

import glob
import tomllib
from collections.abc import Sequence
from pathlib import Path

import msgspec

from sidecar._msgspec import describe
from sidecar.quota.policy import LimitError, Policy, PolicyFile, build
from sidecar.settings import ConfigError, resolve_path


class PolicySet(msgspec.Struct, frozen=True):
    policies: tuple[Policy, ...]
    files: tuple[str, ...]


def policy_files(patterns: Sequence[str], base_dir: str) -> list[Path]:
    """Every file the patterns name, in name order."""
    found: set[Path] = set()
    for pattern in patterns:
        path = resolve_path(base_dir, pattern)
        found.update(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
    return sorted(found, key=lambda p: (p.name, str(p)))


def _describe_policy(raw: object, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"policy {name!r}" if isinstance(name, str) else f"policy[{index}]"


def load(patterns: Sequence[str], base_dir: str) -> PolicySet:
    """The policies of every file, in order; ConfigError lists every problem, each naming the
    file and the policy."""
    problems: list[str] = []
    policies: list[Policy] = []
    seen: dict[str, str] = {}
    files = policy_files(patterns, base_dir)
    for file in files:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{file}: cannot read: {exc}")
            continue
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{file}: invalid TOML: {exc}")
            continue
        unknown = sorted(set(raw) - {"policy"})
        problems += [f"{file}: {key}: unknown key" for key in unknown]
        entries = raw.get("policy", [])
        if not isinstance(entries, list):
            problems.append(f"{file}: policy: expected [[policy]] tables")
            continue
        for index, entry in enumerate(entries):
            where = f"{file}: {_describe_policy(entry, index)}"
            try:
                parsed = msgspec.convert({"policy": [entry]}, PolicyFile).policy[0]
            except msgspec.ValidationError as exc:
                key, message = describe(exc, "")
                key = key.removeprefix(".policy[0]").lstrip(".") or "policy"
                problems.append(f"{where}: {key}: {message}")
                continue
            try:
                policy = build(parsed, str(file))
            except LimitError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if policy.name in seen:
                problems.append(f"{where}: name: also defined in {seen[policy.name]}")
                continue
            seen[policy.name] = str(file)
            policies.append(policy)
    catch_all = next((p for p in policies if p.match.empty), None)
    if catch_all is not None:
        after = policies[policies.index(catch_all) + 1 :]
        for policy in after:
            problems.append(
                f"{policy.source}: policy {policy.name!r}: unreachable: the catch-all "
                f"{catch_all.name!r} ({catch_all.source}) matches every identity first"
            )
    if problems:
        raise ConfigError(problems)
    return PolicySet(tuple(policies), tuple(str(f) for f in files))
