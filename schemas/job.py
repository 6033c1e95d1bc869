"""The job spec: what to read, what to ask for each row, where to write. Loadable from YAML and usable
as a Prefect flow parameter (it is a plain pydantic model)."""

from __future__ import annotations

import re
import string
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.strictmode import strict_mode_problem

Endpoint = Literal["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
SUPPORTED_ENDPOINTS: tuple[str, ...] = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses")

# Real API limits: 50,000 lines and 200 MB per file, 50,000 embedding inputs per batch.
# Defaults keep a margin below them.
DEFAULT_MAX_LINES = 45_000
DEFAULT_MAX_BYTES = 190_000_000
DEFAULT_MAX_EMBEDDING_INPUTS = 45_000

JOB_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"
FilterScalar = str | int | float | bool | datetime | date
FilterValue = FilterScalar | None | list[FilterScalar]
COMPARISON_OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")
NULL_OPS = ("is_null", "not_null")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    uri: str = Field(description="Parquet file or dataset directory, local path or s3://")
    id_column: str = Field(description="Column whose value identifies a row (unique, not null)")
    columns: list[str] | None = Field(
        default=None, description="Source columns copied to the output (default: all)"
    )
    filter: list[tuple[str, str] | tuple[str, str, FilterValue]] | None = Field(
        default=None,
        description="Row filter as [column, op, value] triples (ops: ==, !=, <, <=, >, >=, in, "
        "not in) and [column, is_null] / [column, not_null] pairs, all must hold; pushed down "
        "to the Parquet reader. Dates and times may be written as ISO strings.",
    )

    @field_validator("filter")
    @classmethod
    def _known_ops(cls, value: list[tuple[Any, ...]] | None) -> list[tuple[Any, ...]] | None:
        for condition in value or []:
            op = condition[1]
            if op not in COMPARISON_OPS + NULL_OPS:
                raise ValueError(
                    f"source.filter {list(condition)}: unknown op {op!r}; use one of "
                    f"{', '.join(COMPARISON_OPS + NULL_OPS)}"
                )
            if op in NULL_OPS and len(condition) != 2:
                raise ValueError(f"source.filter {list(condition)}: write [column, {op}], no value")
            if op in COMPARISON_OPS and len(condition) != 3:
                raise ValueError(f"source.filter {list(condition)}: write [column, {op}, value]")
            if op in COMPARISON_OPS and condition[2] is None:
                raise ValueError(
                    f"source.filter {list(condition)}: nothing compares equal to null; use "
                    f"[{condition[0]}, is_null] or [{condition[0]}, not_null]"
                )
            if op in ("in", "not in") and not isinstance(condition[2], list):
                raise ValueError(f"source.filter {list(condition)}: {op!r} takes a list of values")
        return value


class RequestSpec(_Strict):
    endpoint: str = "/v1/chat/completions"
    model: str
    system_prompt: str | None = None
    template: str = Field(
        description="User message (chat/responses) or input text (embeddings); "
        "{column} placeholders are filled from the row"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Extra body parameters, e.g. max_tokens, temperature"
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON schema of a structured output object; its top-level properties become "
        "typed output columns",
    )
    schema_name: str = "output"

    @field_validator("endpoint")
    @classmethod
    def _known_endpoint(cls, value: str) -> str:
        if value not in SUPPORTED_ENDPOINTS:
            raise ValueError(
                f"unsupported endpoint {value!r}: nightbatch supports "
                f"{', '.join(SUPPORTED_ENDPOINTS)}"
            )
        return value

    @model_validator(mode="after")
    def _templates_parse(self) -> RequestSpec:
        self.template_fields()
        return self

    @field_validator("params")
    @classmethod
    def _no_stream(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("stream"):
            raise ValueError("params.stream must not be set: the Batch API rejects streaming")
        for reserved in ("model", "messages", "input"):
            if reserved in value:
                raise ValueError(
                    f"params.{reserved} is built by nightbatch from model/template; remove it"
                )
        return value

    @model_validator(mode="after")
    def _schema_fits_endpoint(self) -> RequestSpec:
        if self.output_schema is not None:
            if self.endpoint == "/v1/embeddings":
                raise ValueError("output_schema is not supported for /v1/embeddings")
            if self.output_schema.get("type") != "object" or not isinstance(
                self.output_schema.get("properties"), dict
            ):
                raise ValueError(
                    "output_schema must be a JSON schema of type 'object' with 'properties'"
                )
            lineage = sorted(n for n in self.output_schema["properties"] if n.startswith("nb_"))
            if lineage:
                raise ValueError(
                    f"output_schema properties {lineage} collide with nightbatch's lineage "
                    "columns (nb_*) in the output table; rename them"
                )
            problem = _schema_problem(self.output_schema)
            if problem:
                raise ValueError(
                    f"output_schema is not a valid JSON Schema ({problem}); fix it there"
                )
            problem = strict_mode_problem(self.output_schema, self.model.startswith("ft:"))
            if problem:
                raise ValueError(f"output_schema does not fit OpenAI strict mode: {problem}")
        return self

    def template_fields(self) -> list[str]:
        """Column names the templates refer to, in order of first use."""
        fields: list[str] = []
        for text in (self.template, self.system_prompt or ""):
            try:
                parsed = list(string.Formatter().parse(text))
            except ValueError as exc:
                where = "template" if text is self.template else "system_prompt"
                raise ValueError(
                    f"{where} has an unbalanced brace ({exc}): write {{column}} for a column's "
                    "value and {{ or }} for a literal brace"
                ) from None
            for _, name, _, _ in parsed:
                if name is not None and name not in fields:
                    if name == "" or not re.fullmatch(r"[^\[\].!:]+", name):
                        raise ValueError(
                            f"template placeholder {{{name}}} is not a plain column name; "
                            "use {column_name}"
                        )
                    fields.append(name)
        return fields


class Limits(_Strict):
    max_lines_per_shard: int = Field(default=DEFAULT_MAX_LINES, ge=1, le=50_000)
    max_bytes_per_shard: int = Field(default=DEFAULT_MAX_BYTES, ge=1024, le=200_000_000)
    max_embedding_inputs_per_shard: int = Field(
        default=DEFAULT_MAX_EMBEDDING_INPUTS, ge=1, le=50_000
    )
    max_cost_usd: float | None = Field(default=None, ge=0)
    over_budget: Literal["fail", "wait_for_approval"] = Field(
        default="fail",
        description="When the estimate is above max_cost_usd: fail before submitting, or pause the "
        "submit flow run in Prefect until an operator approves (or rejects) it",
    )
    approval_timeout_seconds: int = Field(default=6 * 3600, ge=60)
    max_dead_letter_fraction: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Above this share of the run's rows in the dead letter, the run still loads "
        "what succeeded but ends Failed (`nightbatch run` exits 3)",
    )
    max_enqueued_tokens: int | None = Field(
        default=None,
        ge=1,
        description="The model's batch queue limit (enqueued input tokens) for your organisation; "
        "submit keeps nightbatch's own open batches under it and shards never exceed it",
    )
    token_counting: Literal["exact", "sampled", "auto"] = Field(
        default="auto",
        description="How prepare counts input tokens: 'exact' counts every request; 'sampled' counts "
        "a deterministic sample exactly and estimates the rest from bytes, inflated by a tested "
        "error bound (3%) so budget and queue checks never see an undercount; 'auto' is exact up to "
        "exact_token_counting_rows selected rows and sampled above",
    )
    exact_token_counting_rows: int = Field(
        default=100_000,
        ge=0,
        description="With token_counting 'auto': the most selected rows counted exactly",
    )


class CacheSettings(_Strict):
    """The per-row result cache (see tasks/cache.py): a row whose request is byte-for-byte one that
    succeeded before is served from the cache instead of being sent again."""

    enabled: bool = Field(
        default=True, description="Look rows up in the cache and add new results to it"
    )
    refresh: bool = Field(
        default=False, description="Send every row again (new results still go to the cache)"
    )
    max_age_days: float | None = Field(
        default=None, gt=0, description="Serve only entries younger than this"
    )


class RetryPolicy(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=10)


class JobSpec(_Strict):
    name: str = Field(pattern=JOB_NAME_PATTERN, description="Job name, part of the run id")
    source: SourceSpec
    request: RequestSpec
    output_uri: str = Field(description="Where enriched Parquet goes (local path or s3://)")
    storage_root: str = Field(description="Root for run state, shards and cost records")
    limits: Limits = Field(default_factory=Limits)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    tags: dict[str, str] = Field(default_factory=dict)
    provider_files: Literal["delete", "keep"] = Field(
        default="delete",
        description="What becomes of a batch's input, output and error files at the provider once "
        "its results are stored: deleted (the prompts and answers do not stay in the organisation's "
        "file storage), or kept",
    )
    prices: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Prices per 1M tokens for models missing from (or overriding) the shipped table: "
        "model -> {standard: {input, cached_input, output}, batch: {...}}; batch defaults to 50%",
    )
    price_table_path: str | None = Field(
        default=None, description="A local YAML price file extending the shipped table"
    )

    @model_validator(mode="after")
    def _output_apart_from_source(self) -> JobSpec:
        """Output written into the source would be read back as source rows the next night."""
        source = self.source.uri.rstrip("/")
        output = self.output_uri.rstrip("/")
        if output == source or output.startswith(source + "/") or source.startswith(output + "/"):
            raise ValueError(
                f"output_uri {self.output_uri!r} and source.uri {self.source.uri!r} overlap: the "
                "enriched table would land in the source dataset (or the source in the output). "
                "Give output_uri a location of its own."
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobSpec:
        path = Path(path)
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a job spec must be a YAML mapping")
        base = path.resolve().parent
        for section, key in (("source", "uri"), (None, "output_uri"), (None, "storage_root")):
            holder = data.get(section, {}) if section else data
            if isinstance(holder, dict) and isinstance(holder.get(key), str):
                holder[key] = _resolve_relative(holder[key], base)
        return cls.model_validate(data)


def _resolve_relative(uri: str, base: Path) -> str:
    """Relative local paths in a YAML spec are relative to the spec file."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """Why a JSON Schema is not valid against the Draft 2020-12 meta-schema, with where."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(Draft202012Validator.META_SCHEMA).iter_errors(schema))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the schema"
    return f"{where}: {error.message}"
