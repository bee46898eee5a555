from __future__ import annotations

import subprocess
import sys
import time

from bench.lib.sampling import RssSampler


def test_rss_sampler_reads_a_process_tree() -> None:
    # A process of its own: the test process has children of other tests' fixtures.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with RssSampler(child.pid, interval=0.05) as sampler:
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    out = sampler.result(workers=1, series=True)
    assert out["tree"]["samples"] >= 3 and out["tree"]["start_kb"] > 0
    assert out["worker_processes"] == 1 and out["processes"][0]["role"] == "main"
    assert len(out["series"]) == out["tree"]["samples"]
