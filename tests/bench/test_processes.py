from __future__ import annotations

from pathlib import Path

import pytest

from bench.lib import payloads
from bench.lib.client import Target, probe_metered
from bench.lib.processes import Launcher, StartError
from sidecar.testing.redis_server import free_port


@pytest.mark.timeout(60)
def test_a_target_that_does_not_answer_as_expected_is_reported(tmp_path: Path) -> None:
    chat = payloads.chat(1)
    reason = probe_metered(free_port(), chat)
    assert reason is not None and "failed" in reason
    with Launcher("probe-test-", str(tmp_path)) as launcher:
        upstream = launcher.mock()
        assert probe_metered(upstream.port, chat) is None
        nowhere = payloads.Scenario("nowhere", "/v1/no-such-route", chat.requests)
        reason = probe_metered(upstream.port, nowhere)
        assert reason is not None and "answered 404" in reason
        with pytest.raises(StartError, match="answered 404"):
            launcher.checked(Target("x", upstream.port, upstream.pid), "x", nowhere)
        mock = launcher.procs["mock-upstream"]
    assert not mock.alive()
