"""The job checked against its source's schema: every column it names exists, has a type a
template can render, and is in every file of the dataset; the filter's values fit its columns.
Each problem is one BadInputError that names it and the fix. No I/O."""

from __future__ import annotations

import difflib
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

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
            error = _unknown_column(name, available, "template field")
            if name.isidentifier():
                raise error
            raise BadInputError(f"{error} (For a literal brace in a template, write {{{{ or }}}}.)")
        _check_renderable(name, schema.field(name).type)
    for column in filter_columns(job):
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


def _check_renderable(name: str, kind: pa.DataType) -> None:
    """Text, numbers, dates and times render as text; lists, structs and maps as JSON; binary
    cannot be put in a request."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
    ):
        raise BadInputError(
            f"template field {name!r} is a binary column ({kind}): a request carries text only. "
            "Leave it out of the template, or add a text column to the source (decoded text, or "
            "base64 if the model should see the bytes) and use that."
        )


def check_files_have(missing: list[tuple[str, list[str]]], files: int) -> None:
    """`missing`: (file, columns it lacks) for the dataset's files that lack a column the job
    needs. A row of such a file would be sent with an empty value (or filtered as null)."""
    if not missing:
        return
    columns = sorted({c for _, lacking in missing for c in lacking})
    example = missing[0][0]
    raise BadInputError(
        f"column(s) {columns} are missing from {len(missing)} of the {files} files of the source "
        f"(e.g. {example!r}): their rows would be sent with empty values. Add the column(s) to "
        "those files, or point source.uri at the files that have them."
    )


def source_filter(job: JobSpec, schema: pa.Schema | None = None) -> ds.Expression | None:
    """source.filter as one Arrow expression; with the source's `schema`, each condition's value
    is checked against its column's type (dates and times may be ISO strings)."""
    if not job.source.filter:
        return None
    expression: ds.Expression | None = None
    for condition in job.source.filter:
        part = _condition(condition, schema)
        expression = part if expression is None else expression & part
    return expression


def _condition(condition: tuple[Any, ...], schema: pa.Schema | None) -> ds.Expression:
    column, op = condition[0], condition[1]
    field = ds.field(column)
    if op == "is_null":
        return field.is_null()
    if op == "not_null":
        return field.is_valid()
    kind = schema.field(column).type if schema is not None and column in schema.names else None
    value = condition[2]
    if op in ("in", "not in"):
        values = [_value(condition, kind, v) for v in value]
        member = field.isin(pa.array(values, kind) if kind is not None else values)
        return member if op == "in" else ~member & field.is_valid()  # null matches no comparison
    scalar = _value(condition, kind, value)
    compare = {"==": field.__eq__, "!=": field.__ne__, "<": field.__lt__, "<=": field.__le__,
               ">": field.__gt__, ">=": field.__ge__}[op]  # fmt: skip
    return compare(scalar)


def _value(condition: tuple[Any, ...], kind: pa.DataType | None, value: Any) -> Any:
    """A filter value as its column's type, or a BadInputError naming the condition and the fix."""
    if kind is None:
        return value
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    temporal = pa.types.is_temporal(kind)
    numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if temporal and isinstance(value, str | date):
        try:
            return pa.scalar(value).cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    else:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            (numeric and number)
            or (text and isinstance(value, str))
            or (pa.types.is_boolean(kind) and isinstance(value, bool))
        ):
            return value
    expected = (
        "an ISO date or time (e.g. 2026-01-31 or 2026-01-31T06:00:00)" if temporal
        else "a number, without quotes" if numeric
        else "text, in quotes" if text
        else "true or false" if pa.types.is_boolean(kind)
        else None
    )  # fmt: skip
    if expected is None:
        raise BadInputError(
            f"source.filter {list(condition)}: column {condition[0]!r} is {kind}, which a filter "
            "cannot compare. Filter on a text, number, boolean, date or time column."
        )
    raise BadInputError(
        f"source.filter {list(condition)}: column {condition[0]!r} holds {kind} values, but "
        f"{value!r} is {type(value).__name__}. Write the value as {expected}."
    )


def filter_columns(job: JobSpec) -> list[str]:
    """The columns source.filter refers to."""
    return list(dict.fromkeys(condition[0] for condition in job.source.filter or []))


def check_ids(batch: pa.RecordBatch, id_column: str) -> None:
    ids = batch.column(id_column)
    nulls = ids.null_count
    if nulls:
        raise BadInputError(
            f"source.id_column {id_column!r} has {nulls} null value(s) in the selected rows. "
            "Every row needs an id: fill them in or filter those rows out with source.filter."
        )
