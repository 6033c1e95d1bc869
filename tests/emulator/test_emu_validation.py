"""Input validation: a bad input file makes the batch `failed` with one errors.data entry per bad line."""

from __future__ import annotations

import json

from openai import OpenAI


def _failed(kit, client: OpenAI, lines: list, endpoint: str = "/v1/chat/completions"):
    batch, output, errors = kit.run(client, lines, endpoint)
    assert batch.status == "failed"
    assert batch.failed_at is not None and batch.failed_at >= batch.created_at
    assert batch.in_progress_at is None
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (0, 0)
    assert batch.request_counts.failed == 0
    assert (batch.output_file_id, batch.error_file_id) == (None, None)
    assert batch.errors is not None and batch.errors.object == "list"
    return [e.model_dump() for e in batch.errors.data or []]


def test_every_bad_line_is_reported(kit, client: OpenAI) -> None:
    good = kit.chat_line
    lines = [
        good("ok-1"),
        "this is not json",
        {"method": "POST", "url": "/v1/chat/completions", "body": good("x")["body"]},
        {"custom_id": "m", "url": "/v1/chat/completions", "body": good("x")["body"]},
        {"custom_id": "u", "method": "POST", "body": good("x")["body"]},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"},
        {**good("wrong-url"), "url": "/v1/embeddings"},
        good("streamed", stream=True),
        good("unknown-model", model="nonexistent-model-xyz"),
        good("ok-1"),
        good("other-model", model="gpt-4o"),
        {**good("no-messages"), "body": {"model": "gpt-4o-mini"}},
        {**good("no-model"), "body": {"messages": [{"role": "user", "content": "x"}]}},
        good("ok-2"),
    ]
    errors = _failed(kit, client, lines)
    assert errors == [
        {
            "code": "invalid_json_line",
            "message": "This line is not parseable as valid JSON.",
            "param": None,
            "line": 2,
        },
        {
            "code": "missing_required_parameter",
            "message": "Missing required parameter: 'custom_id'.",
            "param": "custom_id",
            "line": 3,
        },
        {
            "code": "missing_required_parameter",
            "message": "Missing required parameter: 'method'.",
            "param": "method",
            "line": 4,
        },
        {
            "code": "missing_required_parameter",
            "message": "Missing required parameter: 'url'.",
            "param": "url",
            "line": 5,
        },
        {
            "code": "missing_required_parameter",
            "message": "Missing required parameter: 'body'.",
            "param": "body",
            "line": 6,
        },
        {
            "code": "invalid_url",
            "message": "The URL provided for this request does not match the batch endpoint.",
            "param": "url",
            "line": 7,
        },
        {
            "code": "streaming_unsupported",
            "message": "Chat Completions: Streaming is not supported in the Batch API.",
            "param": "body.stream",
            "line": 8,
        },
        {
            "code": "model_not_found",
            "message": "The provided model 'nonexistent-model-xyz' is not supported by the Batch API.",
            "param": "body.model",
            "line": 9,
        },
        {
            "code": "duplicate_custom_id",
            "message": "The custom_id 'ok-1' for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch.",
            "param": "custom_id",
            "line": 10,
        },
        {
            "code": "mismatched_model",
            "message": "The model 'gpt-4o' for this request does not match the rest of the batch. "
            "Each batch must contain requests for a single model.",
            "param": "body.model",
            "line": 11,
        },
        {
            "code": "invalid_request",
            "message": "Messages parameter is required.",
            "param": "body.messages",
            "line": 12,
        },
        {
            "code": "invalid_request",
            "message": "Model parameter is required.",
            "param": "body.model",
            "line": 13,
        },
    ]


def test_empty_file(kit, client: OpenAI) -> None:
    errors = _failed(kit, client, [])
    assert [(e["code"], e["line"], e["param"]) for e in errors] == [("empty_file", None, None)]


def test_blank_lines_are_skipped_but_counted(kit, client: OpenAI) -> None:
    data = b"\n" + json.dumps(kit.chat_line("a")).encode() + b"\n\n{oops\n"
    file_id = client.files.create(file=("x.jsonl", data), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = kit.wait(client, batch.id)
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("invalid_json_line", 4)]


def test_too_many_lines(kit) -> None:
    client = kit.client(kit.server(max_requests_per_batch=5))
    assert kit.run(client, [kit.chat_line(f"r{i}") for i in range(5)])[0].status == "completed"
    errors = _failed(kit, client, [kit.chat_line(f"r{i}") for i in range(6)])
    assert len(errors) == 1
    assert errors[0]["code"] == "too_many_tasks"
    assert errors[0]["line"] is None
    assert "maximum is 5 requests per batch" in errors[0]["message"]


def test_default_line_limit_is_50000(emu) -> None:
    assert emu.config.max_requests_per_batch == 50_000


def test_too_many_embedding_inputs(kit) -> None:
    client = kit.client(kit.server(max_embedding_inputs_per_batch=4))
    lines = [kit.embedding_line("a", ["x", "y", "z"]), kit.embedding_line("b", ["u", "v"])]
    errors = _failed(kit, client, lines, "/v1/embeddings")
    assert [(e["code"], e["line"]) for e in errors] == [("too_many_tasks", None)]


def test_streaming_message_names_the_endpoint(kit, client: OpenAI) -> None:
    errors = _failed(kit, client, [kit.responses_line("r", stream=True)], "/v1/responses")
    assert errors[0]["message"] == "Responses: Streaming is not supported in the Batch API."


def test_input_deleted_before_validation_fails_the_batch(kit) -> None:
    client = kit.client(kit.server(validating_seconds=120))
    batch = kit.submit(client, [kit.chat_line("a")])
    client.files.delete(batch.input_file_id)
    batch = kit.wait(client, batch.id)
    assert batch.status == "failed"
    assert batch.errors is not None
    error = batch.errors.data[0]
    assert (error.code, error.param, error.line) == ("invalid_request", "file_id", None)
    assert error.message.startswith(f"Cannot find file {batch.input_file_id}")
