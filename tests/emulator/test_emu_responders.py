"""Deterministic responders: schema-valid structured output, text, embeddings, usage and truncation."""

from __future__ import annotations

import base64
import json
import math
import re
import struct

import jsonschema
from openai import OpenAI

from tasks.tokens import count_request_tokens, count_text, encoding_for_model

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "is_spam": {"type": "boolean"},
        "summary": {"type": ["string", "null"], "maxLength": 40},
        "published": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "author": {"$ref": "#/$defs/person"},
        "reviewer": {"anyOf": [{"$ref": "#/$defs/person"}, {"type": "null"}]},
        "kind": {"const": "review"},
    },
    "required": [
        "sentiment",
        "score",
        "stars",
        "is_spam",
        "summary",
        "published",
        "tags",
        "author",
        "reviewer",
        "kind",
    ],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": ["integer", "null"]}},
            "required": ["name", "age"],
            "additionalProperties": False,
        }
    },
}


def _by_id(lines: list[dict]) -> dict[str, dict]:
    return {line["custom_id"]: line for line in lines}


def _chat_schema_body() -> dict:
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "review", "schema": SCHEMA, "strict": True},
        }
    }


def test_chat_structured_output_validates_against_the_schema(kit, client: OpenAI) -> None:
    lines = [
        kit.chat_line(f"r{i}", f"Review number {i}: great product", **_chat_schema_body())
        for i in range(40)
    ]
    batch, output, errors = kit.run(client, lines)
    assert batch.status == "completed" and errors == []
    values = []
    for line in output:
        content = line["response"]["body"]["choices"][0]["message"]["content"]
        value = json.loads(content)
        jsonschema.validate(value, SCHEMA)
        values.append(value)
        usage = line["response"]["body"]["usage"]
        assert usage["completion_tokens"] == count_text(encoding_for_model("gpt-4o-mini"), content)
    # values vary between lines (enum picks, nulls and non-nulls)
    assert len({v["sentiment"] for v in values}) > 1
    assert any(v["summary"] is None for v in values)
    assert any(v["summary"] is not None for v in values)
    assert all(v["kind"] == "review" for v in values)

    # same request body, same answer, also in another batch
    _, again, _ = kit.run(client, lines[:5])
    first = _by_id(output)
    for line in again:
        old = first[line["custom_id"]]["response"]["body"]["choices"][0]["message"]["content"]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == old


def test_responses_structured_output_and_body_shape(kit, client: OpenAI) -> None:
    fmt = {"type": "json_schema", "name": "review", "schema": SCHEMA, "strict": True}
    lines = [
        kit.responses_line(
            f"q{i}", f"Classify text {i}", text={"format": fmt}, instructions="Be brief"
        )
        for i in range(10)
    ]
    batch, output, _ = kit.run(client, lines, "/v1/responses")
    assert batch.status == "completed" and len(output) == 10
    request = _by_id([dict(line, custom_id=line["custom_id"]) for line in lines])
    for line in output:
        body = line["response"]["body"]
        assert body["object"] == "response"
        assert re.fullmatch(r"resp_[0-9a-f]{48}", body["id"])
        assert body["status"] == "completed"
        assert body["model"] == "gpt-4.1-mini"
        assert isinstance(body["created_at"], int)
        [message] = body["output"]
        assert message["type"] == "message" and message["role"] == "assistant"
        assert message["status"] == "completed" and message["id"].startswith("msg_")
        [part] = message["content"]
        assert part["type"] == "output_text" and part["annotations"] == []
        jsonschema.validate(json.loads(part["text"]), SCHEMA)
        usage = body["usage"]
        expected = count_request_tokens("/v1/responses", request[line["custom_id"]]["body"])
        assert usage["input_tokens"] == expected
        assert usage["input_tokens_details"] == {"cached_tokens": 0}
        assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
        assert usage["output_tokens"] == count_text(
            encoding_for_model("gpt-4.1-mini"), part["text"]
        )
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_plain_text_is_derived_from_the_input(kit, client: OpenAI) -> None:
    line = kit.chat_line("t", "zebra giraffe elephant walrus")
    _, [out], _ = kit.run(client, [line])
    content = out["response"]["body"]["choices"][0]["message"]["content"]
    assert content.startswith("Emulated reply: ")
    words = set(re.findall(r"\w+", content.removeprefix("Emulated reply: ")))
    assert words <= {"zebra", "giraffe", "elephant", "walrus"}


