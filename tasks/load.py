"""load: join results to source rows and write the enriched dataset atomically, plus the dead letter.

Every selected row ends exactly once in the output (it has a result) or in the dead letter (it has
none: permanent error, retries exhausted, or never came back)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.manifest import RunManifest
from schemas.tables import (
    COST_RECORD_SCHEMA,
    DEAD_LETTER_SCHEMA,
    ERRORS_SCHEMA,
    LINEAGE_FIELDS,
    output_fields,
    results_schema,
)
from tasks.cache import ResultCache, served_results
from tasks.layout import output_file
from tasks.prepare import (
    filter_columns,
    iter_source_batches,
    open_source,
    source_columns,
    source_filter,
)
from tasks.render import custom_id_for
from tasks.runs import manifest_layout
from tasks.storage import ObjectStore


@dataclass
class Outcomes:
    results: pa.Table  # one row per succeeded custom_id (sent by this run)
    errors: pa.Table  # every error row of every attempt
    prepared_ids: set[str]
    cached: pa.Table | None = None  # rows served from the result cache (results + cached_from_run)

    def all_results(self) -> pa.Table:
        """Fresh and cached results together, `cached_from_run` null for the fresh ones."""
        fresh = self.results.append_column(
            "cached_from_run", pa.nulls(self.results.num_rows, pa.string())
        )
        return fresh if self.cached is None else pa.concat_tables([fresh, self.cached])


def gather_outcomes(manifest: RunManifest, store: ObjectStore) -> Outcomes:
    layout = manifest_layout(manifest)
    schema = results_schema(manifest.job.request)
    results = [store.read_table(s.results_uri) for s in manifest.shards if s.results_uri]
    errors = [store.read_table(s.errors_uri) for s in manifest.shards if s.errors_uri]
    prepared: set[str] = set()
    for shard in manifest.shards:
        if shard.attempt == 1:
            ids = store.read_table(layout.ids_file(shard.attempt, shard.index))
            prepared.update(ids.column("custom_id").to_pylist())
    cached = None
    if manifest.cache_hits_uri:
        cached = served_results(
            ResultCache(store, manifest.job.storage_root, manifest.job),
            store,
            manifest.cache_hits_uri,
            datetime.now(UTC),
        )
        hit_ids = store.read_table(manifest.cache_hits_uri, columns=["custom_id"]).column(0)
        prepared.update(hit_ids.to_pylist())
    results_table = (
        pa.concat_tables([t.cast(schema) for t in results]) if results else schema.empty_table()
    )
    errors_table = (
        pa.concat_tables([t.cast(ERRORS_SCHEMA) for t in errors])
        if errors
        else ERRORS_SCHEMA.empty_table()
    )
    return Outcomes(results_table, errors_table, prepared, cached)


def succeeded_ids_and_errors(
    manifest: RunManifest, store: ObjectStore
) -> tuple[set[str], pa.Table]:
    """custom_ids with a result, and every error row of every attempt (no result columns read)."""
    succeeded: set[str] = set()
    for shard in manifest.shards:
        if shard.results_uri:
            succeeded.update(
                store.read_table(shard.results_uri, columns=["custom_id"]).column(0).to_pylist()
            )
    errors = [
        store.read_table(s.errors_uri).cast(ERRORS_SCHEMA) for s in manifest.shards if s.errors_uri
    ]
    return succeeded, (pa.concat_tables(errors) if errors else ERRORS_SCHEMA.empty_table())


def last_errors(errors: pa.Table) -> dict[str, dict[str, Any]]:
    """The latest error row of each custom_id (by attempt)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in errors.select(["custom_id", "attempt", "code", "message", "retryable"]).to_pylist():
        current = latest.get(row["custom_id"])
        if current is None or row["attempt"] >= current["attempt"]:
            latest[row["custom_id"]] = row
    return latest


def dead_letter_row(
    custom_id: str, row_id: str, error: dict[str, Any] | None, max_attempts: int
) -> dict[str, Any]:
    if error is None:
        return {
            "custom_id": custom_id, "row_id": row_id, "reason": "missing", "code": "missing",
            "message": "no result and no error was recorded for this row", "attempts": 0,
        }  # fmt: skip
    reason = "retries_exhausted" if error["retryable"] else "permanent_error"
    return {
        "custom_id": custom_id,
        "row_id": row_id,
        "reason": reason,
        "code": error["code"],
        "message": error["message"],
        "attempts": error["attempt"],
    }


@dataclass
class LoadSummary:
    output_uri: str
    dead_letter_uri: str
    rows_written: int
    rows_dead_lettered: int
    rows_not_in_run: int


