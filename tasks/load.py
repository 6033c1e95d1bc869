"""load: join results to source rows and write the enriched dataset atomically, plus the dead letter.

Every selected row ends exactly once in the output (it has a result) or in the dead letter (it has
none: permanent error, retries exhausted, or never came back).

Memory stays bounded as runs grow: a run whose outcomes fit in one bucket (LOAD_BUCKET_ROWS rows and
LOAD_BUCKET_BYTES of results) is joined in memory while the source streams past. A larger run is
hash-partitioned by custom_id: results, errors, prepared ids and the source's ids are spilled to local
Arrow IPC files, one per bucket, and joined bucket by bucket, so only one bucket's results (never all
the vectors of an embeddings run) are in memory at a time; the joined results, spilled in source
order, are then merged back into a second scan of the source (`_join_by_bucket`). Either way the
output keeps the source's row order."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
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
from tasks.cache import ResultCache, served_results, served_usage
from tasks.layout import output_file
from tasks.reconcile import add_usage
from tasks.render import custom_ids_for
from tasks.runs import manifest_layout
from tasks.source import iter_source_batches, open_source
from tasks.sourcecheck import filter_columns, source_columns, source_filter
from tasks.storage import ObjectStore

USAGE_COLUMNS = (
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)


@dataclass
class RunBilling:
    """What the cost record needs of a run's outcomes: token totals per model of every billed line
    (succeeded, or completed with invalid output), of the rows served from the cache, and how many
    result rows (requests of this run that succeeded) and error rows there were."""

    billed: dict[str, dict[str, int]]
    cached: dict[str, dict[str, int]]
    result_rows: int
    error_rows: int


def run_billing(manifest: RunManifest, store: ObjectStore) -> RunBilling:
    """`RunBilling` of a run, shard by shard: only the model, usage and id columns are read (never
    the outputs), one shard at a time."""
    billed: dict[str, dict[str, int]] = {}
    result_rows = error_rows = 0
    wanted = ["custom_id", "model", *USAGE_COLUMNS]
    for shard in manifest.shards:
        if shard.results_uri:
            results = store.read_table(shard.results_uri, columns=wanted)
            result_rows += results.num_rows
            _add_usage(billed, results)
        if shard.errors_uri:
            errors = store.read_table(shard.errors_uri, columns=[*wanted, "billed"])
            error_rows += errors.num_rows
            _add_usage(billed, errors.filter(pc.field("billed")))
    for stray in manifest.stray_batches:  # billed by the provider though no row takes its results
        add_usage(billed, stray.usage)
    cached: dict[str, dict[str, int]] = {}
    if manifest.cache_hits_uri:
        cache = ResultCache(store, manifest.job.storage_root, manifest.job, manifest.api)
        for served in served_usage(cache, store, manifest.cache_hits_uri, datetime.now(UTC)):
            _add_usage(cached, served)
    return RunBilling(billed, cached, result_rows, error_rows)


ERROR_OUTCOME_COLUMNS = ["custom_id", "attempt", "batch_id", "code", "retryable"]


def succeeded_ids_and_errors(
    manifest: RunManifest, store: ObjectStore
) -> tuple[set[str], pa.Table]:
    """custom_ids with a result, and every error row of every attempt with the columns that decide
    a retry (`ERROR_OUTCOME_COLUMNS`: no result columns, no messages read)."""
    succeeded: set[str] = set()
    for shard in manifest.shards:
        if shard.results_uri:
            succeeded.update(
                store.read_table(shard.results_uri, columns=["custom_id"]).column(0).to_pylist()
            )
    schema = pa.schema([ERRORS_SCHEMA.field(name) for name in ERROR_OUTCOME_COLUMNS])
    errors = [
        store.read_table(s.errors_uri, columns=ERROR_OUTCOME_COLUMNS).cast(schema)
        for s in manifest.shards
        if s.errors_uri
    ]
    return succeeded, (pa.concat_tables(errors) if errors else schema.empty_table())


def last_errors(errors: pa.Table) -> dict[str, dict[str, Any]]:
    """The latest error row of each custom_id (by attempt)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in errors.select(["custom_id", "attempt", "code", "message", "retryable"]).to_pylist():
        current = latest.get(row["custom_id"])
        if current is None or row["attempt"] >= current["attempt"]:
            latest[row["custom_id"]] = row
    return latest


def dead_letter_row(custom_id: str, row_id: str, error: dict[str, Any] | None) -> dict[str, Any]:
    if error is None:
        return {
            "custom_id": custom_id, "row_id": row_id, "reason": "missing", "code": "missing",
            "message": "no result and no error was recorded for this row", "attempts": 0,
        }  # fmt: skip
    if error["attempt"] == 0:  # refused at prepare, never sent (tasks.rowgate)
        reason = "not_sent"
    else:
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


