"""The job checked against its source's schema: every column it names exists, has a type a
template can render, and is in every file of the dataset; the filter's values fit its columns.
Each problem is one BadInputError that names it and the fix. No I/O."""

from __future__ import annotations

import difflib

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas.job import JobSpec
from schemas.tables import LINEAGE_FIELDS, output_fields
from tasks.errors import BadInputError


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


def filter_columns(job: JobSpec) -> list[str]:
    """The columns source.filter refers to."""
    return list(dict.fromkeys(column for column, _, _ in job.source.filter or []))


def check_ids(batch: pa.RecordBatch, id_column: str) -> None:
    ids = batch.column(id_column)
    nulls = ids.null_count
    if nulls:
        raise BadInputError(
            f"source.id_column {id_column!r} has {nulls} null value(s) in the selected rows. "
            "Every row needs an id: fill them in or filter those rows out with source.filter."
        )
