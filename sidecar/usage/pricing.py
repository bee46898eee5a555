from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import msgspec
from genai_prices import data_snapshot
from genai_prices import types as catalogue

from sidecar.money import EXACT, MAX_NANOS
from sidecar.money import from_usd as nanos_from_usd
from sidecar.usage.model import Kind, Usage


class ModelPrice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None

    def __post_init__(self) -> None:
        # msgspec reports this as a validation error of the config entry; TOML allows inf and nan.
        for price in (
            self.input_per_mtok,
            self.output_per_mtok,
            self.cached_input_per_mtok,
            self.cache_write_per_mtok,
        ):
            if price is not None and not (math.isfinite(price) and price >= 0):
                raise ValueError("prices must be finite and non-negative")


class Cost(msgspec.Struct, frozen=True):
    nanos: int
    priced: bool
    source: str  # "upstream" | "override" | "catalogue" | "unpriced"


_UNPRICED = Cost(0, False, "unpriced")


@dataclass(frozen=True, slots=True)
class _Rates:
    # Nano-dollars per token (a USD price per million tokens is exactly that times 1000) and per
    # request, each times `denominator`: exact prices, priced with integer arithmetic only.
    uncached: int
    cache_read: int
    cache_write: int
    output: int
    reasoning: int
    per_request: int
    denominator: int

    @classmethod
    def of(
        cls,
        *,
        uncached: Decimal,
        cache_read: Decimal,
        cache_write: Decimal,
        output: Decimal,
        reasoning: Decimal,
        per_request: Decimal = Decimal(0),
    ) -> _Rates:
        rates = (uncached, cache_read, cache_write, output, reasoning, per_request)
        places = max(_decimal_places(rate) for rate in rates)

        def scaled(rate: Decimal) -> int:
            return int(rate.scaleb(places, EXACT))

        return cls(
            uncached=scaled(uncached),
            cache_read=scaled(cache_read),
            cache_write=scaled(cache_write),
            output=scaled(output),
            reasoning=scaled(reasoning),
            per_request=scaled(per_request),
            denominator=10**places,
        )

    def nanos(self, usage: Usage) -> int | None:
        uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
        total = (
            self.per_request
            + uncached * self.uncached
            + usage.cached_input_tokens * self.cache_read
            + usage.cache_write_tokens * self.cache_write
            + (usage.output_tokens - usage.reasoning_tokens) * self.output
            + usage.reasoning_tokens * self.reasoning
        )
        if total < 0:
            return None
        # Round half up: floor(total / denominator + 1/2).
        nanos = (2 * total + self.denominator) // (2 * self.denominator)
        return nanos if nanos <= MAX_NANOS else None


def _decimal_places(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _per_token(price_per_mtok: float | Decimal) -> Decimal:
    amount = price_per_mtok if isinstance(price_per_mtok, Decimal) else Decimal(str(price_per_mtok))
    return amount.scaleb(3, EXACT)


def _override_rates(price: ModelPrice) -> _Rates:
    uncached = _per_token(price.input_per_mtok)
    output = _per_token(price.output_per_mtok)
    cached, write = price.cached_input_per_mtok, price.cache_write_per_mtok
    return _Rates.of(
        uncached=uncached,
        cache_read=uncached if cached is None else _per_token(cached),
        cache_write=uncached if write is None else _per_token(write),
        output=output,
        reasoning=output,
    )


def _genai_usage(usage: Usage) -> genai_prices.Usage:
    # genai-prices' input_tokens is all input, cache reads and writes included, as is ours; the
    # same goes for output and reasoning.
    return genai_prices.Usage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
        output_reasoning_tokens=usage.reasoning_tokens,
    )


def _calc_price_nanos(
    provider: catalogue.Provider, info: catalogue.ModelInfo, usage: Usage, at: datetime | None
) -> int | None:
    try:
        result = info.calc_price(_genai_usage(usage), provider, genai_request_timestamp=at)
    except (LookupError, ValueError, TypeError, ArithmeticError):
        return None
    return nanos_from_usd(result.total_price)


# Distinct counts for every part, to check flat rates against genai-prices' own arithmetic.
_PROBE = Usage(
    input_tokens=7_000_003,
    cached_input_tokens=2_000_011,
    cache_write_tokens=1_000_019,
    output_tokens=3_000_029,
    reasoning_tokens=1_000_037,
)


def _flat_rates(price: catalogue.ModelPrice) -> _Rates | None:
    """Rates giving exactly what genai-prices gives for this price, much faster; else None."""
    values = {key: value for key, value in vars(price).items() if value is not None}
    # Tiered prices depend on the size of the request: genai-prices prices those.
    if not all(
        isinstance(value, Decimal) and value.is_finite() and value >= 0 for value in values.values()
    ):
        return None
    # genai-prices charges each token at the most specific unit that has a price, else at its
    # parent's. Units we never report (audio, searches, ...) count zero.
    uncached = _per_token(values.get("input_mtok", Decimal(0)))
    output = _per_token(values.get("output_mtok", Decimal(0)))
    read = values.get("cache_read_mtok")
    write = values.get("cache_write_mtok")
    reasoning = values.get("output_reasoning_mtok")
    rates = _Rates.of(
        uncached=uncached,
        cache_read=uncached if read is None else _per_token(read),
        cache_write=uncached if write is None else _per_token(write),
        output=output,
        reasoning=output if reasoning is None else _per_token(reasoning),
        # requests_kcount is USD per thousand requests.
        per_request=values.get("requests_kcount", Decimal(0)).scaleb(6, EXACT),
    )
    try:
        expected = nanos_from_usd(price.calc_price(_genai_usage(_PROBE))["total_price"])
    except (ValueError, ArithmeticError):
        return None
    return rates if rates.nanos(_PROBE) == expected else None