LOAD_BUCKET_ROWS = 200_000  # outcome rows held in memory at once
LOAD_BUCKET_BYTES = 256 << 20  # result bytes (uncompressed) held in memory at once
SCAN_ROWS = 8192
SPILL_BATCH_BYTES = 1 << 20  # a spilled batch of joined results is at most about this large
ROW_GROUP_ROWS = 65_536  # enriched rows written as one row group ...
ROW_GROUP_BYTES = 64 << 20  # ... or fewer when they are this large (embeddings)
_CID = "__nb_custom_id"
_POS = "__nb_position"  # a row's position in the source scan
_POS_FIELD = pa.field(_POS, pa.int64())
_ERROR_COLUMNS = ["custom_id", "attempt", "code", "message", "retryable"]


@dataclass
class _Bucket:
    """The outcomes of one bucket of custom_ids: results (with cached_from_run), the latest error of
    each custom_id, and the custom_ids prepared for the run."""

    results: pa.Table
    errors: dict[str, dict[str, Any]]
    prepared: set[str]
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {cid: i for i, cid in enumerate(self.results.column("custom_id").to_pylist())}


class _Spill:
    """Tables partitioned by bucket into Arrow IPC stream files (one per bucket) in a directory."""

    def __init__(self, directory: Path, name: str, schema: pa.Schema, buckets: int) -> None:
        self.paths = [directory / f"{name}-{b:04d}.arrow" for b in range(buckets)]
        self.schema = schema
        self.writers: dict[int, ipc.RecordBatchStreamWriter] = {}

    def add(self, table: pa.Table, bucket: np.ndarray) -> None:
        """Each row to the file of its bucket."""
        order = np.argsort(bucket, kind="stable")
        ordered = table.take(pa.array(order))
        counts = np.bincount(bucket, minlength=len(self.paths))
        start = 0
        for b in np.flatnonzero(counts).tolist():
            self.write(b, ordered.slice(start, int(counts[b])))
            start += int(counts[b])

    def write(self, b: int, table: pa.Table, batch_rows: int | None = None) -> None:
        """Rows of bucket `b`, in batches of at most `batch_rows`."""
        if table.schema != self.schema:
            table = table.cast(self.schema)
        writer = self.writers.get(b)
        if writer is None:
            writer = self.writers[b] = ipc.new_stream(str(self.paths[b]), self.schema)
        writer.write_table(table, max_chunksize=batch_rows)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def read(self, b: int) -> Iterator[pa.RecordBatch]:
        if self.paths[b].exists():
            with pa.OSFile(str(self.paths[b])) as handle, ipc.open_stream(handle) as reader:
                yield from reader

    def table(self, b: int) -> pa.Table:
        return pa.Table.from_batches(list(self.read(b)), schema=self.schema)


def _buckets_of(custom_ids: list[str], buckets: int) -> np.ndarray:
    return np.fromiter(map(hash, custom_ids), np.int64, len(custom_ids)) % buckets


def _with_cached_from(table: pa.Table, schema: pa.Schema) -> pa.Table:
    table = table.select(schema.names[:-1]).cast(pa.schema(list(schema)[:-1]))
    return table.append_column("cached_from_run", pa.nulls(table.num_rows, pa.string()))


