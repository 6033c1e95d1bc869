"""The shipped price table, model-name resolution, and price files / job overrides."""

from __future__ import annotations

import pickle
from datetime import date
from pathlib import Path

import pytest

from schemas.pricing import (
    ModelPrice,
    PriceTable,
    TokenPrices,
    UnknownModelPriceError,
    load_price_table,
)

# Every row of reference §5 (+ text-embedding-ada-002): model -> (std in, std cached, std out,
# batch in, batch cached, batch out), transcribed by hand from the table.
SECTION_5 = {
    "gpt-4o": (2.50, 1.25, 10.00, 1.25, None, 5.00),
    "gpt-4o-mini": (0.15, 0.075, 0.60, 0.075, None, 0.30),
    "o1": (15.00, 7.50, 60.00, 7.50, None, 30.00),
    "o3": (2.00, 0.50, 8.00, 1.00, None, 4.00),
    "o3-mini": (1.10, 0.55, 4.40, 0.55, None, 2.20),
    "o4-mini": (1.10, 0.275, 4.40, 0.55, None, 2.20),
    "gpt-4.1": (2.00, 0.50, 8.00, 1.00, None, 4.00),
    "gpt-4.1-mini": (0.40, 0.10, 1.60, 0.20, None, 0.80),
    "gpt-4.1-nano": (0.10, 0.025, 0.40, 0.05, None, 0.20),
    "gpt-5": (1.25, 0.125, 10.00, 0.625, 0.0625, 5.00),
    "gpt-5-mini": (0.25, 0.025, 2.00, 0.125, 0.0125, 1.00),
    "gpt-5-nano": (0.05, 0.005, 0.40, 0.025, 0.0025, 0.20),
    "gpt-5.1": (1.25, 0.125, 10.00, 0.625, 0.0625, 5.00),
    "gpt-5.2": (1.75, 0.175, 14.00, 0.875, 0.0875, 7.00),
    "gpt-5.4": (2.50, 0.25, 15.00, 1.25, 0.13, 7.50),
    "gpt-5.4-mini": (0.75, 0.075, 4.50, 0.375, 0.0375, 2.25),
    "gpt-5.4-nano": (0.20, 0.02, 1.25, 0.10, 0.01, 0.625),
    "gpt-5.5": (5.00, 0.50, 30.00, 2.50, 0.25, 15.00),
    "gpt-5.6-sol": (4.00, 0.40, 20.00, 2.00, 0.20, 10.00),
    "gpt-5.6-terra": (2.00, 0.20, 12.00, 1.00, 0.10, 6.00),
    "gpt-5.6-luna": (0.20, 0.02, 1.20, 0.10, 0.01, 0.60),
    "gpt-6-astra": (10.00, 1.00, 50.00, 5.00, 0.50, 25.00),
    "gpt-6-sol": (2.00, 0.20, 10.00, 1.00, 0.10, 5.00),
    "gpt-6.1-sol": (2.00, 0.10, 10.00, 1.00, 0.05, 5.00),
    "gpt-6-luna": (0.10, 0.01, 0.50, 0.05, 0.005, 0.25),
    "text-embedding-3-small": (0.02, None, None, 0.01, None, None),
    "text-embedding-3-large": (0.13, None, None, 0.065, None, None),
    "text-embedding-ada-002": (0.10, None, None, 0.05, None, None),
}


def test_shipped_table_metadata() -> None:
    table = load_price_table()
    assert table.version == "2026-11-24"
    assert table.as_of == date(2026, 11, 24)
    assert "litellm 1.110.2" in table.source
    assert table.currency == "USD"
    assert table.unit == "per_1m_tokens"


@pytest.mark.parametrize("model", sorted(SECTION_5))
def test_shipped_table_matches_section_5(model: str) -> None:
    std_in, std_cached, std_out, b_in, b_cached, b_out = SECTION_5[model]
    price = load_price_table().price_for(model)
    assert price.standard == TokenPrices(input=std_in, cached_input=std_cached, output=std_out)
    assert price.batch == TokenPrices(input=b_in, cached_input=b_cached, output=b_out)


def test_shipped_table_has_exactly_the_section_5_models() -> None:
    assert set(load_price_table().models) == set(SECTION_5)


def test_callers_cannot_mutate_the_shipped_table() -> None:
    load_price_table().models.pop("gpt-4o")
    assert "gpt-4o" in load_price_table().models


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5.6-luna", "gpt-5.6-luna"),
    ],
)
def test_snapshot_names_resolve_to_their_base(name: str, base: str) -> None:
    table = load_price_table()
    assert table.price_for(name) == table.models[base]


@pytest.mark.parametrize(
    "name",
    [
        "gpt-5.4-pro-2026-03-05",  # base gpt-5.4-pro is not in the table; never falls back to gpt-5.4
        "gpt-5.4-pro",
        "gpt-4o-mini-2024-07",  # not a full date
        "gpt-4o-mini-20240718",
        "ft:gpt-4o-mini:acme::abc123",  # fine-tunes are priced differently
        "gpt-9",
    ],
)
def test_unresolvable_names_raise(name: str) -> None:
    with pytest.raises(UnknownModelPriceError):
        load_price_table().price_for(name)


