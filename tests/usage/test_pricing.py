from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

import genai_prices
import msgspec
import pytest
from genai_prices import data_snapshot
from genai_prices import types as catalogue

from sidecar.usage.model import Kind, Usage
from sidecar.usage.pricing import Cost, ModelPrice, Pricer, _calc_price_nanos, _flat_rates

AT = datetime(2026, 3, 2, 15, 30, tzinfo=UTC)

USAGE = Usage(
    input_tokens=1000,
    cached_input_tokens=200,
    cache_write_tokens=100,
    output_tokens=300,
    reasoning_tokens=120,
)


def genai_nanos(model: str, usage: Usage, provider_id: str | None = None, at: datetime = AT) -> int:
    result = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens,
            cache_read_tokens=usage.cached_input_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            output_tokens=usage.output_tokens,
            output_reasoning_tokens=usage.reasoning_tokens,
        ),
        model,
        provider_id=provider_id,
        genai_request_timestamp=at,
    )
    return int((result.total_price * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --- order of sources -------------------------------------------------------------------------


def test_upstream_cost_in_the_body_wins() -> None:
    usage = msgspec.structs.replace(USAGE, cost_nanos=1234)
    cost = Pricer().cost(model="gpt-4o", usage=usage, kind=Kind.CHAT, header_cost_nanos=999)
    assert cost == Cost(1234, True, "upstream")


def test_header_cost_when_the_body_has_none() -> None:
    cost = Pricer().cost(model="gpt-4o", usage=USAGE, kind=Kind.CHAT, header_cost_nanos=999)
    assert cost == Cost(999, True, "upstream")


def test_upstream_cost_beats_an_override() -> None:
    pricer = Pricer({"gpt-4o": ModelPrice(input_per_mtok=1.0, output_per_mtok=2.0)})
    cost = pricer.cost(model="gpt-4o", usage=USAGE, kind=Kind.CHAT, header_cost_nanos=5)
    assert cost == Cost(5, True, "upstream")


def test_a_zero_upstream_cost_defers_to_the_catalogue() -> None:
    zero = msgspec.structs.replace(USAGE, cost_nanos=0)
    cost = Pricer().cost(model="gpt-4o", usage=zero, kind=Kind.CHAT, at=AT)
    assert cost == Cost(genai_nanos("gpt-4o", USAGE), True, "catalogue")
    header = Pricer().cost(model="gpt-4o", usage=USAGE, kind=Kind.CHAT, header_cost_nanos=0)
    assert header.source == "catalogue"


def test_a_zero_upstream_cost_stands_when_nothing_else_knows() -> None:
    cost = Pricer().cost(model="my-own-model", usage=USAGE, kind=Kind.CHAT, header_cost_nanos=0)
    assert cost == Cost(0, True, "upstream")


def test_override_beats_the_catalogue() -> None:
    pricer = Pricer({"gpt-4o": ModelPrice(input_per_mtok=1.0, output_per_mtok=2.0)})
    assert pricer.cost(model="gpt-4o", usage=USAGE, kind=Kind.CHAT).source == "override"


# --- overrides ----------------------------------------------------------------------------------


def test_override_is_exact_in_nanos() -> None:
    pricer = Pricer({"my-finetune": ModelPrice(input_per_mtok=1.0, output_per_mtok=2.0)})
    usage = Usage(input_tokens=1, output_tokens=1)
    # $1 per million tokens is 1000 nano-dollars per token.
    assert pricer.cost(model="my-finetune", usage=usage, kind=Kind.CHAT) == Cost(
        3000, True, "override"
    )
    big = Usage(input_tokens=1_000_000, output_tokens=3_000_000)
    assert pricer.cost(model="my-finetune", usage=big, kind=Kind.CHAT).nanos == 7 * 10**9


def test_override_cache_prices_default_to_the_input_price() -> None:
    pricer = Pricer({"m": ModelPrice(input_per_mtok=1.0, output_per_mtok=2.0)})
    # 1000 input tokens (cached or not) at 1000 nanos, 300 output at 2000.
    assert pricer.cost(model="m", usage=USAGE, kind=Kind.CHAT).nanos == 1_000_000 + 600_000


def test_override_cache_prices() -> None:
    price = ModelPrice(
        input_per_mtok=3.0,
        output_per_mtok=15.0,
        cached_input_per_mtok=0.3,
        cache_write_per_mtok=3.75,
    )
    cost = Pricer({"m": price}).cost(model="m", usage=USAGE, kind=Kind.CHAT)
    # 700 uncached * 3000 + 200 cached * 300 + 100 written * 3750 + 300 output * 15000
    assert cost == Cost(2_100_000 + 60_000 + 375_000 + 4_500_000, True, "override")


def test_override_rounds_half_up() -> None:
    pricer = Pricer({"m": ModelPrice(input_per_mtok=0.0005, output_per_mtok=0.0)})
    # 0.5 nanos per token.
    assert pricer.cost(model="m", usage=Usage(input_tokens=1), kind=Kind.CHAT).nanos == 1
    assert pricer.cost(model="m", usage=Usage(input_tokens=3), kind=Kind.CHAT).nanos == 2


def test_override_matches_without_a_provider_prefix() -> None:
    pricer = Pricer({"my-finetune": ModelPrice(input_per_mtok=1.0, output_per_mtok=2.0)})
    cost = pricer.cost(model="openai/my-finetune", usage=USAGE, kind=Kind.CHAT)
    assert cost.source == "override"


def test_override_uses_the_response_model_when_none_is_given() -> None:
    pricer = Pricer({"my-finetune": ModelPrice(input_per_mtok=1.0, output_per_mtok=2.0)})
    usage = msgspec.structs.replace(USAGE, model="my-finetune")
    assert pricer.cost(model=None, usage=usage, kind=Kind.CHAT).source == "override"


@pytest.mark.parametrize(
    "raw",
    [
        {"input_per_mtok": -1.0, "output_per_mtok": 1.0},
        {"input_per_mtok": float("inf"), "output_per_mtok": 1.0},
        {"input_per_mtok": 1.0, "output_per_mtok": float("nan")},
        {"input_per_mtok": 1.0, "output_per_mtok": 1.0, "cached_input_per_mtok": -0.1},
        {"input_per_mtok": 1.0, "output_per_mtok": 1.0, "output_per_mtk": 1.0},
        {"input_per_mtok": 1.0},
    ],
)
def test_bad_override_is_rejected(raw: dict[str, float]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(raw, ModelPrice)


# --- the catalogue ------------------------------------------------------------------------------


def test_gpt_4o() -> None:
    usage = Usage(input_tokens=1000, cached_input_tokens=200, output_tokens=300)
    cost = Pricer().cost(model="gpt-4o", usage=usage, kind=Kind.CHAT, at=AT)
    # $2.50 / $1.25 cached / $10 per million: 800*2500 + 200*1250 + 300*10000 nanos.
    assert cost == Cost(2_000_000 + 250_000 + 3_000_000, True, "catalogue")
    assert cost.nanos == genai_nanos("gpt-4o", usage)


def test_provider_prefix_is_stripped() -> None:
    pricer = Pricer()
    plain = pricer.cost(model="gpt-4o", usage=USAGE, kind=Kind.CHAT, at=AT)
    assert pricer.cost(model="openai/gpt-4o", usage=USAGE, kind=Kind.CHAT, at=AT) == plain
    assert plain.priced


def test_dated_claude_name() -> None:
    cost = Pricer().cost(model="claude-sonnet-4-20250514", usage=USAGE, kind=Kind.MESSAGES, at=AT)
    # $3 input, $3.75 cache write, $0.30 cache read, $15 output per million:
    # 700*3000 + 100*3750 + 200*300 + 300*15000 nanos.
    assert cost == Cost(2_100_000 + 375_000 + 60_000 + 4_500_000, True, "catalogue")
    assert cost.nanos == genai_nanos("claude-sonnet-4-20250514", USAGE, "anthropic")


def test_one_embedding_token_is_not_free() -> None:
    cost = Pricer().cost(
        model="text-embedding-3-small", usage=Usage(input_tokens=1), kind=Kind.EMBEDDINGS
    )
    # $0.02 per million tokens.
    assert cost == Cost(20, True, "catalogue")


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("vertex_ai/gemini-2.5-pro", Kind.CHAT),
        ("gemini/gemini-2.0-flash", Kind.CHAT),
        ("azure/gpt-4o", Kind.CHAT),
        ("anthropic/claude-sonnet-4-20250514", Kind.CHAT),
        ("claude-3-5-haiku-latest", Kind.MESSAGES),
        ("o3", Kind.RESPONSES),
        ("deepseek-chat", Kind.CHAT),
    ],
)
def test_litellm_style_names_are_priced(model: str, kind: Kind) -> None:
    assert Pricer().cost(model=model, usage=USAGE, kind=kind, at=AT).source == "catalogue"


@pytest.mark.parametrize(
    "model", [None, "", "no-such-model", "openai/no-such-model", "hosted_vllm/my-llama"]
)
def test_unknown_model_is_unpriced(model: str | None) -> None:
    assert Pricer().cost(model=model, usage=USAGE, kind=Kind.CHAT) == Cost(0, False, "unpriced")


def test_repeated_calls_price_each_usage() -> None:
    pricer = Pricer()
    small = pricer.cost(model="gpt-4o", usage=Usage(input_tokens=1), kind=Kind.CHAT)
    large = pricer.cost(model="gpt-4o", usage=Usage(input_tokens=1000), kind=Kind.CHAT)
    assert (small.nanos, large.nanos) == (2500, 2_500_000)


def test_prices_that_depend_on_the_time_follow_at() -> None:
    # Models whose price changes by date or time of day (DeepSeek's off-peak hours, price cuts).
    pricer = Pricer()
    compared = 0
    for provider in data_snapshot.get_snapshot().providers:
        for info in provider.models:
            if not isinstance(info.prices, list):
                continue
            for at in (datetime(2025, 1, 1, 3, tzinfo=UTC), AT):
                try:
                    expected = genai_nanos(info.id, USAGE, provider.id, at)
                except LookupError:
                    continue
                model = f"{provider.id}/{info.id}"
                cost = pricer.cost(model=model, usage=USAGE, kind=Kind.CHAT, at=at)
                assert cost == Cost(expected, True, "catalogue"), (model, at)
                compared += 1
    assert compared > 20


def test_tiered_prices_follow_the_request_size() -> None:
    pricer = Pricer()
    small = Usage(input_tokens=100_000, output_tokens=1000)
    large = Usage(input_tokens=300_000, output_tokens=1000)
    for usage in (small, large):
        cost = pricer.cost(model="gemini-2.5-pro", usage=usage, kind=Kind.CHAT, at=AT)
        assert cost.nanos == genai_nanos("gemini-2.5-pro", usage, "google")
    small_cost = pricer.cost(model="gemini-2.5-pro", usage=small, kind=Kind.CHAT).nanos
    large_cost = pricer.cost(model="gemini-2.5-pro", usage=large, kind=Kind.CHAT).nanos
    # Three times the tokens, past the 200k threshold: more than three times the price.
    assert large_cost > 3 * small_cost


def test_flat_rates_agree_with_genai_prices_across_the_catalogue() -> None:
    # Pricer computes flat catalogue prices itself; they must match genai-prices to the nano.
    rng = random.Random(7)
    compared = 0
    for provider in data_snapshot.get_snapshot().providers:
        for info in provider.models:
            price = info.get_prices(AT)
            rates = _flat_rates(price)
            if rates is None:
                continue
            for _ in range(3):
                total_in = rng.randrange(0, 5_000_000)
                cached = rng.randrange(0, total_in + 1)
                written = rng.randrange(0, total_in - cached + 1)
                total_out = rng.randrange(0, 200_000)
                usage = Usage(
                    input_tokens=total_in,
                    cached_input_tokens=cached,
                    cache_write_tokens=written,
                    output_tokens=total_out,
                    reasoning_tokens=rng.randrange(0, total_out + 1),
                )
                expected = _calc_price_nanos(provider, info, usage, AT)
                assert rates.nanos(usage) == expected, (provider.id, info.id, usage)
                compared += 1
    assert compared > 1000


def test_a_swapped_snapshot_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    pricer = Pricer()
    assert pricer.cost(model="gpt-4o", usage=USAGE, kind=Kind.CHAT).priced
    empty = data_snapshot.DataSnapshot(providers=[], from_auto_update=True)
    monkeypatch.setattr(data_snapshot, "get_snapshot", lambda: empty)
    assert pricer.cost(model="gpt-4o", usage=USAGE, kind=Kind.CHAT).source == "unpriced"


def test_catalogue_types_are_what_pricer_expects() -> None:
    # Pricer relies on these genai-prices names; an upgrade that moves them should fail here.
    _, info = data_snapshot.get_snapshot().find_provider_model("gpt-4o", None, "openai", None)
    assert isinstance(info.prices, catalogue.ModelPrice)
    assert isinstance(info.get_prices(AT), catalogue.ModelPrice)