class _Outcomes:
    """Streams every outcome of a run, without holding them: result rows, error rows (the columns
    the dead letter needs) and prepared custom_ids."""

    def __init__(self, manifest: RunManifest, store: ObjectStore) -> None:
        self.manifest = manifest
        self.store = store
        base = results_schema(manifest.job.request)
        self.results_schema = base.append(pa.field("cached_from_run", pa.string()))
        self.errors_schema = pa.schema([ERRORS_SCHEMA.field(c) for c in _ERROR_COLUMNS])
        self.ids_schema = pa.schema([pa.field("custom_id", pa.string())])

    def _batches(self, uri: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        fs, path = self.store.fs(uri)
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(SCAN_ROWS, columns=columns):
                yield pa.Table.from_batches([batch])

    def results(self) -> Iterator[pa.Table]:
        for shard in self.manifest.shards:
            if shard.results_uri:
                for table in self._batches(shard.results_uri):
                    yield _with_cached_from(table, self.results_schema)
        if self.manifest.cache_hits_uri:
            for cached in served_results(
                ResultCache(
                    self.store, self.manifest.job.storage_root, self.manifest.job, self.manifest.api
                ),
                self.store,
                self.manifest.cache_hits_uri,
                datetime.now(UTC),
            ):
                yield cached.cast(self.results_schema)

    def errors(self) -> Iterator[pa.Table]:
        for shard in self.manifest.shards:
            if shard.errors_uri:
                for table in self._batches(shard.errors_uri, _ERROR_COLUMNS):
                    yield table.cast(self.errors_schema)
        if self.manifest.refused_uri:
            for table in self._batches(self.manifest.refused_uri, _ERROR_COLUMNS):
                yield table.cast(self.errors_schema)

    def prepared(self) -> Iterator[pa.Table]:
        layout = manifest_layout(self.manifest)
        for shard in self.manifest.shards:
            if shard.attempt == 1:
                yield from self._batches(layout.ids_file(shard.attempt, shard.index), ["custom_id"])
        if self.manifest.cache_hits_uri:
            yield from self._batches(self.manifest.cache_hits_uri, ["custom_id"])
        if self.manifest.refused_uri:
            yield from self._batches(self.manifest.refused_uri, ["custom_id"])

    def bucket_count(self) -> int:
        """How many buckets keep each one's outcomes under LOAD_BUCKET_ROWS / LOAD_BUCKET_BYTES
        (from the run's counts and the results files' footers)."""
        result_bytes = result_rows = 0
        for shard in self.manifest.shards:
            if shard.results_uri:
                fs, path = self.store.fs(shard.results_uri)
                meta = pq.ParquetFile(path, filesystem=fs).metadata
                result_rows += meta.num_rows
                result_bytes += sum(
                    meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)
                )
        rows = max(self.manifest.rows_selected, result_rows) + self.manifest.cache_hits
        by_rows = math.ceil(rows / LOAD_BUCKET_ROWS)
        return max(1, by_rows, math.ceil(result_bytes / LOAD_BUCKET_BYTES))

    def one_bucket(self) -> _Bucket:
        """Every outcome in memory (a run that fits one bucket)."""
        results = pa.concat_tables(list(self.results()) or [self.results_schema.empty_table()])
        errors = pa.concat_tables(list(self.errors()) or [self.errors_schema.empty_table()])
        prepared = {cid for t in self.prepared() for cid in t.column(0).to_pylist()}
        return _Bucket(results, last_errors(errors), prepared)


def write_output(manifest: RunManifest, store: ObjectStore) -> LoadSummary:
    job = manifest.job
    layout = manifest_layout(manifest)
    outcomes = _Outcomes(manifest, store)
    dataset = open_source(job, store)
    copied = source_columns(job, dataset.schema)
    id_column = job.source.id_column
    columns = list(dict.fromkeys([id_column, *copied]))
    result_names = [f.name for f in output_fields(job.request)]
    out_schema = pa.schema(
        [dataset.schema.field(c) for c in columns]
        + [f for f in outcomes.results_schema if f.name in result_names]
        + LINEAGE_FIELDS
    )
    target = output_file(job.output_uri, manifest.run_date)
    join = _Join(manifest, columns, result_names, out_schema)

    def scan(names: list[str]) -> Iterator[pa.RecordBatch]:
        return iter_source_batches(
            dataset, names, source_filter(job, dataset.schema), filter_columns(job)
        )

    buckets = outcomes.bucket_count()
    with (
        store.open_atomic(layout.dead_letter) as dead_handle,
        store.open_atomic(target) as handle,
        tempfile.TemporaryDirectory(prefix="nightbatch-load-") as spill_dir,
    ):
        join.open(handle, dead_handle)
        try:
            if buckets == 1:
                bucket = outcomes.one_bucket()
                for batch in scan(columns):
                    join.add(batch, custom_ids_for(batch.column(id_column)).to_pylist(), bucket)
            else:
                _join_by_bucket(outcomes, scan, columns, buckets, Path(spill_dir), join)
        finally:
            join.close()  # on an error too, while the files are open (they are then discarded)
    return LoadSummary(target, layout.dead_letter, join.written, join.dead, join.not_in_run)


