"""Structured output checked with a real JSON Schema validator, on the line-by-line path and the
vectorised (Arrow) path alike: nested objects and arrays of objects are kept as JSON text, outputs
that break the schema (enum, bounds, nested types) are billed permanent errors, never a crash; an
invalid schema is refused when the job is read."""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa
import pytest
from pydantic import ValidationError

from schemas.job import RequestSpec
from schemas.tables import output_fields
from tasks.parse import LineParser

INVOICE = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "status": {"type": "string", "enum": ["paid", "open"]},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
            },
        },
        "address": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TRIAGE = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "other"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 4},
    },
}


def line(custom_id: str, content: str) -> dict[str, Any]:
    body = {
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9},
    }  # fmt: skip
    return {"id": "x", "custom_id": custom_id, "response": {"status_code": 200, "body": body}}


def both_paths(schema: dict[str, Any], contents: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each content as `parse` sees it, after checking the vectorised path agrees."""
    parser = LineParser(
        RequestSpec(model="gpt-4o-mini", template="{t}", output_schema=schema), 1, "b"
    )
    lines = [line(f"r-{i}", c) for i, c in enumerate(contents)]
    one_by_one = [parser.parse(x) for x in lines]
    table = parser.read_lines(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    assert table is not None
    parsed = parser.parse_table(table)
    ok = {r["custom_id"]: r for r in parsed.results.to_pylist()}
    bad = {r["custom_id"]: r for r in parsed.errors}
    for i, (kind, row) in enumerate(one_by_one):
        assert (f"r-{i}" in ok) == (kind == "result")
        if kind == "error":
            assert bad[f"r-{i}"]["code"] == row["code"] == "invalid_output"
        else:
            assert ok[f"r-{i}"] == row
    return one_by_one


def test_arrays_of_objects_and_nested_objects_become_json_text_columns() -> None:
    fields = {f.name: f.type for f in output_fields(RequestSpec(model="m", template="{t}", output_schema=INVOICE))}  # fmt: skip
    assert fields == {"vendor": pa.string(), "status": pa.string(), "lines": pa.string(), "address": pa.string()}  # fmt: skip
    good = '{"vendor": "ACME", "status": "paid", "lines": [{"sku": "A-1", "qty": 2}], "address": {"city": "Lyon"}}'
    [(kind, row)] = both_paths(INVOICE, [good])
    assert kind == "result"
    assert orjson.loads(row["lines"]) == [{"sku": "A-1", "qty": 2}]
    assert orjson.loads(row["address"]) == {"city": "Lyon"}


@pytest.mark.parametrize(
    ("content", "names"),
    [
        ('{"vendor": "ACME", "status": "late", "lines": [], "address": {"city": "Lyon"}}', "'status'"),
        ('{"vendor": "ACME", "status": "paid", "lines": [{"sku": "A", "qty": 0}], "address": {"city": "L"}}', "'lines/0/qty'"),
        ('{"vendor": "ACME", "status": "paid", "lines": [{"sku": "A"}], "address": {"city": "L"}}', "'qty' is a required property"),
        ('{"vendor": "ACME", "status": "paid", "lines": [], "address": {"city": "L", "zip": "1"}}', "'address'"),
    ],
)  # fmt: skip
def test_nested_outputs_that_break_the_schema_are_billed_permanent_errors(
    content: str, names: str
) -> None:
    [(kind, row)] = both_paths(INVOICE, [content])
    assert kind == "error" and row["retryable"] is False and row["billed"] is True
    assert names in row["message"]


def test_enum_and_bounds_are_checked_on_the_vectorised_path_too() -> None:
    contents = [
        '{"category": "billing", "priority": 2}',
        '{"category": "refund", "priority": 2}',  # not in the enum
        '{"category": "other", "priority": 9}',  # above the maximum
        '{"category": "other", "priority": 0}',  # below the minimum
        '{"category": "other", "priority": 4}',
    ]
    kinds = [kind for kind, _ in both_paths(TRIAGE, contents)]
    assert kinds == ["result", "error", "error", "error", "result"]


def test_an_invalid_json_schema_is_refused_with_where_it_is_wrong() -> None:
    broken = {"type": "object", "properties": {"priority": {"type": "integr"}}}
    with pytest.raises(ValidationError, match="not a valid JSON Schema.*properties/priority/type"):
        RequestSpec(model="gpt-4o-mini", template="{t}", output_schema=broken)
