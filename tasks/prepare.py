"""prepare: stream the source table, render one request per row, pack shards of JSONL.

Validates the job against the data first and raises BadInputError, naming the problem and the fix,
before anything is written to the run or sent anywhere."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas.job import JobSpec
from schemas.manifest import Shard
from schemas.tables import IDS_SCHEMA, LINEAGE_FIELDS, output_fields
from tasks.errors import BadInputError
from tasks.layout import RunLayout
from tasks.render import RequestRenderer, custom_id_for
from tasks.storage import ObjectStore
from tasks.tokens import count_request_tokens

SCAN_BATCH_ROWS = 8192


def open_source(job: JobSpec, store: ObjectStore) -> ds.Dataset:
    try:
        return store.dataset(job.source.uri)
    except FileNotFoundError:
        raise BadInputError(
            f"source not found: {job.source.uri!r}. Check source.uri in the job spec "
            "(a Parquet file or a directory of Parquet files, local path or s3://bucket/key)."
        ) from None


def _unknown_column(name: str, available: list[str], role: str) -> BadInputError:
    close = difflib.get_close_matches(name, available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return BadInputError(
        f"{role} {name!r} is not a column of the source.{hint} "
        f"Available columns: {', '.join(available)}."
    )


def source_columns(job: JobSpec, schema: pa.Schema) -> list[str]:
    """The source columns copied to the output (validated)."""
    available = list(schema.names)
    if job.source.columns is None:
        return available
    for name in job.source.columns:
        if name not in available:
            raise _unknown_column(name, available, "source.columns entry")
    return list(job.source.columns)


def validate_job_against_schema(job: JobSpec, schema: pa.Schema) -> list[str]:
    """Check every column the job refers to; returns the columns to read."""
    available = list(schema.names)
    if job.source.id_column not in available:
        raise _unknown_column(job.source.id_column, available, "source.id_column")
    try:
        fields = job.request.template_fields()
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    for name in fields:
        if name not in available:
            raise _unknown_column(name, available, "template field")
    for column, _, _ in job.source.filter or []:
        if column not in available:
            raise _unknown_column(column, available, "source.filter column")
    copied = source_columns(job, schema)
    added = [f.name for f in output_fields(job.request)] + [f.name for f in LINEAGE_FIELDS]
    clash = sorted(set(copied) & set(added))
    if clash:
        raise BadInputError(
            f"output column(s) {clash} would collide with source columns of the same name. "
            "Leave them out of source.columns or rename the output_schema properties."
        )
    needed = [job.source.id_column, *fields]
    return list(dict.fromkeys(needed))


def source_filter(job: JobSpec) -> ds.Expression | None:
    if not job.source.filter:
        return None
    try:
        return pq.filters_to_expression([list(f) for f in job.source.filter])  # type: ignore[arg-type]
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise BadInputError(
            f"source.filter is not valid: {exc}. Use [column, op, value] triples with op one of "
            "==, !=, <, <=, >, >=, in, not in."
        ) from None


def iter_source_batches(
    dataset: ds.Dataset, columns: list[str], expression: ds.Expression | None
) -> Iterator[pa.RecordBatch]:
    yield from dataset.to_batches(
        columns=columns, filter=expression, batch_size=SCAN_BATCH_ROWS, use_threads=True
    )


@dataclass
class ShardWriter:
    """Writes one shard: its JSONL request file (atomically) and its custom_id sidecar."""

    store: ObjectStore
    layout: RunLayout
    attempt: int
    index: int
    handle: IO[bytes]
    lines: int = 0
    bytes: int = 0
    input_tokens: int = 0
    custom_ids: list[str] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)

    def add(self, custom_id: str, line: bytes, tokens: int) -> None:
        self.handle.write(line)
        self.digest.update(line)
        self.lines += 1
        self.bytes += len(line)
        self.input_tokens += tokens
        self.custom_ids.append(custom_id)

    def sidecar(self) -> None:
        table = pa.table({"custom_id": pa.array(self.custom_ids, pa.string())}, schema=IDS_SCHEMA)
        self.store.write_table(self.layout.ids_file(self.attempt, self.index), table)

    def shard(self) -> Shard:
        return Shard(
            shard_id=f"a{self.attempt}-s{self.index:05d}",
            attempt=self.attempt,
            index=self.index,
            request_uri=self.layout.request_file(self.attempt, self.index),
            lines=self.lines,
            bytes=self.bytes,
            input_tokens=self.input_tokens,
            embedding_inputs=self.lines,
            sha256=self.digest.hexdigest(),
        )


class ShardPacker:
    """Packs lines into shards under the job's limits (lines, bytes, embedding inputs)."""

    def __init__(self, job: JobSpec, store: ObjectStore, layout: RunLayout, attempt: int) -> None:
        limits = job.limits
        self.max_lines = limits.max_lines_per_shard
        if job.request.endpoint == "/v1/embeddings":
            self.max_lines = min(self.max_lines, limits.max_embedding_inputs_per_shard)
        self.max_bytes = limits.max_bytes_per_shard
        self.max_tokens = limits.max_enqueued_tokens
        self.store = store
        self.layout = layout
        self.attempt = attempt
        self.shards: list[Shard] = []
        self._writer: ShardWriter | None = None
        self._context: Any = None

    def _open(self) -> ShardWriter:
        index = len(self.shards)
        self._context = self.store.open_atomic(self.layout.request_file(self.attempt, index))
        handle = self._context.__enter__()
        self._writer = ShardWriter(self.store, self.layout, self.attempt, index, handle)
        return self._writer

    def _close(self) -> None:
        if self._writer is None:
            return
        self._context.__exit__(None, None, None)
        self._writer.sidecar()
        self.shards.append(self._writer.shard())
        self._writer = None

    def add(self, custom_id: str, line: bytes, tokens: int) -> None:
        if len(line) > self.max_bytes:
            raise BadInputError(
                f"the request for row {custom_id!r} is {len(line):,} bytes, more than a whole "
                f"shard may hold ({self.max_bytes:,} bytes). Shorten that row's text or filter it out."
            )
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise BadInputError(
                f"the request for row {custom_id!r} has {tokens:,} input tokens, more than "
                f"limits.max_enqueued_tokens ({self.max_tokens:,}): it could never be queued. "
                "Shorten that row's text or filter it out."
            )
        writer = self._writer or self._open()
        if (
            writer.lines >= self.max_lines
            or writer.bytes + len(line) > self.max_bytes
            or (self.max_tokens is not None and writer.input_tokens + tokens > self.max_tokens)
        ):
            self._close()
            writer = self._open()
        writer.add(custom_id, line, tokens)

    def finish(self) -> list[Shard]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._writer is not None:
            self._context.__exit__(BadInputError, BadInputError("aborted"), None)
            self._writer = None


