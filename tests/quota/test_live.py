from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.identity.resolve import Resolved, Source
from sidecar.quota import service
from tests.support.env import Env, MakeEnv
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


async def _policy_name(env: Env, who: str) -> str | None:
    services = env.app.services
    resolved = Resolved(who, Source.HEADER)
    policy = await services.quota.policy_for(await services.identifier.identify(resolved), resolved)
    return policy.name if policy is not None else None


async def test_a_reload_that_moves_an_identity_to_another_policy_applies_at_its_next_request(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    # With no policy matching on tags or metadata, each identity's choice is kept by id
    # (Quota._chosen_by_id); a reload must start it again.
    first = (
        '[[policy]]\nname = "acme"\nmatch = { ids = ["acme-*"] }\nrequests = ["2/minute"]\n'
        '[[policy]]\nname = "rest"\nrequests = ["100/minute"]\n'
    )
    config = policy_file(tmp_path, first)
    env = await make_env(**config)
    assert await burst(env.url, 3, "acme-1") == {200: 2, 429: 1}
    assert await burst(env.url, 3, "globex-1") == {200: 3}
    Path(config["policies"]["paths"][0]).write_text(
        first.replace('ids = ["acme-*"]', 'ids = ["globex-*"]')
    )
    assert env.app.services.live.reload()
    # The requests window is kept across policies (its key is the window, not the policy):
    # acme-1's two count under "rest" now, globex-1's three under the new "acme" of two.
    assert await burst(env.url, 3, "acme-1") == {200: 3}
    assert await burst(env.url, 1, "globex-1") == {429: 1}
    assert await _policy_name(env, "acme-1") == "rest"
    assert await _policy_name(env, "globex-1") == "acme"


async def test_policy_choices_kept_by_id_are_bounded(
    make_env: MakeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "CHOSEN_MAX", 3)
    text = (
        '[[policy]]\nname = "a"\nmatch = { ids = ["a-*"] }\nrequests = ["1/minute"]\n'
        '[[policy]]\nname = "b"\nrequests = ["5/minute"]\n'
    )
    env = await make_env(**policy_file(tmp_path, text))
    for who in ("a-1", "b-1", "b-2", "b-3", "a-2"):
        assert await burst(env.url, 1, who) == {200: 1}
    assert len(env.app.services.quota._chosen) <= 3
    assert await burst(env.url, 1, "a-1") == {429: 1}, "chosen again after the clear: still a"
    assert await _policy_name(env, "b-1") == "b"
