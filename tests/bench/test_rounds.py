from __future__ import annotations

from pathlib import Path

import pytest

from bench.lib import config, rounds, wrk
from bench.lib.processes import Launcher
from tests.support.bench import needs_wrk


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rounds_give_each_sidecar_its_ratio_to_the_references(tmp_path: Path) -> None:
    with Launcher("rounds-test-", str(tmp_path)) as launcher:
        rig = rounds.rig(launcher, 5)
        assert "bare" in rig.reference_names
        redis = launcher.redis()
        path, workers = config.sidecar_config(launcher.folder("one"))
        assert workers == 1
        one = launcher.sidecar("one", path, redis.url, rig.upstream, rig.probe)
        rig.redis_pids["one"] = [redis.process.pid] if redis.process else []
        measured = rounds.measure(
            rig, [one], repeats=2, duration=1, warmup=0, load=wrk.Load(1, 4), label="test "
        )
        procs = list(launcher.procs.values())
    assert procs and not any(p.alive() for p in procs)
    assert redis.process is not None and redis.process.poll() is not None
    runs = measured["runs"]
    names = [*rig.reference_names, "one"]
    assert runs[0]["order"] == names and runs[1]["order"] == list(reversed(names[1:] + names[:1]))
    for run in runs:
        assert run["one"]["http_errors"] == 0 and run["one"]["cpu"]["redis_cores"] >= 0
        assert run["one"]["cpu"]["proxy_us_per_request"] > 0
    over = measured["summary"]["one"]["over_bare"]
    expected = [round(r["one"]["requests_per_s"] / r["bare"]["requests_per_s"], 3) for r in runs]
    assert over["runs"] == expected and over["min"] <= over["median"] <= over["max"]
    table = "\n".join(rounds.table(measured, rig))
    assert "| target | requests/s | / " in table and "| one |" in table
