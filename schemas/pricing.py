"""The price table: USD per 1M tokens, standard and Batch API rates, per model.

The shipped table is `schemas/prices.yaml` (package data). A deployment can extend or correct it with a
price file (`price_table_path`) and a job can do the same with `prices:` in its spec; each layer replaces
whole model entries and marks the table version (`2026-11-24+custom+job`), so every cost record says which
prices it used. A model with no price is an error, never $0.

Entry shape, shared by all three layers (`batch` may be omitted: it then defaults to 50% of `standard`)::

    gpt-4o-mini:
      standard: {input: 0.15, cached_input: 0.075, output: 0.60}
      batch: {input: 0.075, cached_input: null, output: 0.30}

Pure: reads files only in `load_price_table`, through pathlib / importlib.resources.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SHIPPED_PRICE_FILE = "prices.yaml"
DEFAULT_FILE_VERSION_TAG = "custom"
JOB_VERSION_TAG = "job"

_SNAPSHOT_SUFFIX = re.compile(r"^(?P<base>.+)-\d{4}-\d{2}-\d{2}$")

_FIX_SNIPPET = """\
  # in the job spec
  prices:
    {model}:
      standard: {{input: 1.25, cached_input: 0.125, output: 10.00}}  # USD per 1M tokens
      batch: {{input: 0.625, cached_input: 0.0625, output: 5.00}}    # optional; default 50% of standard

  # or in a price file passed as price_table_path
  models:
    {model}:
      standard: {{input: 1.25, cached_input: 0.125, output: 10.00}}"""


class UnknownModelPriceError(ValueError):
    """No price for a model: nightbatch refuses to guess (and never assumes $0)."""

    def __init__(self, model: str, version: str | None = None) -> None:
        self.model = model
        self.version = version
        table = f"price table {version}" if version else "price table"
        snapshot = _SNAPSHOT_SUFFIX.match(model)
        base = (
            f" (pricing its base name {snapshot['base']!r} also covers its dated snapshots)"
            if snapshot
            else ""
        )
        super().__init__(
            f"no price for model {model!r} in the {table}; nightbatch will not assume $0. "
            f"Add the model's prices (USD per 1M tokens) under `prices:` in the job spec, or in a "
            f"price file passed as `price_table_path`{base}. For example (placeholder rates: use "
            "the model's real ones from OpenAI's pricing page):\n"
            + _FIX_SNIPPET.format(model=model)
        )

    def __reduce__(self) -> tuple[type[UnknownModelPriceError], tuple[str, str | None]]:
        return (type(self), (self.model, self.version))


class TokenPrices(BaseModel):
    """Rates of one tier, USD per 1M tokens.

    `cached_input` None: cached tokens cost the `input` rate. `output` None: no output tokens (embeddings).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    output: float | None = Field(default=None, ge=0)

    def halved(self) -> TokenPrices:
        """These rates at 50%, computed in decimal so 0.15 becomes 0.075, not 0.07499999…"""

        return TokenPrices(
            input=_half(self.input),
            cached_input=None if self.cached_input is None else _half(self.cached_input),
            output=None if self.output is None else _half(self.output),
        )


def _half(price: float) -> float:
    return float(Decimal(str(price)) / 2)


class ModelPrice(BaseModel):
    """Standard (synchronous) and Batch rates of one model. `batch` defaults to 50% of `standard`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    standard: TokenPrices
    batch: TokenPrices
    context_window: int | None = Field(default=None, ge=1)  # input + requested output, at most
    max_input_tokens: int | None = Field(default=None, ge=1)  # where lower than the window

    @model_validator(mode="before")
    @classmethod
    def _default_batch_to_half_standard(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("batch") is None and "standard" in data:
            standard = TokenPrices.model_validate(data["standard"])
            return {**data, "standard": standard, "batch": standard.halved()}
        return data


class PriceTable(BaseModel):
    """Versioned prices of every known model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    as_of: date
    source: str
    currency: Literal["USD"] = "USD"
    unit: Literal["per_1m_tokens"] = "per_1m_tokens"
    models: dict[str, ModelPrice]

    def price_for(self, model: str) -> ModelPrice:
        """Prices of `model`: the exact name, else a dated snapshot's base name, else an error.

        `gpt-4o-mini-2024-07-18` resolves to `gpt-4o-mini`; only a trailing `-YYYY-MM-DD` is stripped, so
        `gpt-5.4-pro-2026-03-05` needs `gpt-5.4-pro` and never falls back to `gpt-5.4`.
        """
        if model in self.models:
            return self.models[model]
        snapshot = _SNAPSHOT_SUFFIX.match(model)
        if snapshot and snapshot["base"] in self.models:
            return self.models[snapshot["base"]]
        raise UnknownModelPriceError(model, self.version)

    def extended(self, models: Mapping[str, Any], tag: str) -> PriceTable:
        """A copy with `models` added or replacing whole entries, its version marked `+tag`."""
        parsed: dict[str, ModelPrice] = {}
        for name, entry in models.items():
            try:
                parsed[str(name)] = ModelPrice.model_validate(entry)
            except ValidationError as exc:
                raise ValueError(f"invalid prices for model {name!r} ({tag}): {exc}") from exc
        return self.model_copy(
            update={"version": f"{self.version}+{tag}", "models": {**self.models, **parsed}}
        )


@cache
def _shipped_table() -> PriceTable:
    text = resources.files("schemas").joinpath(SHIPPED_PRICE_FILE).read_text(encoding="utf-8")
    return PriceTable.model_validate(yaml.safe_load(text))


def load_price_table(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> PriceTable:
    """The shipped price table, extended by a price file and then by a job's `prices:`.

    - `path`: a local YAML file with `models:` (same entry shape as the shipped table) and optionally
      `version:`; its entries extend/replace the shipped ones and the version gets `+<its version>`
      (`+custom` when it has none).
    - `overrides`: model -> `{standard: {...}, batch: {...}}` from a job spec, applied last; the version
      gets `+job`. In both layers an omitted `batch` is 50% of `standard`.
    """
    table = _shipped_table()
    table = table.model_copy(update={"models": dict(table.models)})  # callers can't touch the cache
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping):
            raise ValueError(
                f"price file {str(path)!r} must be a YAML mapping with a `models:` mapping "
                "of model name -> {standard: {input, cached_input, output}, batch: {...}}"
            )
        tag = str(data.get("version") or DEFAULT_FILE_VERSION_TAG)
        table = table.extended(data["models"], tag)
    if overrides:
        table = table.extended(overrides, JOB_VERSION_TAG)
    return table
