"""`sidecar budgets list|create|reset` against a served sidecar."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient
from tests.support.cli import at, cli


async def test_create_list_and_reset(
    api: ApiClient, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await cli(
        capsys, "budgets", "create", "--identity", "ann", "--amount-usd", "50",
        "--token-limit", "2000000", "--alert", "80", "--alert", "100", *at(api),
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    header, row = out.splitlines()
    assert header.split() == [
        "_ID", "SCOPE", "PERIOD", "USED_USD", "AMOUNT_USD", "USED_TOKENS", "TOKEN_LIMIT", "RPM",
        "ALERTS", "ACTIVE", "RESETS_AT",
    ]  # fmt: skip
    budget_id = row.split()[0]
    assert row.split()[1:] == [
        "identity:ann", "monthly", "0.00", "50.00", "0", "2000000", "-", "80%,100%", "yes",
        "2026-12-01T00:00:00Z",
    ]  # fmt: skip

    api.app.services.clock.advance(0.01)
    code, out, err = await cli(
        capsys, "budgets", "create", "--tag", "team-a", "--rpm", "60", "--period", "one_time",
        "--inactive", "--json", *at(api),
    )  # fmt: skip
    assert code == 0, err
    team = json.loads(out)
    assert team["scope"] == {"kind": "tag", "target": "team-a"} and team["is_active"] is False

    code, out, err = await cli(capsys, "budgets", "list", *at(api))
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == [
        team["_id"], budget_id,
    ]  # fmt: skip
    code, out, _ = await cli(capsys, "budgets", "list", "--inactive", *at(api))
    assert [line.split()[0] for line in out.splitlines()[1:]] == [team["_id"]]
    code, out, _ = await cli(
        capsys, "budgets", "list", "--kind", "identity", "--limit", "1", *at(api)
    )
    assert len(out.splitlines()) == 2

    # Something was spent; reset brings it back to zero.
    stored = await api.app.services.budgets.store.get(budget_id)
    now_ms = int(api.app.services.clock() * 1000)
    cost_key = next(
        k for k in api.app.services.budgets.store.bucket_keys(stored, now_ms) if ":c:" in k
    )
    await redis.incrby(cost_key, 12_500_000_000)
    code, out, _ = await cli(capsys, "budgets", "list", "--target", "ann", *at(api))
    assert out.splitlines()[1].split()[3] == "12.50"
    code, out, err = await cli(capsys, "budgets", "reset", budget_id, *at(api))
    assert (code, err) == (0, "")
    assert out.splitlines()[1].split()[3] == "0.00"


async def test_errors_exit_2_with_one_line(
    api: ApiClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await cli(capsys, "budgets", "reset", "01JDQ6ZK3N4X8V2B7C9D0E1F2G", *at(api))
    assert (code, out) == (2, "")
    assert err == "sidecar budgets: no budget with _id '01JDQ6ZK3N4X8V2B7C9D0E1F2G'\n"
    code, out, err = await cli(capsys, "budgets", "create", "--identity", "ann", *at(api))
    assert (
        code == 2 and "answered 400" in err and "amount_usd" in err and len(err.splitlines()) == 1
    )
    code, _, err = await cli(
        capsys, "budgets", "create", "--tag", "x", "--amount-usd", "-1", *at(api)
    )
    assert code == 2 and "must be more than 0" in err
    code, _, err = await cli(capsys, "budgets", "create", "--amount-usd", "1", *at(api))
    assert code == 2 and "one of the arguments --identity --tag --owner is required" in err
