from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.quota import loader, windows
from sidecar.quota.policy import Dimension, LimitError, Match, choose, parse_limit
from sidecar.settings import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("dimension", "text", "amount", "window", "calendar"),
    [
        (Dimension.REQUESTS, "600/minute", 600, 60, None),
        (Dimension.REQUESTS, "10 per 2 hours", 10, 7200, None),
        (Dimension.TOKENS, "2000000/hour", 2_000_000, 3600, None),
        (Dimension.REQUESTS, "20000/day", 20000, 86400, "day"),
        (Dimension.COST, "0.50/day", 500_000_000, 86400, "day"),
        (Dimension.COST, "500/month", 500_000_000_000, 2_592_000, "month"),
        (Dimension.COST, "0.000000001/second", 1, 1, None),
    ],
)
def test_limits_parse(
    dimension: Dimension, text: str, amount: int, window: int, calendar: str | None
) -> None:
    limit = parse_limit(dimension, text)
    assert (limit.amount, limit.window_s, limit.calendar) == (amount, window, calendar)


@pytest.mark.parametrize(
    ("dimension", "text"),
    [
        (Dimension.REQUESTS, "lots"),
        (Dimension.REQUESTS, "0.5/minute"),
        (Dimension.REQUESTS, "0/minute"),
        (Dimension.REQUESTS, "5/fortnight"),
        (Dimension.REQUESTS, "5/year"),
        (Dimension.REQUESTS, "5 per 2 days"),
        (Dimension.COST, "$5/day"),
        (Dimension.COST, "0/day"),
        (Dimension.COST, "-1/day"),
    ],
)
def test_bad_limits(dimension: Dimension, text: str) -> None:
    with pytest.raises(LimitError):
        parse_limit(dimension, text)


def test_changing_the_amount_keeps_the_window_key() -> None:
    five = parse_limit(Dimension.REQUESTS, "5/minute")
    ten = parse_limit(Dimension.REQUESTS, "10/minute")
    assert five.key_part == ten.key_part != parse_limit(Dimension.REQUESTS, "5/hour").key_part


def test_matching() -> None:
    pro = Match(metadata={"plan": "pro"})
    assert pro.holds("u", [], {"plan": "pro", "x": 1})
    assert not pro.holds("u", [], {"plan": "free"})
    assert not pro.holds("u", [], {})
    assert not Match(metadata={"seats": 1}).holds("u", [], {"seats": True})
    assert Match(tags=["a", "b"]).holds("u", ["z", "b"], {})
    assert not Match(tags=["a"]).holds("u", ["A"], {})
    assert Match(ids=["team-*"]).holds("team-x", [], {})
    assert not Match(ids=["team-*"]).holds("Team-x", [], {})
    both = Match(tags=["gold"], ids=["svc-*"])
    assert both.holds("svc-1", ["gold"], {}) and not both.holds("user", ["gold"], {})


def test_example_policies_load_and_route() -> None:
    policies = loader.load(["policies/*.toml"], str(ROOT)).policies
    assert [p.name for p in policies] == ["free", "pro", "team", "batch-jobs", "default"]

    def name(external_id: str, tags: list[str], metadata: dict[str, str]) -> str | None:
        chosen = choose(policies, external_id, tags, metadata)
        return chosen.name if chosen else None

    assert name("u", [], {"plan": "pro"}) == "pro"
    assert name("u", ["team"], {}) == "team"
    assert name("job-7", [], {}) == "batch-jobs"
    assert name("someone", [], {}) == "default"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_loader_reports_every_problem_by_file_and_policy(tmp_path: Path) -> None:
    a = write(
        tmp_path / "a.toml",
        """
[[policy]]
name = "one"
requests = ["lots"]

[[policy]]
name = "two"
tokens = ["5/minute"]
colour = "red"

[[policy]]
name = "three"
match = { tag = ["x"] }

[[policy]]
name = "dup"
requests = ["1/minute", "2/minute"]
""",
    )
    b = write(
        tmp_path / "b.toml",
        """
[[policy]]
name = "catch-all"

[[policy]]
name = "late"
match = { tags = ["x"] }

[[policy]]
name = "catch-all"
match = { ids = ["x"] }
""",
    )
    with pytest.raises(ConfigError) as info:
        loader.load(["*.toml"], str(tmp_path))
    assert info.value.problems == [
        f"{a}: policy 'one': requests: 'lots' is not a limit such as '600/minute'",
        f"{a}: policy 'two': colour: unknown field",
        f"{a}: policy 'three': match.tag: unknown field",
        f"{a}: policy 'dup': requests: two limits over the same window ('2/minute')",
        f"{b}: policy 'catch-all': name: also defined in {b}",
        f"{b}: policy 'late': unreachable: the catch-all 'catch-all' ({b}) matches every "
        "identity first",
    ]


def test_files_load_in_name_order(tmp_path: Path) -> None:
    write(tmp_path / "b.toml", '[[policy]]\nname = "second"\nmatch = { tags = ["b"] }\n')
    write(tmp_path / "a.toml", '[[policy]]\nname = "first"\nmatch = { tags = ["a"] }\n')
    policies = loader.load([str(tmp_path / "*.toml")], ".").policies
    assert [p.name for p in policies] == ["first", "second"]


def test_windows_arithmetic() -> None:
    minute = parse_limit(Dimension.REQUESTS, "20/minute")
    # 10 in the previous minute, 15 in this one, 30 s in: 10 * 0.5 + 15 = 20 used: full.
    assert windows.used(minute, 10, 15, 30_000) == 20
    assert not windows.admits(minute, 10, 15, 30_000)
    # It admits once the previous minute's weight falls by one request: 6 s later.
    assert windows.wait_ms(minute, 10, 15, 30_000, 30_000) == 6000
    # 25 in this minute: wait for the next, until 25 * (1 - s/60) <= 19: s = 14.4 s.
    assert windows.wait_ms(minute, 0, 25, 30_000, 30_000) == 30_000 + 14_400
    day = parse_limit(Dimension.COST, "1/day")
    assert windows.wait_ms(day, 0, 10**9, 5_000, 86_395_000) == 86_395_000
    assert windows.admits(day, 0, 10**9 - 1, 0) and not windows.admits(day, 0, 10**9, 0)
    assert windows.bucket(day, 1_795_000_000_000)[0] == "20261118"
    month = parse_limit(Dimension.COST, "1/month")
    name, _, elapsed, left = windows.bucket(month, 1_795_000_000_000)
    assert name == "202611"
    assert elapsed + left == 30 * 86_400_000


@pytest.mark.parametrize(
    ("ms", "text"),
    [(20, "20ms"), (1000, "1s"), (1500, "1.5s"), (360_000, "6m0s"), (3_723_000, "1h2m3s")],
)
def test_reset_durations_read_like_openai(ms: int, text: str) -> None:
    assert windows.duration(ms) == text


def test_breaker_opens_on_an_outage_not_on_one_burst() -> None:
    from sidecar.quota.limiter import Breaker

    now = [0.0]
    breaker = Breaker(threshold=5, open_s=2.0, span_s=0.2, clock=lambda: now[0])
    for _ in range(40):  # forty timeouts at once: a late event loop, not a dead Redis
        breaker.failure()
    assert not breaker.open
    breaker.success()
    for _ in range(5):
        breaker.failure()
        now[0] += 0.06
    assert breaker.open and not breaker.allow()
    now[0] += 2.0
    assert breaker.allow(), "one probe after open_s"
    assert not breaker.allow()
    breaker.success()
    assert not breaker.open and breaker.allow()
