"""A line whose structured-output JSON Schema is invalid (or breaks strict mode) fails alone, with a 400 in
the error file, as on OpenAI; the batch completes and its other lines succeed."""

from __future__ import annotations

from typing import Any

import pytest
from openai import OpenAI

GOOD = {
    "type": "object",
    "properties": {"x": {"type": "string"}},
    "required": ["x"],
    "additionalProperties": False,
}


def _chat_format(schema: Any, strict: bool = True, name: str = "answer") -> dict[str, Any]:
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": strict},
        }
    }


def _responses_format(schema: Any, strict: bool = True, name: str = "answer") -> dict[str, Any]:
    fmt = {"type": "json_schema", "name": name, "schema": schema, "strict": strict}
    return {"text": {"format": fmt}}


def _one_good_one_bad(kit, client: OpenAI, bad: Any, endpoint: str, strict: bool = True) -> dict:
    """Run a batch of a good line and a bad one; the bad line's `response.body.error`."""
    if endpoint == "/v1/responses":
        lines = [
            kit.responses_line("good", **_responses_format(GOOD)),
            kit.responses_line("bad", **_responses_format(bad, strict, name="broken")),
        ]
    else:
        lines = [
            kit.chat_line("good", **_chat_format(GOOD)),
            kit.chat_line("bad", **_chat_format(bad, strict, name="broken")),
        ]
    batch, output, errors = kit.run(client, lines, endpoint, timeout=10)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    assert [line["custom_id"] for line in output] == ["good"]
    [error] = errors
    assert error["custom_id"] == "bad" and error["error"] is None
    assert error["response"]["status_code"] == 400
    body_error = error["response"]["body"]["error"]
    assert body_error["type"] == "invalid_request_error"
    assert body_error["code"] == "invalid_json_schema"
    assert body_error["message"].startswith("Invalid schema for response_format 'broken': ")
    return body_error


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "object", "properties": {"x": {"type": "strng"}}, "required": ["x"]},
        {"type": "object", "properties": {"x": {"type": "string"}}, "required": "x"},
        {"type": "object", "properties": [{"x": {"type": "string"}}]},
        {"type": "array", "items": {"type": "string"}, "minItems": "one"},
        "not a schema",
        {"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}},
    ],
    ids=[
        "unknown-type",
        "required-not-a-list",
        "properties-a-list",
        "minItems-string",
        "string",
        "dangling-ref",
    ],
)
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses"])
def test_invalid_schema_fails_only_its_line(kit, client: OpenAI, bad: Any, endpoint: str) -> None:
    body_error = _one_good_one_bad(kit, client, bad, endpoint, strict=False)
    expected_param = "text.format.schema" if endpoint == "/v1/responses" else "response_format"
    assert body_error["param"] == expected_param


def test_strict_requires_additional_properties_false(kit, client: OpenAI) -> None:
    bad = {
        "type": "object",
        "properties": {
            "x": {
                "type": "object",
                "properties": {"y": {"type": "string"}},
                "required": ["y"],
            }
        },
        "required": ["x"],
        "additionalProperties": False,
    }
    message = _one_good_one_bad(kit, client, bad, "/v1/chat/completions")["message"]
    assert "context=('properties', 'x')" in message
    assert "'additionalProperties' is required to be supplied and to be false" in message


def test_strict_requires_every_property_in_required(kit, client: OpenAI) -> None:
    bad = {
        "type": "object",
        "properties": {"x": {"type": "string"}, "y": {"type": ["integer", "null"]}},
        "required": ["x"],
        "additionalProperties": False,
    }
    message = _one_good_one_bad(kit, client, bad, "/v1/responses")["message"]
    assert "context=()" in message
    assert "Missing 'y'" in message


def test_strict_rules_apply_in_defs_and_array_items(kit, client: OpenAI) -> None:
    bad = {
        "type": "object",
        "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/person"}}},
        "required": ["people"],
        "additionalProperties": False,
        "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    message = _one_good_one_bad(kit, client, bad, "/v1/chat/completions")["message"]
    assert "context=('$defs', 'person')" in message


def test_non_strict_schema_may_leave_properties_optional(kit, client: OpenAI) -> None:
    loose = {"type": "object", "properties": {"x": {"type": "string"}}}
    lines = [kit.chat_line("loose", **_chat_format(loose, strict=False))]
    batch, output, errors = kit.run(client, lines, timeout=10)
    assert batch.status == "completed" and errors == []
    assert [line["custom_id"] for line in output] == ["loose"]


def test_odd_but_valid_schemas_are_answered(kit, client: OpenAI) -> None:
    odd = {
        "type": "object",
        "properties": {
            "n": {"type": "number", "minimum": 0.1, "maximum": 0.2, "multipleOf": 1},
            "m": {"allOf": [True, {"type": "integer"}]},
        },
        "required": ["n", "m"],
        "additionalProperties": False,
    }
    batch, output, errors = kit.run(client, [kit.chat_line("odd", **_chat_format(odd))], timeout=10)
    assert batch.status == "completed" and errors == []
    assert [line["custom_id"] for line in output] == ["odd"]
