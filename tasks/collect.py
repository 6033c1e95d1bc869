"""collect: stream a terminal batch's output and error files into results/errors Parquet.

Both files are optional (null when empty, or when every line failed). Lines are joined on custom_id
against the shard's id sidecar, so lines that never came back are found and recorded as `missing`."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.job import JobSpec
from schemas.manifest import Shard, ShardCounts
from schemas.tables import ERRORS_SCHEMA, results_schema
from tasks.batch_api import BatchApi
from tasks.layout import RunLayout
from tasks.parse import LineParser
from tasks.storage import ObjectStore

FLUSH_ROWS = 2000


class _TableSink:
    """Buffers rows and writes them to one Parquet file in row groups."""

    def __init__(self, handle: IO[bytes], schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = pq.ParquetWriter(handle, schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _iter_lines(handle: IO[bytes]) -> Iterator[dict[str, Any]]:
    handle.seek(0)
    for raw in handle:
        if raw.strip():
            yield orjson.loads(raw)


def shard_custom_ids(store: ObjectStore, layout: RunLayout, shard: Shard) -> list[str]:
    table = store.read_table(layout.ids_file(shard.attempt, shard.index), columns=["custom_id"])
    return [str(v) for v in table.column("custom_id").to_pylist()]


def batch_failure(shard: Shard) -> tuple[str, str, bool]:
    """Code, message and retryability of a batch that failed validation."""
    errors = shard.batch_errors or [{"code": "batch_failed", "message": "batch failed"}]
    first = errors[0]
    code = str(first.get("code") or "batch_failed")
    message = "; ".join(
        f"line {e.get('line')}: {e.get('message')}" if e.get("line") else str(e.get("message"))
        for e in errors[:5]
    )
    return code, message, code == "token_limit_exceeded"


def collect_shard(
    job: JobSpec, layout: RunLayout, shard: Shard, store: ObjectStore, api: BatchApi
) -> tuple[str, str, ShardCounts]:
    """Parse one terminal shard; returns (results_uri, errors_uri, counts)."""
    assert shard.batch_id is not None
    expected = shard_custom_ids(store, layout, shard)
    parser = LineParser(job.request, shard.attempt, shard.batch_id)
    results_uri = layout.results_file(shard.attempt, shard.index)
    errors_uri = layout.errors_file(shard.attempt, shard.index)
    expected_set = set(expected)
    seen: set[str] = set()
    counts = ShardCounts(lines=len(expected))
    with ExitStack() as stack:
        results = _TableSink(
            stack.enter_context(store.open_atomic(results_uri)), results_schema(job.request)
        )
        errors = _TableSink(stack.enter_context(store.open_atomic(errors_uri)), ERRORS_SCHEMA)
        if shard.batch_status == "failed":
            code, message, retryable = batch_failure(shard)
            for custom_id in expected:
                errors.add(parser.batch_failed(custom_id, code, message, retryable))
            seen.update(expected)
            counts.retryable += len(expected) if retryable else 0
        for file_id in (shard.output_file_id, shard.error_file_id):
            if not file_id:
                continue
            spool = stack.enter_context(tempfile.TemporaryFile())
            api.download(file_id, spool)
            for line in _iter_lines(spool):
                custom_id = line.get("custom_id")
                if custom_id not in expected_set or custom_id in seen:
                    continue
                seen.add(custom_id)
                kind, row = parser.parse(line)
                (results if kind == "result" else errors).add(row)
                counts.retryable += 1 if kind == "error" and row["retryable"] else 0
        for custom_id in expected:
            if custom_id not in seen:
                errors.add(parser.missing(custom_id))
                counts.missing += 1
                counts.retryable += 1
        results.close()
        errors.close()
    counts.succeeded = results.count
    counts.failed = errors.count
    return results_uri, errors_uri, counts