@dataclass(frozen=True, slots=True)
class _Resolved:
    provider: catalogue.Provider
    info: catalogue.ModelInfo
    # Set when the model has one flat price. A model whose price changes with the date or the
    # time of day holds a list instead, resolved per call.
    rates: _Rates | None


# LiteLLM provider prefixes that genai-prices does not recognise by itself. It already maps
# gemini/vertex_ai -> google, bedrock -> aws, xai -> x-ai, together_ai -> together.
_PROVIDER_ALIASES = {"fireworks_ai": "fireworks", "azure_ai": "azure"}
# Model names come from upstream responses; a bound keeps a stream of odd names from growing this.
_MAX_RESOLVED = 1024


def _candidates(kind: Kind, model: str) -> list[tuple[str | None, str]]:
    prefix, _, rest = model.partition("/")
    prefixed = bool(prefix and rest)
    bare = rest if prefixed else model
    found: list[tuple[str | None, str]] = []
    if prefixed:
        found.append((_PROVIDER_ALIASES.get(prefix.lower(), prefix.lower()), bare))
    if kind is Kind.MESSAGES:
        found.append(("anthropic", bare))
    found.append((None, model))
    found.append((None, bare))
    if kind is not Kind.MESSAGES:
        # Embedding models, for one, match no provider by name alone.
        found.append(("openai", bare))
    return list(dict.fromkeys(found))


class Pricer:
    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self._overrides = {
            name: _override_rates(price) for name, price in (overrides or {}).items()
        }
        self._snapshot: data_snapshot.DataSnapshot | None = None
        self._resolved: dict[tuple[Kind, str], _Resolved | None] = {}
        # Keyed by id() of a catalogue price the snapshot keeps alive; the price itself is kept
        # alongside to rule out a reused id.
        self._dated: dict[int, tuple[catalogue.ModelPrice, _Rates | None]] = {}

    def cost(
        self,
        *,
        model: str | None,
        usage: Usage,
        kind: Kind,
        header_cost_nanos: int | None = None,
        at: datetime | float | None = None,
    ) -> Cost:
        """Cost of one response. `at` is when it was made (a datetime, or seconds since the
        epoch); some catalogue prices depend on it. A datetime is only made for those: most
        models have one price."""
        # The body's figure comes from whoever billed this response; the header from a proxy on
        # the way, which may have priced it from its own table. So the body's wins.
        upstream = usage.cost_nanos if usage.cost_nanos is not None else header_cost_nanos
        # LiteLLM reports 0 for a model it cannot price, so a zero figure is only taken at its
        # word when nothing below knows better.
        if upstream is not None and upstream > 0:
            return Cost(upstream, True, "upstream")
        name = model or usage.model
        if name:
            rates = self._overrides.get(name)
            if rates is None and "/" in name:
                rates = self._overrides.get(name.partition("/")[2])
            if rates is not None:
                nanos = rates.nanos(usage)
                if nanos is not None:
                    return Cost(nanos, True, "override")
            nanos = self._catalogue(kind, name, usage, at)
            if nanos is not None:
                return Cost(nanos, True, "catalogue")
        if upstream is not None:
            return Cost(upstream, True, "upstream")
        return _UNPRICED

    def _catalogue(
        self, kind: Kind, model: str, usage: Usage, at: datetime | float | None
    ) -> int | None:
        resolved = self._resolve(kind, model)
        if resolved is None:
            return None
        rates = resolved.rates
        if rates is not None:
            return rates.nanos(usage)
        if isinstance(at, float | int):
            at = datetime.fromtimestamp(at, UTC)
        elif at is not None and at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        if at is not None and isinstance(resolved.info.prices, list):
            rates = self._dated_rates(resolved.info.get_prices(at))
            if rates is not None:
                return rates.nanos(usage)
        return _calc_price_nanos(resolved.provider, resolved.info, usage, at)

    def _dated_rates(self, price: catalogue.ModelPrice) -> _Rates | None:
        entry = self._dated.get(id(price))
        if entry is None or entry[0] is not price:
            entry = self._dated[id(price)] = (price, _flat_rates(price))
        return entry[1]

    def _resolve(self, kind: Kind, model: str) -> _Resolved | None:
        snapshot = data_snapshot.get_snapshot()
        if snapshot is not self._snapshot or len(self._resolved) >= _MAX_RESOLVED:
            # A price update (genai-prices' UpdatePrices) swaps the snapshot: start again.
            self._snapshot = snapshot
            self._resolved.clear()
            self._dated.clear()
        key = (kind, model)
        found = self._resolved.get(key, False)  # one lookup: None is an answer too
        if not isinstance(found, bool):
            return found
        resolved = None
        for provider_id, ref in _candidates(kind, model):
            try:
                provider, info = snapshot.find_provider_model(ref, None, provider_id, None)
            except LookupError:
                continue
            flat = info.prices if isinstance(info.prices, catalogue.ModelPrice) else None
            resolved = _Resolved(provider, info, None if flat is None else _flat_rates(flat))
            break
        self._resolved[key] = resolved
        return resolved
