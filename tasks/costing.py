"""Token usage and its cost in USD: pure arithmetic on `Decimal`, exact to the cent and beyond.

Usage semantics follow the API (reference §3.3): input tokens *include* cached and cache-write tokens,
output tokens *include* reasoning tokens (billed as output). Prices come from `schemas.pricing`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

from schemas.pricing import ModelPrice, TokenPrices

TOKENS_PER_PRICE_UNIT = Decimal(1_000_000)
CACHE_WRITE_MULTIPLIER = Decimal("1.25")
"""Cache writes (GPT-5.6 and later) cost 1.25x the uncached input rate of the tier."""

DEFAULT_OUTPUT_TOKENS = 256

CHAT_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
RESPONSES_ENDPOINTS = frozenset({"/v1/responses"})
PROMPT_ONLY_ENDPOINTS = frozenset({"/v1/embeddings", "/v1/moderations"})


@dataclass(frozen=True)
class TokenUsage:
    """Tokens of one request (or a sum of requests).

    `input_tokens` includes `cached_tokens` and `cache_write_tokens`; `output_tokens` includes
    `reasoning_tokens`. Sum with `sum(usages, TokenUsage())`.
    """

    input_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        negative = [f.name for f in fields(self) if getattr(self, f.name) < 0]
        if negative:
            raise ValueError(f"token counts must not be negative: {', '.join(negative)} in {self}")
        if self.cached_tokens + self.cache_write_tokens > self.input_tokens:
            raise ValueError(f"cached + cache-write tokens exceed input tokens in {self}")
        if self.reasoning_tokens > self.output_tokens:
            raise ValueError(f"reasoning tokens exceed output tokens in {self}")

    def __add__(self, other: object) -> TokenUsage:
        if not isinstance(other, TokenUsage):
            return NotImplemented
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )

    @property
    def uncached_input_tokens(self) -> int:
        return self.input_tokens - self.cached_tokens - self.cache_write_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _normalise_endpoint(endpoint: str) -> str:
    path = "/" + endpoint.strip().strip("/")
    return path if path.startswith("/v1/") else "/v1" + path


def _count(mapping: Mapping[str, Any] | None, key: str) -> int:
    """An integer count from a usage (sub)dict; a missing or null dict or key counts as 0."""
    if not mapping:
        return 0
    value = mapping.get(key)
    return 0 if value is None else int(value)


def usage_from_body(endpoint: str, usage: Mapping[str, Any] | None) -> TokenUsage:
    """`TokenUsage` from the `usage` of a result line's `response.body`.

    Shapes: chat/completions (`prompt_tokens`, `prompt_tokens_details`, `completion_tokens`,
    `completion_tokens_details`), responses (`input_tokens`, `input_tokens_details`, `output_tokens`,
    `output_tokens_details`), embeddings/moderations (`prompt_tokens` only). No usage counts as zero.
    """
    path = _normalise_endpoint(endpoint)
    if path in CHAT_ENDPOINTS:
        prefix_in, prefix_out = "prompt", "completion"
    elif path in RESPONSES_ENDPOINTS:
        prefix_in, prefix_out = "input", "output"
    elif path in PROMPT_ONLY_ENDPOINTS:
        return TokenUsage(input_tokens=_count(usage, "prompt_tokens"))
    else:
        supported = sorted(CHAT_ENDPOINTS | RESPONSES_ENDPOINTS | PROMPT_ONLY_ENDPOINTS)
        raise ValueError(f"no token usage shape for endpoint {endpoint!r}; supported: {supported}")
    if not usage:
        return TokenUsage()
    in_details = usage.get(f"{prefix_in}_tokens_details")
    out_details = usage.get(f"{prefix_out}_tokens_details")
    return TokenUsage(
        input_tokens=_count(usage, f"{prefix_in}_tokens"),
        cached_tokens=_count(in_details, "cached_tokens"),
        cache_write_tokens=_count(in_details, "cache_write_tokens"),
        output_tokens=_count(usage, f"{prefix_out}_tokens"),
        reasoning_tokens=_count(out_details, "reasoning_tokens"),
    )


def _rate(price: float | None) -> Decimal:
    """A price as an exact decimal (from its shortest repr: 0.075 -> Decimal('0.075'))."""
    return Decimal(0) if price is None else Decimal(str(price))


def cost_usd(usage: TokenUsage, prices: TokenPrices) -> Decimal:
    """Cost of `usage` at `prices` (one tier, USD per 1M tokens), exact.

    uncached input at `input`; cached at `cached_input` (or `input` when the tier lists none); cache
    writes at 1.25 x `input`; output (reasoning included) at `output` (0 when None).
    """
    rate_in = _rate(prices.input)
    rate_cached = rate_in if prices.cached_input is None else _rate(prices.cached_input)
    per_million = (
        usage.uncached_input_tokens * rate_in
        + usage.cached_tokens * rate_cached
        + usage.cache_write_tokens * rate_in * CACHE_WRITE_MULTIPLIER
        + usage.output_tokens * _rate(prices.output)
    )
    return per_million / TOKENS_PER_PRICE_UNIT


@dataclass(frozen=True)
class CostBreakdown:
    """What a usage cost at Batch rates, what it would have cost at standard rates, and the difference."""

    batch_usd: Decimal = Decimal(0)
    standard_usd: Decimal = Decimal(0)
    savings_usd: Decimal = Decimal(0)

    def __add__(self, other: object) -> CostBreakdown:
        if not isinstance(other, CostBreakdown):
            return NotImplemented
        return CostBreakdown(
            batch_usd=self.batch_usd + other.batch_usd,
            standard_usd=self.standard_usd + other.standard_usd,
            savings_usd=self.savings_usd + other.savings_usd,
        )


def price_usage(usage: TokenUsage, model_price: ModelPrice) -> CostBreakdown:
    """Batch cost of `usage`, against the standard-price equivalent of the same tokens."""
    batch = cost_usd(usage, model_price.batch)
    standard = cost_usd(usage, model_price.standard)
    return CostBreakdown(batch_usd=batch, standard_usd=standard, savings_usd=standard - batch)


def estimate_output_tokens(
    max_tokens: int | None, past_mean: float | None, default: int = DEFAULT_OUTPUT_TOKENS
) -> int:
    """Output tokens to expect per request, for submit-time cost estimates.

    Rule, in order:
    1. past runs of the job give a mean output per request -> `ceil(past_mean)`, capped at `max_tokens`
       (a request can never return more than its cap);
    2. no history, but a cap (`max_tokens` / `max_output_tokens`) -> the cap: an upper bound, so the
       estimate errs on the expensive side;
    3. neither -> `default`.
    """
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must not be negative, got {max_tokens}")
    if default < 0:
        raise ValueError(f"default must not be negative, got {default}")
    if past_mean is not None:
        if not math.isfinite(past_mean) or past_mean < 0:
            raise ValueError(f"past_mean must be a finite number >= 0, got {past_mean}")
        estimate = math.ceil(past_mean)
        return estimate if max_tokens is None else min(estimate, max_tokens)
    return max_tokens if max_tokens is not None else default
