from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.embedded import (
    STOPPED,
    Sidecar,
    alive,
    create,
    keeps_answering,
    store_pid,
    wait_until,
)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_killed_store_is_restarted_with_its_data(
    data: Path, sidecars: Callable[..., Sidecar]
) -> None:
    sidecar = sidecars(workers=2)  # the store is watched by `serve`, not by one worker
    await sidecar.answers()
    await create(sidecar, "survivor")
    assert await sidecar.health() == {"restarts": 0, "last_restart": None}
    killed = store_pid(data)
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not alive(killed), 5, "not killed")
    took = await sidecar.answers("/v2/identities/survivor", within_s=10)
    assert took < 5, f"the API answered again only after {took:.1f} s"
    await keeps_answering(sidecar, "survivor", for_s=1)  # from every worker
    assert store_pid(data) != killed
    for _ in range(4):  # answered by either worker
        health = await sidecar.health()
        assert health["restarts"] == 1
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", health["last_restart"])
    warnings = sidecar.lines("restarted it")
    assert len(warnings) == 1 and '"level":"WARNING"' in warnings[0], warnings
    assert "was killed by SIGKILL" in warnings[0]
    sidecar.proc.send_signal(signal.SIGTERM)
    assert await sidecar.exited() in STOPPED
    assert sidecar.lines("embedded Redis stopped")
