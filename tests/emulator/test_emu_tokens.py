"""The emulator's batch token count equals the pipeline's per-request rule exactly."""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson
import pytest

from emulator.config import EmulatorConfig
from emulator.tokens import PromptTokenCounter
from emulator.validation import validate_input
from tasks.tokens import count_distinct_texts, count_request_tokens, count_requests_tokens

SYSTEM = "You are terse. Answer in one word."


def _bodies(endpoint: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(300):
        text = f"Review {i}: {'loved it ' * (i % 7)}ünïcödé 日本語 😀 {i * 7919}"
        if endpoint == "/v1/embeddings":
            body: dict[str, Any] = {
                "model": "text-embedding-3-small" if i % 2 else "text-embedding-ada-002",
                "input": text if i % 3 else [text, SYSTEM, ""],
            }
        elif endpoint == "/v1/responses":
            body = {"model": "gpt-4o-mini", "input": text}
            if i % 2:
                body["instructions"] = SYSTEM
            if i % 5 == 0:
                body["input"] = [
                    {"role": "user", "content": [{"type": "input_text", "text": text}]},
                    {"role": "assistant", "content": "ok", "name": "bot"},
                ]
        else:
            body = {
                "model": "gpt-4o-mini" if i % 4 else "gpt-4",  # two encodings in one list
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": text, "name": f"user{i % 3}"},
                ],
            }
            if i % 6 == 0:
                body["messages"].append(
                    {"role": "user", "content": [{"type": "text", "text": text}, {"x": 1}]}
                )
        out.append(body)
    return out


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"])
@pytest.mark.parametrize("threads,chunk", [(1, 1024), (2, 16)])
def test_batch_count_equals_per_request_count(endpoint: str, threads: int, chunk: int) -> None:
    bodies = _bodies(endpoint)
    expected = [count_request_tokens(endpoint, body) for body in bodies]
    count = partial(count_distinct_texts, threads=threads, chunk=chunk)
    assert count_requests_tokens(endpoint, bodies, count_distinct=count) == expected
    assert count_requests_tokens(endpoint, bodies, threads=threads) == expected


def test_large_files_are_counted_in_helper_processes_with_the_same_result() -> None:
    endpoint = "/v1/chat/completions"
    bodies = _bodies(endpoint)
    counter = PromptTokenCounter(min_lines=100, processes=1)
    try:
        assert counter.count(endpoint, bodies[:99]) == [
            count_request_tokens(endpoint, body) for body in bodies[:99]
        ]
        assert counter._pool is None  # small files: no helper
        assert counter.count(endpoint, bodies) == [
            count_request_tokens(endpoint, body) for body in bodies
        ]
        assert counter._pool is not None
    finally:
        counter.close()
    assert counter._pool is None


def test_lone_surrogates_are_counted_as_tiktoken_counts_them() -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a\ud800b"}]}
    endpoint = "/v1/chat/completions"
    assert count_requests_tokens(endpoint, [body]) == [count_request_tokens(endpoint, body)]
    assert count_requests_tokens(endpoint, []) == []


def test_validation_counts_large_files_in_the_helpers_as_it_counts_small_ones() -> None:
    endpoint = "/v1/chat/completions"
    bodies = [body | {"model": "gpt-4o-mini"} for body in _bodies(endpoint)]  # one model a file
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": endpoint, "body": body}
        for i, body in enumerate(bodies)
    ]
    data = b"\n\n".join(orjson.dumps(line) for line in lines) + b"\n"  # blank lines too
    config = EmulatorConfig()
    counter = PromptTokenCounter(processes=1, min_bytes=1000, chunk_bytes=3000)
    try:
        pending = counter.start_file(endpoint, data)
        assert pending is not None and len(pending()) == len(lines)
        helped = validate_input(data, endpoint, config, counter)
        bad = validate_input(data + b"not json\n", endpoint, config, counter)
    finally:
        counter.close()
    assert helped.prompt_tokens == [count_request_tokens(endpoint, body) for body in bodies]
    assert helped.prompt_tokens == validate_input(data, endpoint, config).prompt_tokens
    assert bad.errors and not bad.prompt_tokens
