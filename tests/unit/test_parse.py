"""Classifying output and error lines exactly as the real Batch API writes them."""

from __future__ import annotations

import orjson
import pytest

from schemas.job import RequestSpec
from tasks.parse import LineParser

SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "other"]},
        "priority": {"type": "integer"},
        "score": {"type": "number"},
        "urgent": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}
CHAT = RequestSpec(model="gpt-4o-mini", template="{t}", output_schema=SCHEMA)


def chat_line(content: str, finish: str = "stop") -> dict:
    return {
        "id": "batch_req_1",
        "custom_id": "r-1",
        "response": {
            "status_code": 200,
            "request_id": "req",
            "body": {
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": 300,
                    "completion_tokens": 20,
                    "total_tokens": 320,
                    "prompt_tokens_details": {"cached_tokens": 256},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
            },
        },
        "error": None,
    }


def test_structured_chat_output_becomes_typed_columns() -> None:
    content = orjson.dumps(
        {"category": "billing", "priority": 2, "score": 1, "urgent": True, "tags": ["a"]}
    ).decode()
    kind, row = LineParser(CHAT, 1, "batch_x").parse(chat_line(content))
    assert kind == "result"
    assert row["category"] == "billing" and row["priority"] == 2 and row["score"] == 1.0
    assert row["urgent"] is True and row["tags"] == ["a"]
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == (300, 256, 20)
    assert row["model"] == "gpt-4o-mini-2024-07-18" and row["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"category": "billing"', "not valid JSON"),
        (
            '{"category": "billing", "priority": "high", "score": 1, "urgent": true, "tags": []}',
            "'priority'",
        ),
        ('{"category": "billing"}', "lacks"),
    ],
)
def test_output_that_does_not_validate_is_a_billed_permanent_error(
    content: str, reason: str
) -> None:
    kind, row = LineParser(CHAT, 1, "batch_x").parse(chat_line(content, finish="length"))
    assert kind == "error"
    assert row["code"] == "invalid_output" and row["retryable"] is False and row["billed"] is True
    assert reason in row["message"]
    assert row["input_tokens"] == 300  # the model answered: the line is paid for


def test_http_error_lines_have_error_null_and_details_in_the_body() -> None:
    line = {
        "custom_id": "r-5",
        "response": {
            "status_code": 400,
            "request_id": "x",
            "body": {
                "error": {
                    "message": "too long",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
        },
        "error": None,
    }
    kind, row = LineParser(CHAT, 2, "b").parse(line)
    assert kind == "error"
    assert (row["kind"], row["status_code"], row["code"], row["retryable"], row["billed"]) == (
        "http", 400, "context_length_exceeded", False, False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (429, "rate_limit_exceeded", True),
        (429, "insufficient_quota", False),
        (500, "server_error", True),
        (503, None, True),
    ],
)
def test_http_retryability(status: int, code: str | None, retryable: bool) -> None:
    line = {
        "custom_id": "r",
        "response": {"status_code": status, "body": {"error": {"code": code, "message": "m"}}},
        "error": None,
    }
    assert LineParser(CHAT, 1, "b").parse(line)[1]["retryable"] is retryable


@pytest.mark.parametrize("code", ["batch_expired", "batch_cancelled", "request_timeout"])
def test_non_http_failures_are_retryable(code: str) -> None:
    line = {"custom_id": "r-1", "response": None, "error": {"code": code, "message": "m"}}
    kind, row = LineParser(CHAT, 1, "b").parse(line)
    assert (
        kind == "error" and row["kind"] == "non_http" and row["code"] == code and row["retryable"]
    )


def test_embeddings_and_responses_shapes() -> None:
    emb = RequestSpec(endpoint="/v1/embeddings", model="text-embedding-3-small", template="{t}")
    line = {
        "custom_id": "r-1",
        "response": {
            "status_code": 200,
            "body": {
                "data": [{"embedding": [0.5, -0.5]}],
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 7, "total_tokens": 7},
            },
        },
        "error": None,
    }
    kind, row = LineParser(emb, 1, "b").parse(line)
    assert (
        kind == "result"
        and row["embedding"] == [0.5, -0.5]
        and row["input_tokens"] == 7
        and row["output_tokens"] == 0
    )

    resp = RequestSpec(endpoint="/v1/responses", model="gpt-5-mini", template="{t}")
    body = {
        "status": "completed",
        "model": "gpt-5-mini",
        "output": [
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "content": [
                    {"type": "output_text", "text": "Hello"},
                    {"type": "output_text", "text": " there"},
                ],
            },
        ],
        "usage": {
            "input_tokens": 40,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 30,
            "output_tokens_details": {"reasoning_tokens": 25},
        },
    }
    kind, row = LineParser(resp, 1, "b").parse(
        {"custom_id": "r-2", "response": {"status_code": 200, "body": body}, "error": None}
    )
    assert (
        kind == "result"
        and row["response_text"] == "Hello there"
        and row["finish_reason"] == "stop"
    )
    assert (row["output_tokens"], row["reasoning_tokens"]) == (30, 25)
