from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.quota import loader
from sidecar.quota.policy import choose
from sidecar.settings import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_example_policies_load_and_route() -> None:
    policies = loader.load(["policies/*.toml"], str(ROOT)).policies
    assert [p.name for p in policies] == ["free", "pro", "team", "batch-jobs", "default"]

    def name(external_id: str, tags: list[str], metadata: dict[str, str]) -> str | None:
        chosen = choose(policies, external_id, tags, metadata)
        return chosen.name if chosen else None

    assert name("u", [], {"plan": "pro"}) == "pro"
    assert name("u", ["team"], {}) == "team"
    assert name("job-7", [], {}) == "batch-jobs"
    assert name("someone", [], {}) == "default"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_loader_reports_every_problem_by_file_and_policy(tmp_path: Path) -> None:
    a = write(
        tmp_path / "a.toml",
        """
[[policy]]
name = "one"
requests = ["lots"]

[[policy]]
name = "two"
tokens = ["5/minute"]
colour = "red"

[[policy]]
name = "three"
match = { tag = ["x"] }

[[policy]]
name = "dup"
requests = ["1/minute", "2/minute"]
""",
    )
    b = write(
        tmp_path / "b.toml",
        """
[[policy]]
name = "catch-all"

[[policy]]
name = "late"
match = { tags = ["x"] }

[[policy]]
name = "catch-all"
match = { ids = ["x"] }
""",
    )
    with pytest.raises(ConfigError) as info:
        loader.load(["*.toml"], str(tmp_path))
    assert info.value.problems == [
        f"{a}: policy 'one': requests: 'lots' is not a limit such as '600/minute'",
        f"{a}: policy 'two': colour: unknown field",
        f"{a}: policy 'three': match.tag: unknown field",
        f"{a}: policy 'dup': requests: two limits over the same window ('2/minute')",
        f"{b}: policy 'catch-all': name: also defined in {b}",
        f"{b}: policy 'late': unreachable: the catch-all 'catch-all' ({b}) matches every "
        "identity first",
    ]


def test_files_load_in_name_order(tmp_path: Path) -> None:
    write(tmp_path / "b.toml", '[[policy]]\nname = "second"\nmatch = { tags = ["b"] }\n')
    write(tmp_path / "a.toml", '[[policy]]\nname = "first"\nmatch = { tags = ["a"] }\n')
    policies = loader.load([str(tmp_path / "*.toml")], ".").policies
    assert [p.name for p in policies] == ["first", "second"]
