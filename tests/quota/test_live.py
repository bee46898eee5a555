from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.env import MakeEnv
from tests.support.limits import burst, policy_file


@pytest.mark.slow
async def test_hot_reload_keeps_the_window_count(
    make_env: MakeEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = policy_file(tmp_path, '[[policy]]\nname = "p"\nrequests = ["5/minute"]\n')
    env = await make_env(**config)
    assert await burst(env.url, 7, "r") == {200: 5, 429: 2}
    path = Path(config["policies"]["paths"][0])
    path.write_text('[[policy]]\nname = "p"\nrequests = ["10/minute"]\n')
    quota = env.app.services.live
    assert quota.reload()
    assert await burst(env.url, 7, "r") == {200: 5, 429: 2}
    path.write_text('[[policy]]\nname = "p"\nrequests = ["ten/minute"]\n')
    assert not quota.reload()
    assert quota.reload_errors == 1
    health = (await env.api.get("/healthz")).json()
    assert (health["policies"], health["policy_reloads"], health["policy_reload_errors"]) == (
        1,
        1,
        1,
    )
    assert "reload refused" in caplog.text
    assert await burst(env.url, 1, "r") == {429: 1}, "the last good set stays"
    path.write_text('[[policy]]\nname = "p"\nrequests = ["20/minute"]\n')
    for _ in range(60):  # the watcher notices the file within a second or two
        await asyncio.sleep(0.1)
        if quota.policies[0].limits[0].amount == 20:
            break
    assert await burst(env.url, 12, "r") == {200: 10, 429: 2}
