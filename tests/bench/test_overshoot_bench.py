from __future__ import annotations

from pathlib import Path

from bench import overshoot_bench as ovs
from sidecar.quota.loader import load
from sidecar.quota.policy import Dimension, choose


def test_without_the_output_cap_the_two_request_kinds_err_in_opposite_directions() -> None:
    kinds = ovs.shapes(cap_output=False)
    under, over = kinds["under"], kinds["over"]
    assert under.estimate_tokens > under.actual_tokens and under.estimate_nanos > under.actual_nanos
    assert over.estimate_tokens < over.actual_tokens and over.estimate_nanos < over.actual_nanos
    assert b"max_tokens" in under.body and b"max_tokens" not in over.body


def test_with_the_output_cap_every_estimate_is_an_upper_bound() -> None:
    for kind in ovs.shapes().values():
        assert kind.estimate_tokens >= kind.actual_tokens
        assert kind.estimate_nanos >= kind.actual_nanos


def test_each_run_identity_gets_the_policy_sized_for_its_request_and_concurrency(
    tmp_path: Path,
) -> None:
    kinds = ovs.shapes()
    path = tmp_path / "policies.toml"
    path.write_text(
        "".join(
            ovs.policy_toml(name, c, ovs.sized(kind, c, [20, 50, 300]))
            for name, kind in kinds.items()
            for c in (1, 20, 200)
        )
    )
    policies = load([str(path)], str(tmp_path)).policies
    over = kinds["over"]
    chosen = choose(policies, "ovs-policy-cost-over-c20-r2-1700000000000", [], {})
    assert chosen is not None and chosen.name == "cost-over-c20"
    (limit,) = chosen.limits
    assert limit.dimension is Dimension.COST and limit.calendar == "day"
    assert limit.amount == 50 * over.actual_nanos + over.actual_nanos // 2
    tokens = choose(policies, "ovs-policy-tokens-under-c200-r0-1", [], {})
    assert tokens is not None and tokens.name == "tokens-under-c200"
    assert choose(policies, "ovs-budget-tokens-under-c20-r0-1", [], {}) is None