@dataclass
class PrepareResult:
    shards: list[Shard]
    rows: int


def _check_ids(batch: pa.RecordBatch, id_column: str) -> None:
    ids = batch.column(id_column)
    nulls = ids.null_count
    if nulls:
        raise BadInputError(
            f"source.id_column {id_column!r} has {nulls} null value(s) in the selected rows. "
            "Every row needs an id: fill them in or filter those rows out with source.filter."
        )


def _duplicate_ids(hashes: np.ndarray) -> np.ndarray:
    ordered = np.sort(hashes)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def write_shards(
    job: JobSpec, store: ObjectStore, layout: RunLayout, attempt: int = 1
) -> PrepareResult:
    """Validate, render and pack every selected row. Raises BadInputError on bad input."""
    dataset = open_source(job, store)
    columns = validate_job_against_schema(job, dataset.schema)
    expression = source_filter(job)
    renderer = RequestRenderer(job.request)
    packer = ShardPacker(job, store, layout, attempt)
    id_column = job.source.id_column
    hashes: list[np.ndarray] = []
    rows = 0
    try:
        for batch in iter_source_batches(dataset, columns, expression):
            _check_ids(batch, id_column)
            records = batch.to_pylist()
            batch_hashes = np.empty(len(records), dtype=np.int64)
            for i, record in enumerate(records):
                custom_id = custom_id_for(record[id_column])
                batch_hashes[i] = hash(custom_id)
                body = renderer.body(record)
                tokens = count_request_tokens(renderer.endpoint, body)
                packer.add(custom_id, renderer.line(custom_id, body), tokens)
            hashes.append(batch_hashes)
            rows += len(records)
        dupes = _duplicate_ids(np.concatenate(hashes)) if hashes else np.array([])
        if len(dupes):
            raise _duplicate_error(dataset, id_column, expression, set(dupes.tolist()))
        shards = packer.finish()
    except BaseException:
        packer.abort()
        raise
    return PrepareResult(shards=shards, rows=rows)


def _duplicate_error(
    dataset: ds.Dataset, id_column: str, expression: ds.Expression | None, suspects: set[int]
) -> BadInputError:
    """Second pass over the ids only, to name the duplicated values exactly."""
    seen: set[str] = set()
    duplicated: list[str] = []
    for batch in iter_source_batches(dataset, [id_column], expression):
        for value in batch.column(0).to_pylist():
            cid = custom_id_for(value)
            if hash(cid) in suspects:
                if cid in seen and str(value) not in duplicated:
                    duplicated.append(str(value))
                seen.add(cid)
    shown = ", ".join(repr(v) for v in duplicated[:5])
    return BadInputError(
        f"source.id_column {id_column!r} is not unique: {len(duplicated)} value(s) occur more than "
        f"once (e.g. {shown}). Each row needs its own id: deduplicate the source or choose a unique "
        "id column."
    )


def count_selected(dataset: ds.Dataset, expression: ds.Expression | None) -> int:
    return int(dataset.count_rows(filter=expression))


def id_values_as_text(values: pa.Array) -> pa.Array:
    return pc.cast(values, pa.string())
