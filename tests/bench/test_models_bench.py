from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import models_bench


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_models_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models.json"
    argv = ["--memory-identities", "20", "--identities", "30", "--days", "2", "--repeats", "1"]
    assert models_bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    memory = result["memory"]
    assert memory["by_model"] is True and memory["memory_usage_model_hash_per_day"] > 0
    assert memory["used_memory_bytes_per_identity_day"] > memory["memory_usage_day_hash_per_day"]
    export = result["export"]
    # Each answer was checked against what was written; here, its size.
    assert export["group_by=model"]["rows"] == 3
    assert export["group_by=identity,model"]["rows"] == 90
    assert export["group_by=identity"]["rows"] == 30
    assert export["group_by=model"]["csv_bytes"] > len("model,identities\r\n")
    assert "| group_by=model | 3 |" in capfd.readouterr().err
