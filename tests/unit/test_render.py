from __future__ import annotations

import orjson

from schemas.job import RequestSpec
from tasks.render import RequestRenderer, custom_id_for, strict_schema
from tasks.tokens import count_request_tokens, count_text, encoding_for_model


def test_custom_id_comes_from_the_id_value_not_the_position() -> None:
    assert custom_id_for("T-000123") == "r-T-000123"
    assert custom_id_for(42) == "r-42"
    long_id = "a very long id with spaces " * 5
    hashed = custom_id_for(long_id)
    assert hashed.startswith("h-") and len(hashed) <= 64 and hashed == custom_id_for(long_id)
    assert custom_id_for("x y") != custom_id_for("x_y")


def test_chat_body_with_schema_is_strict_and_line_matches_the_batch_format() -> None:
    spec = RequestSpec(
        model="gpt-4o-mini",
        system_prompt="Classify",
        template="{subject}: {body}",
        params={"max_tokens": 50},
        output_schema={
            "type": "object",
            "properties": {
                "a": {"type": "string"},
                "b": {"type": "object", "properties": {"c": {"type": "integer"}}},
            },
        },
    )
    renderer = RequestRenderer(spec)
    body = renderer.body({"subject": "Hi", "body": None})
    line = orjson.loads(renderer.line("r-1", body))
    assert (
        line["method"] == "POST"
        and line["url"] == "/v1/chat/completions"
        and line["custom_id"] == "r-1"
    )
    assert line["body"]["messages"] == [
        {"role": "system", "content": "Classify"},
        {"role": "user", "content": "Hi: "},
    ]
    schema = line["body"]["response_format"]["json_schema"]["schema"]
    assert schema["additionalProperties"] is False and schema["required"] == ["a", "b"]
    assert schema["properties"]["b"]["required"] == ["c"]
    assert line["body"]["max_tokens"] == 50 and "stream" not in line["body"]


def test_strict_schema_does_not_mutate_its_input() -> None:
    original = {"type": "object", "properties": {"x": {"type": "string"}}}
    strict_schema(original)
    assert "required" not in original


def test_responses_and_embeddings_bodies() -> None:
    responses = RequestRenderer(
        RequestSpec(
            endpoint="/v1/responses", model="gpt-5-mini", system_prompt="Be brief", template="{q}"
        )
    )
    assert responses.body({"q": "Why?"}) == {
        "model": "gpt-5-mini",
        "instructions": "Be brief",
        "input": "Why?",
    }
    embeddings = RequestRenderer(
        RequestSpec(
            endpoint="/v1/embeddings",
            model="text-embedding-3-small",
            template="{t}",
            params={"dimensions": 64},
        )
    )
    assert embeddings.body({"t": "lamp"}) == {
        "model": "text-embedding-3-small",
        "dimensions": 64,
        "input": "lamp",
    }


def test_token_rule_for_chat_counts_per_message_overhead() -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Hello world"},
            {"role": "user", "content": "Hello world"},
        ],
    }
    # 3 (reply primer) + 2 × (3 per message + 1 for the role + 2 for "Hello world")
    assert count_request_tokens("/v1/chat/completions", body) == 3 + 2 * (3 + 1 + 2)
    assert (
        count_request_tokens(
            "/v1/embeddings", {"model": "text-embedding-3-small", "input": "Hello world"}
        )
        == 2
    )
    o200k = encoding_for_model("gpt-4o-mini")

    def tokens(text: str) -> int:
        return count_text(o200k, text)

    named = {"model": "gpt-4o-mini", "messages": [{"role": "user", "name": "bob", "content": "Hi"}]}
    # 3 + (3 per message + role + name + 1 for the name + content)
    expected = 3 + 3 + tokens("user") + tokens("bob") + 1 + tokens("Hi")
    assert count_request_tokens("/v1/chat/completions", named) == expected
    responses = {"model": "gpt-4o-mini", "instructions": "Be brief.", "input": "Hello world"}
    # instructions count as a system message, the input as a user message
    expected = 3 + (3 + tokens("system") + tokens("Be brief.")) + (3 + tokens("user") + 2)
    assert count_request_tokens("/v1/responses", responses) == expected