def test_unknown_model_error_message_says_what_to_do() -> None:
    with pytest.raises(UnknownModelPriceError) as info:
        load_price_table().price_for("gpt-9-ultra")
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError)
    assert err.model == "gpt-9-ultra"
    assert "'gpt-9-ultra'" in message
    assert "2026-11-24" in message  # which table was searched
    assert "will not assume $0" in message
    assert "`prices:`" in message and "job spec" in message
    assert "price_table_path" in message
    # a YAML snippet, keyed by the model, that can be pasted
    assert "    gpt-9-ultra:\n      standard: {input:" in message
    assert "models:\n" in message


def test_unknown_model_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(UnknownModelPriceError("gpt-9", "2026-11-24")))
    assert (err.model, err.version) == ("gpt-9", "2026-11-24")
    assert "'gpt-9'" in str(err)


def test_batch_defaults_to_half_of_standard() -> None:
    price = ModelPrice.model_validate(
        {"standard": {"input": 0.15, "cached_input": 0.075, "output": 0.6}}
    )
    # 0.15 / 2 = 0.075; 0.075 / 2 = 0.0375; 0.6 / 2 = 0.3 (exact decimals, no float residue)
    assert price.batch == TokenPrices(input=0.075, cached_input=0.0375, output=0.3)


def test_price_file_extends_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "version: acme-2026-12\n"
        "models:\n"
        "  gpt-4o-mini:\n"
        "    standard: {input: 0.12, cached_input: 0.06, output: 0.48}\n"
        "    batch: {input: 0.06, cached_input: 0.03, output: 0.24}\n"
        "  acme-ft-model:\n"
        "    standard: {input: 3.0, output: 12.0}\n"
    )
    table = load_price_table(path)
    assert table.version == "2026-11-24+acme-2026-12"
    assert table.price_for("gpt-4o-mini").batch == TokenPrices(
        input=0.06, cached_input=0.03, output=0.24
    )
    assert table.price_for("gpt-4o-mini-2024-07-18").standard.input == 0.12
    # batch omitted -> 50% of standard: 3.0 / 2 = 1.5, 12.0 / 2 = 6.0, no cached rate
    assert table.price_for("acme-ft-model").batch == TokenPrices(input=1.5, output=6.0)
    assert table.price_for("gpt-4o") == load_price_table().price_for("gpt-4o")  # untouched


def test_price_file_without_version_is_marked_custom(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  x-model:\n    standard: {input: 1.0}\n")
    assert load_price_table(str(path)).version == "2026-11-24+custom"


def test_price_file_must_have_models(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("gpt-4o: {standard: {input: 1.0}}\n")
    with pytest.raises(ValueError, match="models"):
        load_price_table(path)


def test_job_overrides_apply_last_with_batch_defaulting_to_half() -> None:
    overrides = {
        "gpt-9": {"standard": {"input": 3.0, "cached_input": 0.3, "output": 12.0}},
        "gpt-4o": {
            "standard": {"input": 2.0, "cached_input": 1.0, "output": 8.0},
            "batch": {"input": 0.9, "output": 3.9},
        },
    }
    table = load_price_table(overrides=overrides)
    assert table.version == "2026-11-24+job"
    # 3.0 / 2 = 1.5, 0.3 / 2 = 0.15, 12.0 / 2 = 6.0
    assert table.price_for("gpt-9").batch == TokenPrices(input=1.5, cached_input=0.15, output=6.0)
    assert table.price_for("gpt-4o").batch == TokenPrices(input=0.9, output=3.9)
    assert table.price_for("gpt-4o-mini") == load_price_table().price_for("gpt-4o-mini")


def test_job_overrides_win_over_price_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: v2\nmodels:\n  gpt-9:\n    standard: {input: 1.0, output: 4.0}\n")
    table = load_price_table(path, {"gpt-9": {"standard": {"input": 2.0, "output": 8.0}}})
    assert table.version == "2026-11-24+v2+job"
    assert table.price_for("gpt-9").standard == TokenPrices(input=2.0, output=8.0)


def test_empty_overrides_leave_version_alone() -> None:
    assert load_price_table(overrides={}).version == "2026-11-24"


@pytest.mark.parametrize(
    "entry",
    [
        {"batch": {"input": 1.0}},  # no standard
        {"standard": {"input": -1.0}},  # negative
        {"standard": {"input": 1.0, "cache_input": 0.5}},  # typo'd field
    ],
)
def test_invalid_override_names_the_model(entry: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="'gpt-9'"):
        load_price_table(overrides={"gpt-9": entry})


def test_price_table_is_a_plain_pydantic_model() -> None:
    table = PriceTable.model_validate(
        {
            "version": "t",
            "as_of": "2026-01-01",
            "source": "test",
            "models": {"m": {"standard": {"input": 2.0}}},
        }
    )
    assert table.price_for("m").batch.input == 1.0


def test_unknown_snapshot_error_mentions_the_base_name() -> None:
    with pytest.raises(UnknownModelPriceError, match="base name 'gpt-5.4-pro'"):
        load_price_table().price_for("gpt-5.4-pro-2026-03-05")