def write_output(manifest: RunManifest, store: ObjectStore) -> LoadSummary:
    job = manifest.job
    layout = manifest_layout(manifest)
    outcomes = gather_outcomes(manifest, store)
    errors = last_errors(outcomes.errors)
    results = outcomes.all_results()
    index = {cid: i for i, cid in enumerate(results.column("custom_id").to_pylist())}
    dataset = open_source(job, store)
    copied = source_columns(job, dataset.schema)
    id_column = job.source.id_column
    columns = list(dict.fromkeys([id_column, *copied]))
    result_names = [f.name for f in output_fields(job.request)]
    out_schema = pa.schema(
        [dataset.schema.field(c) for c in columns]
        + [f for f in results.schema if f.name in result_names]
        + LINEAGE_FIELDS
    )
    target = output_file(job.output_uri, manifest.run_date)
    dead: list[dict[str, Any]] = []
    written = not_in_run = 0
    with store.open_atomic(target) as handle:
        writer = pq.ParquetWriter(handle, out_schema, compression="zstd")
        scan = iter_source_batches(dataset, columns, source_filter(job), filter_columns(job))
        for batch in scan:
            ids = batch.column(id_column).to_pylist()
            cids = [custom_id_for(v) for v in ids]
            positions = np.fromiter(
                (index.get(c, -1) for c in cids), dtype=np.int64, count=len(cids)
            )
            found = positions >= 0
            for i in np.flatnonzero(~found):
                cid = cids[i]
                if cid not in outcomes.prepared_ids:
                    not_in_run += 1  # appeared in the source after prepare: not part of this run
                    continue
                dead.append(
                    dead_letter_row(cid, str(ids[i]), errors.get(cid), job.retry.max_attempts)
                )
            if not found.any():
                continue
            rows = batch.filter(pa.array(found))
            taken = results.take(pa.array(positions[found]))
            n = rows.num_rows
            arrays = [rows.column(c) for c in columns]
            arrays += [taken.column(name) for name in result_names]
            cached_from = taken.column("cached_from_run")
            status = pc.if_else(pc.is_null(cached_from), "succeeded", "cached")
            arrays += [
                pa.array([manifest.run_id] * n, pa.string()),
                taken.column("custom_id"),
                taken.column("model"),
                status,
                taken.column("finish_reason"),
                taken.column("attempt"),
                taken.column("batch_id"),
                cached_from,
            ]
            writer.write_table(
                pa.Table.from_arrays([_chunked(a) for a in arrays], schema=out_schema)
            )
            written += n
        writer.close()
    store.write_table(layout.dead_letter, pa.Table.from_pylist(dead, schema=DEAD_LETTER_SCHEMA))
    return LoadSummary(target, layout.dead_letter, written, len(dead), not_in_run)


def _chunked(array: Any) -> pa.ChunkedArray:
    return array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array])


def billed_usage_by_model(outcomes: Outcomes) -> dict[str, dict[str, int]]:
    """Token totals of every billed line (succeeded, or completed with invalid output), per model."""
    return usage_by_model([outcomes.results, outcomes.errors.filter(pc.field("billed"))])


def cached_usage_by_model(outcomes: Outcomes) -> dict[str, dict[str, int]]:
    """Token totals of the rows served from the cache: what they would have cost to send again."""
    return usage_by_model([outcomes.cached] if outcomes.cached is not None else [])


def usage_by_model(tables: list[pa.Table]) -> dict[str, dict[str, int]]:
    usage: dict[str, dict[str, int]] = {}
    for table in tables:
        if table.num_rows == 0:
            continue
        grouped = table.group_by("model").aggregate(
            [
                (c, "sum")
                for c in (
                    "input_tokens",
                    "cached_tokens",
                    "cache_write_tokens",
                    "output_tokens",
                    "reasoning_tokens",
                )
            ]
            + [("custom_id", "count")]
        )
        for row in grouped.to_pylist():
            model = row["model"] or "unknown"
            acc = usage.setdefault(
                model,
                {
                    "lines": 0,
                    "input_tokens": 0,
                    "cached_tokens": 0,
                    "cache_write_tokens": 0,
                    "output_tokens": 0,
                    "reasoning_tokens": 0,
                },
            )
            acc["lines"] += row["custom_id_count"]
            for key in (
                "input_tokens",
                "cached_tokens",
                "cache_write_tokens",
                "output_tokens",
                "reasoning_tokens",
            ):
                acc[key] += row[f"{key}_sum"] or 0
    return usage


def cost_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=COST_RECORD_SCHEMA)