def _join_by_bucket(
    outcomes: _Outcomes,
    scan: Callable[[list[str]], Iterator[pa.RecordBatch]],
    columns: list[str],
    buckets: int,
    directory: Path,
    join: _Join,
) -> None:
    """Spill the outcomes and the source's ids (with each row's position) to one file per bucket;
    join each bucket's ids to its outcomes (rows without a result go to the dead letter there and
    then, results are spilled again in source order); then scan the source once more and merge each
    batch's results back from the buckets' spills. The output keeps the source's order, and source
    rows are never spilled (only their ids)."""
    id_column = columns[0]
    spills: dict[str, _Spill] = {
        "results": _Spill(directory, "results", outcomes.results_schema, buckets),
        "errors": _Spill(directory, "errors", outcomes.errors_schema, buckets),
        "prepared": _Spill(directory, "prepared", outcomes.ids_schema, buckets),
    }
    for name, tables in (
        ("results", outcomes.results()),
        ("errors", outcomes.errors()),
        ("prepared", outcomes.prepared()),
    ):
        for table in tables:
            ids = table.column("custom_id").to_pylist()
            spills[name].add(table, _buckets_of(ids, buckets))
    position = 0
    for batch in scan([id_column]):
        custom_ids = custom_ids_for(batch.column(id_column))
        rows = pa.Table.from_batches([batch.select([id_column])])
        rows = rows.append_column(_CID, custom_ids).append_column(
            _POS, pa.array(np.arange(position, position + batch.num_rows))
        )
        if "ids" not in spills:
            spills["ids"] = _Spill(directory, "ids", rows.schema, buckets)
        spills["ids"].add(rows, _buckets_of(custom_ids.to_pylist(), buckets))
        position += batch.num_rows
    for spill in spills.values():
        spill.close()
    if "ids" not in spills:
        return
    joined = _Spill(directory, "joined", outcomes.results_schema.append(_POS_FIELD), buckets)
    for b in range(buckets):
        errors = spills["errors"].table(b)
        bucket = _Bucket(
            spills["results"].table(b),
            last_errors(errors),
            set(spills["prepared"].table(b).column(0).to_pylist()),
        )
        for rows in _coalesced(spills["ids"].read(b), SCAN_ROWS):
            found, at = join.match(rows.column(id_column), rows.column(_CID).to_pylist(), bucket)
            if len(at):
                taken = bucket.results.take(pa.array(at))
                taken = taken.append_column(_POS, rows.column(_POS).filter(pa.array(found)))
                joined.write(b, taken, _spill_batch_rows(taken))
        for spill in spills.values():  # done with: the joined results take their disk space
            spill.paths[b].unlink(missing_ok=True)
    joined.close()
    streams = [_PositionStream(joined.read(b)) for b in range(buckets)]
    position = 0
    for batch in scan(columns):
        end = position + batch.num_rows
        pieces = [piece for stream in streams if (piece := stream.below(end)) is not None]
        if pieces:
            taken = pa.concat_tables(pieces)
            at = taken.column(_POS).to_numpy()
            order = np.argsort(at, kind="stable")
            taken = taken.take(pa.array(order)).drop_columns([_POS])
            rows = batch.take(pa.array(at[order] - position))
            if not custom_ids_for(rows.column(id_column)).equals(
                taken.column("custom_id").combine_chunks()
            ):
                raise _source_changed()
            join.emit(rows, taken)
        position = end
    if any(stream.below(np.iinfo(np.int64).max) is not None for stream in streams):
        raise _source_changed()  # results of rows the second scan did not reach


def _source_changed() -> RuntimeError:
    return RuntimeError(
        "the source table changed while load was reading it (its two scans saw different rows); "
        "run load again"
    )


