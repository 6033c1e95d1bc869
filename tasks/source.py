"""The job's source table: opened, and streamed in bounded record batches.

The source is read in record batches (column projection and filter pushed down to the Parquet
reader) and never held whole. Errors opening it are BadInputErrors that name the URI and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas.job import JobSpec
from tasks.errors import BadInputError
from tasks.sourcecheck import (
    check_files_have,
    filter_columns,
    source_filter,
    validate_job_against_schema,
)
from tasks.storage import NoCredentialsError, ObjectStore, access_refused

SCAN_BATCH_ROWS = 4096
RENDER_BATCH_ROWS = 4096  # small (filtered) scan batches are merged up to this many rows
SCAN_BATCH_READAHEAD = 2  # batches the scanner decodes ahead: bounds the scan's memory
SCAN_BUFFER_BYTES = 8 << 20


def open_source(job: JobSpec, store: ObjectStore) -> ds.Dataset:
    uri = job.source.uri
    try:
        return store.dataset(uri)
    except FileNotFoundError:
        raise BadInputError(
            f"source not found: {uri!r}. Check source.uri in the job spec "
            "(a Parquet file or a directory of Parquet files, local path or s3://bucket/key)."
        ) from None
    except pa.ArrowInvalid as exc:
        raise not_parquet(uri, exc) from None
    except (PermissionError, NoCredentialsError) as exc:
        raise access_refused(uri, exc) from None


@dataclass
class CheckedSource:
    dataset: ds.Dataset
    columns: list[str]  # the columns prepare reads: the id and the template's
    expression: ds.Expression | None  # source.filter
    filter_on: list[str]  # the columns the filter refers to


def checked_source(job: JobSpec, store: ObjectStore) -> CheckedSource:
    """The job's source, opened and checked against the job (tasks.sourcecheck): every column it
    names, in every file, of a type a request can carry; the filter's values of its columns' types.
    Reads footers only."""
    dataset = open_source(job, store)
    columns = validate_job_against_schema(job, dataset.schema)
    filter_on = filter_columns(job)
    files = len(dataset.files) if isinstance(dataset, ds.FileSystemDataset) else 0
    check_files_have(files_missing(dataset, list(dict.fromkeys(columns + filter_on))), files)
    return CheckedSource(dataset, columns, source_filter(job, dataset.schema), filter_on)


def not_parquet(uri: str, exc: Exception) -> BadInputError:
    text = str(exc)
    reason = (
        "no Parquet footer: a CSV or JSON file renamed, or a file cut short"
        if "magic bytes" in text
        else text.split(". ")[0]
    )
    return BadInputError(
        f"source {uri!r} is not Parquet ({reason}). nightbatch reads Parquet files: convert it "
        "(e.g. pandas.read_csv(path).to_parquet(path_parquet)) and point source.uri at the result."
    )


def files_missing(dataset: ds.Dataset, columns: list[str]) -> list[tuple[str, list[str]]]:
    """(file, the `columns` it lacks) for every file of the dataset that lacks one (each file's
    footer is read: discovery inspects only the first)."""
    if not _plain_parquet(dataset):
        return []
    missing = []
    for fragment in dataset.get_fragments():
        try:
            names = set(fragment.physical_schema.names)
        except pa.ArrowInvalid as exc:
            raise not_parquet(fragment.path, exc) from None
        lacking = [name for name in columns if name not in names]
        if lacking:
            missing.append((fragment.path, lacking))
    return missing


def iter_source_batches(
    dataset: ds.Dataset,
    columns: list[str],
    expression: ds.Expression | None,
    filter_on: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The selected rows, in dataset order, in record batches of at most SCAN_BATCH_ROWS rows, with
    `columns` only. `filter_on` names the columns `expression` refers to.

    Memory stays bounded by a few batches, whatever the row groups' size: each Parquet file is
    streamed page by page (`ParquetFile.iter_batches`, no pre-buffering) from the row groups that
    the filter's statistics do not rule out, and the filter is applied to each batch. (Arrow's
    dataset scanner, the fallback when the columns of a filter are not given, decodes whole row
    groups ahead and holds several times more.)"""
    if (expression is not None and filter_on is None) or not _plain_parquet(dataset):
        yield from _scanner_batches(dataset, columns, expression)
        return
    read = list(dict.fromkeys([*columns, *(filter_on or [])]))
    target = pa.schema([dataset.schema.field(name) for name in read])
    for fragment in dataset.get_fragments():
        groups = None
        if expression is not None:
            pieces = fragment.split_by_row_group(filter=expression, schema=dataset.schema)
            groups = [group.id for piece in pieces for group in piece.row_groups]
            if not groups:
                continue
        with dataset.filesystem.open_input_file(fragment.path) as handle:
            file = pq.ParquetFile(handle, pre_buffer=False, buffer_size=SCAN_BUFFER_BYTES)
            present = [name for name in read if name in file.schema_arrow.names]
            for batch in file.iter_batches(
                batch_size=SCAN_BATCH_ROWS, row_groups=groups, columns=present, use_threads=True
            ):
                batch = _conform(batch, target)
                if expression is not None:
                    batch = batch.filter(expression).select(columns)
                if batch.num_rows:
                    yield batch


def _plain_parquet(dataset: ds.Dataset) -> bool:
    return isinstance(dataset, ds.FileSystemDataset) and isinstance(
        dataset.format, ds.ParquetFileFormat
    )


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A file's batch in the dataset's schema: columns in order, cast, missing ones null (as the
    dataset scanner does)."""
    if batch.schema.equals(schema):
        return batch
    arrays = []
    for target in schema:
        if target.name in batch.schema.names:
            column = batch.column(target.name)
            arrays.append(column if column.type == target.type else column.cast(target.type))
        else:
            arrays.append(pa.nulls(batch.num_rows, target.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _scanner_batches(
    dataset: ds.Dataset, columns: list[str], expression: ds.Expression | None
) -> Iterator[pa.RecordBatch]:
    yield from dataset.to_batches(
        columns=columns,
        filter=expression,
        batch_size=SCAN_BATCH_ROWS,
        batch_readahead=SCAN_BATCH_READAHEAD,
        fragment_readahead=1,
        fragment_scan_options=ds.ParquetFragmentScanOptions(
            pre_buffer=False, use_buffered_stream=True, buffer_size=SCAN_BUFFER_BYTES
        ),
        use_threads=True,
    )


def merge_small_batches(
    batches: Iterable[pa.RecordBatch], min_rows: int = RENDER_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Batches of at least `min_rows` rows (but the last): a selective filter yields many small
    batches, and per-batch work (and token sampling) wants full ones."""
    held: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        held.append(batch)
        rows += batch.num_rows
        if rows >= min_rows:
            yield _concat(held)
            held, rows = [], 0
    if held:
        yield _concat(held)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def count_selected(dataset: ds.Dataset, expression: ds.Expression | None) -> int:
    return int(dataset.count_rows(filter=expression))