def test_reasoning_models_report_reasoning_tokens(kit, client: OpenAI) -> None:
    lines = [kit.chat_line(f"c{i}", f"Think about {i}", model="gpt-5-mini") for i in range(5)]
    _, output, _ = kit.run(client, lines)
    encoding = encoding_for_model("gpt-5-mini")
    for line in output:
        body = line["response"]["body"]
        usage = body["usage"]
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        assert 64 <= reasoning <= 256
        content = body["choices"][0]["message"]["content"]
        assert usage["completion_tokens"] == count_text(encoding, content) + reasoning

    resp_lines = [kit.responses_line(f"r{i}", f"Plan {i}", model="o4-mini") for i in range(3)]
    _, output, _ = kit.run(client, resp_lines, "/v1/responses")
    for line in output:
        body = line["response"]["body"]
        assert [item["type"] for item in body["output"]] == ["reasoning", "message"]
        reasoning = body["usage"]["output_tokens_details"]["reasoning_tokens"]
        text = body["output"][1]["content"][0]["text"]
        assert body["usage"]["output_tokens"] == count_text(encoding, text) + reasoning > reasoning

    minimal = kit.chat_line("m", "Quick", model="gpt-5-nano", reasoning_effort="minimal")
    _, [line], _ = kit.run(client, [minimal])
    assert line["response"]["body"]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_max_tokens_truncates_with_finish_reason_length(kit, client: OpenAI) -> None:
    lines = [
        kit.chat_line("short", "tell me a long story about many things", max_tokens=3),
        kit.chat_line("newer", "tell me a long story about many things", max_completion_tokens=4),
        kit.chat_line("roomy", "tell me a long story about many things", max_tokens=500),
    ]
    _, output, _ = kit.run(client, lines)
    lines_by_id = _by_id(output)
    for custom_id, limit in (("short", 3), ("newer", 4)):
        body = lines_by_id[custom_id]["response"]["body"]
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] <= limit
        content = body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == count_text(
            encoding_for_model("gpt-4o-mini"), content
        )
    assert lines_by_id["roomy"]["response"]["body"]["choices"][0]["finish_reason"] == "stop"

    limited = kit.responses_line("r", "write an essay", model="gpt-5-mini", max_output_tokens=10)
    _, [line], _ = kit.run(client, [limited], "/v1/responses")
    body = line["response"]["body"]
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 10  # the reasoning budget used it all
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == 10


def test_cached_tokens_for_long_prompts(kit) -> None:
    server = kit.server(cached_token_fraction=0.5)
    client = kit.client(server)
    long_text = " ".join(f"word{i}" for i in range(1500))
    lines = [kit.chat_line("long", long_text), kit.chat_line("short", "tiny prompt")]
    _, output, _ = kit.run(client, lines)
    usage = {line["custom_id"]: line["response"]["body"]["usage"] for line in output}
    prompt = usage["long"]["prompt_tokens"]
    assert prompt == count_request_tokens("/v1/chat/completions", lines[0]["body"]) >= 1024
    assert usage["long"]["prompt_tokens_details"]["cached_tokens"] == prompt // 2 // 128 * 128
    assert usage["short"]["prompt_tokens_details"]["cached_tokens"] == 0
    billed = server.stats()["usage"]["gpt-4o-mini"]
    assert billed["cached_tokens"] == prompt // 2 // 128 * 128


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def test_embeddings(kit, client: OpenAI) -> None:
    lines = [
        kit.embedding_line("one", "the same text"),
        kit.embedding_line("list", ["the same text", "another text"]),
        kit.embedding_line("small-dims", "the same text", dimensions=256),
        kit.embedding_line("b64", "the same text", encoding_format="base64"),
    ]
    batch, output, errors = kit.run(client, lines, "/v1/embeddings")
    assert batch.status == "completed" and errors == []
    by_id = {line["custom_id"]: line["response"]["body"] for line in output}

    one = by_id["one"]
    assert one["object"] == "list" and one["model"] == "text-embedding-3-small"
    [item] = one["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 1536
    assert abs(_norm(item["embedding"]) - 1) < 1e-5
    assert one["usage"] == {
        "prompt_tokens": count_request_tokens("/v1/embeddings", lines[0]["body"]),
        "total_tokens": count_request_tokens("/v1/embeddings", lines[0]["body"]),
    }

    listed = by_id["list"]["data"]
    assert [d["index"] for d in listed] == [0, 1]
    assert listed[0]["embedding"] == item["embedding"]  # same text, same vector
    assert listed[1]["embedding"] != item["embedding"]
    assert by_id["list"]["usage"]["prompt_tokens"] == count_request_tokens(
        "/v1/embeddings", lines[1]["body"]
    )

    # one model per file: the large model goes in its own batch
    large = kit.embedding_line("large", "the same text", model="text-embedding-3-large")
    _, [line], _ = kit.run(client, [large], "/v1/embeddings")
    assert len(line["response"]["body"]["data"][0]["embedding"]) == 3072
    assert len(by_id["small-dims"]["data"][0]["embedding"]) == 256
    raw = base64.b64decode(by_id["b64"]["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == 1536
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, item["embedding"], strict=True))


def test_context_limits_give_400_lines(kit) -> None:
    client = kit.client(kit.server(context_window_tokens=50))
    lines = [
        kit.chat_line("big", " ".join(["token"] * 100)),
        kit.chat_line("fits", "hello"),
    ]
    batch, output, errors = kit.run(client, lines)
    assert batch.status == "completed"
    assert [line["custom_id"] for line in output] == ["fits"]
    [error] = errors
    assert error["error"] is None
    assert error["response"]["status_code"] == 400
    body_error = error["response"]["body"]["error"]
    assert body_error["code"] == "context_length_exceeded"
    assert body_error["type"] == "invalid_request_error"
    assert body_error["param"] == "messages"
    assert "maximum context length is 50 tokens" in body_error["message"]

    embed = kit.embedding_line("huge", " ".join(["token"] * 9000))
    batch, output, errors = kit.run(client, [embed], "/v1/embeddings")
    assert output == [] and batch.output_file_id is None
    assert errors[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"
