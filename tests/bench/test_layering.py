from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_bench_needs_nothing_from_tests_and_the_sidecar_nothing_from_its_testing_helpers() -> None:
    bench = {p: imports(p) for p in (ROOT / "bench").rglob("*.py")}
    assert bench and not {p: m for p, m in bench.items() if any(i.startswith("tests") for i in m)}
    testing = ROOT / "sidecar" / "testing"
    served = {p: imports(p) for p in (ROOT / "sidecar").rglob("*.py") if testing not in p.parents}
    assert not {p: m for p, m in served.items() if any("sidecar.testing" in i for i in m)}
