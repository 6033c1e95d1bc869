"""Arrow schemas of every table nightbatch writes. No I/O."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from schemas.job import RequestSpec

USAGE_FIELDS = [
    pa.field("input_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("cache_write_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
]


def arrow_type_for(schema: dict[str, Any]) -> pa.DataType:
    """The Arrow type of a JSON-schema property. Objects and unions become JSON text."""
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null = [k for k in kind if k != "null"]
        kind = non_null[0] if len(non_null) == 1 else None
    if kind is None and "enum" in schema:
        values = schema["enum"]
        if all(isinstance(v, str) for v in values):
            kind = "string"
    if kind == "string":
        return pa.string()
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array":
        item = schema.get("items", {})
        item_type = arrow_type_for(item) if isinstance(item, dict) else None
        scalar = isinstance(item, dict) and item.get("type") in (
            "string",
            "integer",
            "number",
            "boolean",
        )
        return pa.list_(item_type) if scalar and item_type is not None else pa.string()
    return pa.string()  # objects, unions, arrays of objects or arrays: JSON text


def output_fields(request: RequestSpec) -> list[pa.Field]:
    """The result columns a job adds to its rows."""
    if request.endpoint == "/v1/embeddings":
        return [pa.field("embedding", pa.list_(pa.float32()))]
    if request.output_schema:
        props: dict[str, Any] = request.output_schema["properties"]
        return [pa.field(name, arrow_type_for(prop)) for name, prop in props.items()]
    return [pa.field("response_text", pa.string())]


def results_schema(request: RequestSpec) -> pa.Schema:
    """Parsed successful lines of one shard attempt (results/attempt-n/shard-x.parquet)."""
    return pa.schema(
        [
            pa.field("custom_id", pa.string(), nullable=False),
            pa.field("attempt", pa.int32()),
            pa.field("batch_id", pa.string()),
            pa.field("model", pa.string()),
            pa.field("finish_reason", pa.string()),
            *output_fields(request),
            *USAGE_FIELDS,
        ]
    )


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("custom_id", pa.string(), nullable=False),
        pa.field("attempt", pa.int32()),
        pa.field("batch_id", pa.string()),
        # http | non_http | missing | invalid_output | batch_failed | refused (at prepare)
        pa.field("kind", pa.string()),
        pa.field("status_code", pa.int32()),
        pa.field("code", pa.string()),
        pa.field("message", pa.string()),
        pa.field("retryable", pa.bool_()),
        pa.field("billed", pa.bool_()),  # the line completed and was paid for (e.g. invalid output)
        pa.field("model", pa.string()),
        *USAGE_FIELDS,
    ]
)

IDS_SCHEMA = pa.schema([pa.field("custom_id", pa.string(), nullable=False)])
# A shard's id sidecar of a job with the cache on: each line's cache key too, so collect can file the
# shard's results in the cache without reading its request file again.
IDS_WITH_KEYS_SCHEMA = IDS_SCHEMA.append(pa.field("cache_key", pa.binary(16), nullable=False))

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("custom_id", pa.string(), nullable=False),
        pa.field("row_id", pa.string()),
        pa.field("reason", pa.string()),  # permanent_error | retries_exhausted | missing | not_sent
        pa.field("code", pa.string()),
        pa.field("message", pa.string()),
        pa.field("attempts", pa.int32()),
    ]
)

LINEAGE_FIELDS = [
    pa.field("nb_run_id", pa.string()),
    pa.field("nb_custom_id", pa.string()),
    pa.field("nb_model", pa.string()),
    pa.field("nb_status", pa.string()),
    pa.field("nb_finish_reason", pa.string()),
    pa.field("nb_attempt", pa.int32()),
    pa.field("nb_batch_id", pa.string()),
    pa.field("nb_cached_from_run", pa.string()),  # set when the result was served from the cache
    pa.field("nb_api", pa.string()),  # the API that produced the result (schemas.lineage)
]

COST_RECORD_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("job", pa.string()),
        pa.field("run_date", pa.string()),
        pa.field("tags", pa.map_(pa.string(), pa.string())),
        pa.field("model", pa.string()),
        pa.field("endpoint", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("requests", pa.int64()),
        pa.field("requests_succeeded", pa.int64()),
        pa.field("requests_failed", pa.int64()),
        pa.field("requests_dead_lettered", pa.int64()),
        pa.field("billed_lines", pa.int64()),
        *USAGE_FIELDS,
        pa.field("cost_batch_usd", pa.float64()),
        pa.field("cost_standard_usd", pa.float64()),
        pa.field("savings_usd", pa.float64()),
        pa.field("requests_cached", pa.int64()),
        pa.field("cache_avoided_batch_usd", pa.float64()),
        pa.field("cache_avoided_standard_usd", pa.float64()),
        pa.field("estimated_cost_batch_usd", pa.float64()),
        pa.field("estimated_input_tokens", pa.int64()),
        pa.field("price_table_version", pa.string()),
        pa.field("started_at", pa.string()),
        pa.field("loaded_at", pa.string()),
        pa.field("duration_seconds", pa.float64()),
    ]
)

CACHE_HITS_SCHEMA = pa.schema(
    [pa.field("custom_id", pa.string(), nullable=False), pa.field("cache_key", pa.binary(16))]
)