def _spill_batch_rows(table: pa.Table) -> int:
    """Rows per spilled batch: small enough that one batch of each bucket held at once stays small
    (an embedding row is kilobytes)."""
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    return int(min(SCAN_ROWS, max(64, SPILL_BATCH_BYTES // row_bytes)))


class _PositionStream:
    """The batches of a spill sorted by source position, taken a position range at a time."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self.batches = batches
        self.rest: pa.Table | None = None

    def below(self, end: int) -> pa.Table | None:
        """The next rows whose position is below `end` (None if there are none)."""
        taken: list[pa.Table] = []
        while True:
            if self.rest is None or not self.rest.num_rows:
                batch = next(self.batches, None)
                if batch is None:
                    break
                self.rest = pa.Table.from_batches([batch])
            cut = int(np.searchsorted(self.rest.column(_POS).to_numpy(), end))
            taken.append(self.rest.slice(0, cut))
            self.rest = self.rest.slice(cut)
            if self.rest.num_rows:
                break
        taken = [t for t in taken if t.num_rows]
        return pa.concat_tables(taken) if taken else None


def _coalesced(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """The batches of a spill file (small: a slice of a source batch each) as tables of at least
    `rows` rows (but the last)."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(held).combine_chunks()
            held, count = [], 0
    if held:
        yield pa.Table.from_batches(held).combine_chunks()


class _Join:
    """Writes the enriched rows of source batches and the dead letter of the rows left over."""

    def __init__(
        self,
        manifest: RunManifest,
        columns: list[str],
        result_names: list[str],
        out_schema: pa.Schema,
    ) -> None:
        self.manifest = manifest
        self.columns = columns
        self.result_names = result_names
        self.out_schema = out_schema
        self.written = self.dead = self.not_in_run = 0
        self.dead_rows: list[dict[str, Any]] = []
        self.held: list[pa.Table] = []
        self.held_rows = self.held_bytes = 0

    def open(self, handle: Any, dead_handle: Any) -> None:
        self.writer = pq.ParquetWriter(handle, self.out_schema, compression="zstd")
        self.dead_writer = pq.ParquetWriter(dead_handle, DEAD_LETTER_SCHEMA, compression="zstd")

    def add(self, batch: pa.RecordBatch | pa.Table, custom_ids: list[str], bucket: _Bucket) -> None:
        """Source rows and their custom_ids: the enriched rows are written, the rest accounted."""
        found, at = self.match(batch.column(self.manifest.job.source.id_column), custom_ids, bucket)
        if len(at):
            self.emit(batch.filter(pa.array(found)), bucket.results.take(pa.array(at)))

    def match(
        self, id_values: Any, custom_ids: list[str], bucket: _Bucket
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which rows have a result (a mask) and where their results are in the bucket; each row
        without one goes to the dead letter, or is counted as not in this run."""
        n_rows = len(custom_ids)
        index = bucket.index
        positions = np.fromiter((index.get(c, -1) for c in custom_ids), np.int64, n_rows)
        found = positions >= 0
        missing = np.flatnonzero(~found)
        if len(missing):
            values = id_values.take(pa.array(missing)).to_pylist()
            for i, value in zip(missing.tolist(), values, strict=True):
                cid = custom_ids[i]
                if cid not in bucket.prepared:
                    self.not_in_run += 1  # appeared in the source after prepare: not in this run
                    continue
                self.dead_rows.append(dead_letter_row(cid, str(value), bucket.errors.get(cid)))
                self.dead += 1
            if len(self.dead_rows) >= SCAN_ROWS:
                self._flush_dead()
        return found, positions[found]

    def emit(self, rows: pa.RecordBatch | pa.Table, taken: pa.Table) -> None:
        """Write source rows with their results (`taken`, row for row)."""
        n = rows.num_rows
        arrays = [rows.column(c) for c in self.columns]
        arrays += [taken.column(name) for name in self.result_names]
        cached_from = taken.column("cached_from_run")
        status = pc.if_else(pc.is_null(cached_from), "succeeded", "cached")
        arrays += [
            pa.repeat(pa.scalar(self.manifest.run_id, pa.string()), n),
            taken.column("custom_id"),
            taken.column("model"),
            status,
            taken.column("finish_reason"),
            taken.column("attempt"),
            taken.column("batch_id"),
            cached_from,
            pa.repeat(pa.scalar(self.manifest.api or "unknown", pa.string()), n),
        ]
        self.held.append(
            pa.Table.from_arrays([_chunked(a) for a in arrays], schema=self.out_schema)
        )
        self.held_rows += n
        self.held_bytes += self.held[-1].nbytes
        if self.held_rows >= ROW_GROUP_ROWS or self.held_bytes >= ROW_GROUP_BYTES:
            self._flush()
        self.written += n

    def _flush(self) -> None:
        """Write what is held as one row group (not one per source batch: readers want big ones)."""
        if self.held:
            self.writer.write_table(pa.concat_tables(self.held), row_group_size=self.held_rows)
            self.held, self.held_rows, self.held_bytes = [], 0, 0

    def _flush_dead(self) -> None:
        if self.dead_rows:
            table = pa.Table.from_pylist(self.dead_rows, schema=DEAD_LETTER_SCHEMA)
            self.dead_writer.write_table(table)
            self.dead_rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self._flush_dead()
        self.dead_writer.close()


def _chunked(array: Any) -> pa.ChunkedArray:
    return array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array])


def _add_usage(usage: dict[str, dict[str, int]], table: pa.Table) -> None:
    """Add a table's lines and token sums, per model, to `usage`."""
    if table.num_rows == 0:
        return
    grouped = table.group_by("model").aggregate(
        [(c, "sum") for c in USAGE_COLUMNS] + [("custom_id", "count")]
    )
    for row in grouped.to_pylist():
        acc = usage.setdefault(
            row["model"] or "unknown", {"lines": 0, **dict.fromkeys(USAGE_COLUMNS, 0)}
        )
        acc["lines"] += row["custom_id_count"]
        for key in USAGE_COLUMNS:
            acc[key] += row[f"{key}_sum"] or 0


def cost_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=COST_RECORD_SCHEMA)
