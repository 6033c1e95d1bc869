"""Usage parsing and cost arithmetic, against hand-computed figures."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from schemas.pricing import TokenPrices, load_price_table
from tasks.costing import (
    CostBreakdown,
    TokenUsage,
    cost_usd,
    estimate_output_tokens,
    price_usage,
    usage_from_body,
)

PRICES = load_price_table()


# --- usage shapes -------------------------------------------------------------------------------


def test_chat_usage_shape() -> None:
    usage = {
        "prompt_tokens": 3000,
        "completion_tokens": 1500,
        "total_tokens": 4500,
        "prompt_tokens_details": {
            "cached_tokens": 1280,
            "audio_tokens": 0,
            "cache_write_tokens": 0,
        },
        "completion_tokens_details": {"reasoning_tokens": 1000, "audio_tokens": 0},
    }
    assert usage_from_body("/v1/chat/completions", usage) == TokenUsage(
        input_tokens=3000, cached_tokens=1280, output_tokens=1500, reasoning_tokens=1000
    )


def test_responses_usage_shape() -> None:
    usage = {
        "input_tokens": 10000,
        "input_tokens_details": {
            "cached_tokens": 4096,
            "cache_write_tokens": 2048,
            "cache_write_tokens_details": {"ttl_30m_tokens": 2048, "ttl_12h_tokens": 0},
        },
        "output_tokens": 800,
        "output_tokens_details": {"reasoning_tokens": 300},
        "total_tokens": 10800,
    }
    assert usage_from_body("/v1/responses", usage) == TokenUsage(
        input_tokens=10000,
        cached_tokens=4096,
        cache_write_tokens=2048,
        output_tokens=800,
        reasoning_tokens=300,
    )


def test_embeddings_usage_shape() -> None:
    usage = {"prompt_tokens": 930, "total_tokens": 930}
    assert usage_from_body("/v1/embeddings", usage) == TokenUsage(input_tokens=930)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 22, "completion_tokens": 2, "total_tokens": 24},  # S-GUIDE example line
        {"prompt_tokens": 22, "completion_tokens": 2, "prompt_tokens_details": None},
        {
            "prompt_tokens": 22,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": None},
            "completion_tokens_details": {},
        },
    ],
)
def test_missing_or_null_details_count_as_zero(usage: dict[str, object]) -> None:
    assert usage_from_body("/v1/chat/completions", usage) == TokenUsage(
        input_tokens=22, output_tokens=2
    )


def test_missing_details_in_responses_shape() -> None:
    usage = {"input_tokens": 50, "output_tokens": 7, "input_tokens_details": None}
    assert usage_from_body("/v1/responses", usage) == TokenUsage(input_tokens=50, output_tokens=7)


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"])
def test_no_usage_is_zero(endpoint: str) -> None:
    assert usage_from_body(endpoint, None) == TokenUsage()
    assert usage_from_body(endpoint, {}) == TokenUsage()


def test_endpoint_spelling_is_normalised() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 1}
    expected = TokenUsage(input_tokens=5, output_tokens=1)
    assert usage_from_body("chat/completions", usage) == expected
    assert usage_from_body("/v1/completions", usage) == expected


def test_unsupported_endpoint_is_an_error() -> None:
    with pytest.raises(ValueError, match="images/generations"):
        usage_from_body("/v1/images/generations", {"input_tokens": 1})


def test_inconsistent_usage_is_rejected() -> None:
    with pytest.raises(ValueError, match="exceed input"):
        usage_from_body(
            "/v1/chat/completions",
            {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 128}},
        )
    with pytest.raises(ValueError, match="negative"):
        TokenUsage(output_tokens=-1)


def test_usage_adds_up() -> None:
    a = TokenUsage(input_tokens=10, cached_tokens=2, cache_write_tokens=1, output_tokens=5)
    b = TokenUsage(input_tokens=20, cached_tokens=3, output_tokens=7, reasoning_tokens=4)
    assert a + b == TokenUsage(
        input_tokens=30, cached_tokens=5, cache_write_tokens=1, output_tokens=12, reasoning_tokens=4
    )
    assert sum([a, b], TokenUsage()) == a + b
    assert (a + b).uncached_input_tokens == 24  # 30 - 5 - 1
    assert (a + b).total_tokens == 42


# --- cost arithmetic ----------------------------------------------------------------------------


def test_gpt_4o_mini_chat_with_cached_tokens() -> None:
    usage = usage_from_body(
        "/v1/chat/completions",
        {
            "prompt_tokens": 2000,
            "prompt_tokens_details": {"cached_tokens": 1024},
            "completion_tokens": 300,
        },
    )
    cost = price_usage(usage, PRICES.price_for("gpt-4o-mini-2024-07-18"))
    # batch: no batch cached rate, so cached tokens are billed at batch input 0.075
    #   (976 * 0.075 + 1024 * 0.075 + 300 * 0.30) / 1e6 = (73.2 + 76.8 + 90) / 1e6 = 0.00024
    assert cost.batch_usd == Decimal("0.00024")
    # standard: (976 * 0.15 + 1024 * 0.075 + 300 * 0.60) / 1e6 = (146.4 + 76.8 + 180) / 1e6
    assert cost.standard_usd == Decimal("0.0004032")
    # 0.0004032 - 0.00024
    assert cost.savings_usd == Decimal("0.0001632")


def test_gpt_5_mini_with_cached_and_reasoning_tokens() -> None:
    usage = TokenUsage(
        input_tokens=3000, cached_tokens=1280, output_tokens=1500, reasoning_tokens=1000
    )
    cost = price_usage(usage, PRICES.price_for("gpt-5-mini"))
    # batch: 1720 uncached * 0.125 + 1280 cached * 0.0125 + 1500 out (reasoning included) * 1.00
    #   = 215 + 16 + 1500 = 1731  -> 0.001731
    assert cost.batch_usd == Decimal("0.001731")
    # standard: 1720 * 0.25 + 1280 * 0.025 + 1500 * 2.00 = 430 + 32 + 3000 = 3462 -> 0.003462
    assert cost.standard_usd == Decimal("0.003462")
    assert cost.savings_usd == Decimal("0.001731")


def test_gpt_5_6_luna_responses_with_cache_writes() -> None:
    usage = usage_from_body(
        "/v1/responses",
        {
            "input_tokens": 10000,
            "input_tokens_details": {"cached_tokens": 4096, "cache_write_tokens": 2048},
            "output_tokens": 800,
            "output_tokens_details": {"reasoning_tokens": 300},
        },
    )
    cost = price_usage(usage, PRICES.price_for("gpt-5.6-luna"))
    # batch: uncached 10000 - 4096 - 2048 = 3856
    #   3856 * 0.10 + 4096 * 0.01 + 2048 * 0.10 * 1.25 + 800 * 0.60
    #   = 385.6 + 40.96 + 256 + 480 = 1162.56 -> 0.00116256
    assert cost.batch_usd == Decimal("0.00116256")
    # standard: 3856 * 0.20 + 4096 * 0.02 + 2048 * 0.20 * 1.25 + 800 * 1.20
    #   = 771.2 + 81.92 + 512 + 960 = 2325.12 -> 0.00232512
    assert cost.standard_usd == Decimal("0.00232512")
    assert cost.savings_usd == Decimal("0.00116256")


def test_text_embedding_3_small() -> None:
    usage = usage_from_body("/v1/embeddings", {"prompt_tokens": 930, "total_tokens": 930})
    cost = price_usage(usage, PRICES.price_for("text-embedding-3-small"))
    # 930 * 0.01 / 1e6 = 0.0000093 ; standard 930 * 0.02 / 1e6 = 0.0000186
    assert cost.batch_usd == Decimal("0.0000093")
    assert cost.standard_usd == Decimal("0.0000186")
    assert cost.savings_usd == Decimal("0.0000093")


def test_a_million_rows_stay_exact_to_the_cent() -> None:
    per_row = usage_from_body("/v1/embeddings", {"prompt_tokens": 930})
    total = TokenUsage(input_tokens=per_row.input_tokens * 1_000_000)
    cost = price_usage(total, PRICES.price_for("text-embedding-3-small"))
    # 930,000,000 tokens * 0.01 / 1e6 = 9.30 ; standard * 0.02 = 18.60
    assert cost.batch_usd == Decimal("9.3")
    assert cost.standard_usd == Decimal("18.6")
    assert cost.savings_usd == Decimal("9.3")
    # summing per-row costs gives the same exact figure as costing the summed usage
    row_cost = cost_usd(per_row, PRICES.price_for("text-embedding-3-small").batch)
    assert row_cost * 1_000_000 == Decimal("9.3")


def test_cost_breakdowns_add_up() -> None:
    a = CostBreakdown(Decimal("0.1"), Decimal("0.2"), Decimal("0.1"))
    b = CostBreakdown(Decimal("0.2"), Decimal("0.4"), Decimal("0.2"))
    assert a + b == CostBreakdown(Decimal("0.3"), Decimal("0.6"), Decimal("0.3"))


def test_output_price_none_costs_nothing_for_output() -> None:
    # 1000 * 0.02 / 1e6 = 0.00002; output ignored when the tier has no output price
    usage = TokenUsage(input_tokens=1000, output_tokens=50)
    assert cost_usd(usage, TokenPrices(input=0.02)) == Decimal("0.00002")


def test_zero_usage_costs_zero() -> None:
    assert cost_usd(TokenUsage(), PRICES.price_for("gpt-5").batch) == 0


# --- output estimate ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_tokens", "past_mean", "expected"),
    [
        (None, None, 256),  # nothing known: default
        (500, None, 500),  # cap only: the cap (upper bound)
        (500, 123.2, 124),  # history wins, rounded up
        (100, 123.2, 100),  # ... but never above the cap
        (None, 123.0, 123),  # history, no cap
        (None, 0.0, 0),
    ],
)
def test_estimate_output_tokens(
    max_tokens: int | None, past_mean: float | None, expected: int
) -> None:
    assert estimate_output_tokens(max_tokens, past_mean) == expected


def test_estimate_output_tokens_custom_default_and_bad_input() -> None:
    assert estimate_output_tokens(None, None, default=64) == 64
    with pytest.raises(ValueError):
        estimate_output_tokens(None, float("nan"))
    with pytest.raises(ValueError):
        estimate_output_tokens(-1, None)


def test_past_output_mean_matches_the_model_and_its_snapshots_not_its_prefix(
    tmp_path: Path,
) -> None:
    """gpt-4o's estimate is not averaged with gpt-4o-mini's runs (a name prefix, not the model)."""
    from schemas.tables import COST_RECORD_SCHEMA
    from tasks.costreport import past_output_mean
    from tasks.storage import ObjectStore

    store = ObjectStore()
    rows = [  # model billed, output tokens, billed lines
        ("2026-11-01", "gpt-4o-2024-08-06", 1000, 10),
        ("2026-11-02", "gpt-4o-mini", 50_000, 10),
        ("2026-11-03", "gpt-4o-mini-2024-07-18", 70_000, 10),
        ("2026-11-04", "gpt-4o", 3000, 10),
    ]
    for day, model, output, lines in rows:
        record = {name: None for name in COST_RECORD_SCHEMA.names}
        record.update(job="j", run_date=day, model=model, output_tokens=output, billed_lines=lines,
                      tags=[])  # fmt: skip
        store.write_table(
            f"{tmp_path}/costs/j__{day}.parquet",
            pa.Table.from_pylist([record], schema=COST_RECORD_SCHEMA),
        )
    assert past_output_mean(store, str(tmp_path), "j", "gpt-4o", "2026-12-01") == 200.0
    assert past_output_mean(store, str(tmp_path), "j", "gpt-4o-mini", "2026-12-01") == 6000.0


def test_past_output_mean_reads_the_latest_runs_of_the_job_only(tmp_path: Path) -> None:
    """A bounded read: the job's last HISTORY_RUNS records, not every record of every job."""
    from schemas.tables import COST_RECORD_SCHEMA
    from tasks.costreport import HISTORY_RUNS, past_output_mean
    from tasks.storage import ObjectStore

    store = ObjectStore()

    def record(job: str, day: str, output: int) -> None:
        row = {name: None for name in COST_RECORD_SCHEMA.names}
        row.update(job=job, run_date=day, model="gpt-4o", output_tokens=output, billed_lines=1,
                   tags=[])  # fmt: skip
        table = pa.Table.from_pylist([row], schema=COST_RECORD_SCHEMA)
        store.write_table(f"{tmp_path}/costs/{job}__{day}.parquet", table)

    for day in range(1, 41):  # 40 nights: the first 10 answered long, the last 30 short
        record("j", f"2026-10-{day:02d}" if day <= 31 else f"2026-11-{day - 31:02d}",
               1000 if day <= 10 else 10)  # fmt: skip
    record("j__other", "2026-11-20", 99_999)  # another job whose name starts like it
    assert HISTORY_RUNS == 30
    assert past_output_mean(store, str(tmp_path), "j", "gpt-4o", "2026-12-01") == 10.0
