"""Deterministic stand-ins for the models behind /v1/chat/completions, /v1/responses and /v1/embeddings.

Content is a pure function of the request body (same body, same answer, in any batch): JSON that validates
against the request's JSON schema when one is given, else text built from the words of the input. Usage
follows `tasks.tokens` exactly: prompt/input tokens are `count_request_tokens(endpoint, body)`, completion
tokens are the tokens of the generated text plus, for reasoning models, a deterministic number of reasoning
tokens.
"""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
import tiktoken

from emulator.config import EmulatorConfig
from emulator.ids import LineIds, hex_id, seed_int, seed_of_bytes
from emulator.schema_check import schema_problem
from emulator.schema_gen import SchemaGenerator
from tasks.tokens import (
    count_text,
    embedding_inputs,
    encoding_for_model,
    responses_messages,
)

EMBEDDING_MAX_INPUT_TOKENS = 8192
_FALLBACK_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "emulated",
    "answer",
    "batch",
    "result",
    "value",
    "item",
    "record",
    "summary",
    "detail",
    "signal",
    "note",
]
# Replies draw their words from the start of each input text: enough words for variety, at a cost that
# does not grow with the prompt.
WORDS_PREFIX_CHARS = 256
_WORD = re.compile(r"[^\W_]+")
_short_text_words: dict[str, list[str]] = {}
_EFFORT_FACTOR = {"none": 0.0, "minimal": 0.0, "low": 0.5, "medium": 1.0, "high": 2.0, "xhigh": 3.0}


@dataclass(frozen=True)
class LineContext:
    """What a responder may know besides the body: the line's ids, its finishing time, the config."""

    ids: LineIds
    created: int
    config: EmulatorConfig


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    usage: dict[str, int] | None = None  # billed usage, successful replies only


def http_error(status: int, message: str, type: str, param: str | None, code: str | None) -> Reply:
    return Reply(
        status, {"error": {"message": message, "type": type, "param": param, "code": code}}
    )


def context_length_error(endpoint: str, prompt_tokens: int, window: int) -> Reply:
    if endpoint == "/v1/embeddings":
        message = (
            f"This model's maximum context length is {window} tokens, however you requested "
            f"{prompt_tokens} tokens ({prompt_tokens} in your prompt; 0 for the completion). "
            "Please reduce your prompt; or completion length."
        )
    else:
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
        )
    param = "messages" if endpoint == "/v1/chat/completions" else "input"
    return http_error(400, message, "invalid_request_error", param, "context_length_exceeded")


def invalid_schema(fmt: dict[str, Any] | None, spec: dict[str, Any], param: str) -> Reply | None:
    """A 400 line for a `json_schema` format (its name, schema and strict flag in `spec`) whose schema
    OpenAI would refuse, else None."""
    if fmt is None or fmt.get("type") != "json_schema" or spec.get("schema") is None:
        return None
    problem = schema_problem(spec["schema"], spec.get("strict") is True)
    if problem is None:
        return None
    message = f"Invalid schema for response_format '{spec.get('name')}': {problem}"
    return http_error(400, message, "invalid_request_error", param, "invalid_json_schema")


def respond(endpoint: str, body: dict[str, Any], prompt_tokens: int, ctx: LineContext) -> Reply:
    if endpoint == "/v1/embeddings":
        return embeddings(body, prompt_tokens, ctx)
    if prompt_tokens > ctx.config.context_window_tokens:
        return context_length_error(endpoint, prompt_tokens, ctx.config.context_window_tokens)
    if endpoint == "/v1/responses":
        return responses(body, prompt_tokens, ctx)
    return chat_completion(body, prompt_tokens, ctx)


# shared pieces


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _canonical(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def _text_words(text: str) -> list[str]:
    """The words of a text's first WORDS_PREFIX_CHARS characters (whole words only)."""
    if len(text) > WORDS_PREFIX_CHARS:
        words = _WORD.findall(text, 0, WORDS_PREFIX_CHARS)
        cut = WORDS_PREFIX_CHARS
        if words and _WORD.match(text, cut) and _WORD.match(text, cut - 1):  # the last word is cut
            words.pop()
        return words
    found = _short_text_words.get(text)  # short texts, such as a system prompt, often repeat
    if found is None:
        if len(_short_text_words) >= 4096:
            _short_text_words.clear()
        found = _short_text_words[text] = _WORD.findall(text)
    return found


def _words(messages: list[dict[str, Any]]) -> list[str]:
    words: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            words += _text_words(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    words += _text_words(str(part.get("text", "")))
    return words if len(words) >= 3 else words + _FALLBACK_WORDS


def _content(fmt: dict[str, Any] | None, schema: Any, words: list[str], rng: random.Random) -> str:
    """The reply text: schema-valid JSON, a JSON object (json_object mode) or plain text."""
    if fmt is not None and fmt.get("type") == "json_schema" and isinstance(schema, dict):
        value = SchemaGenerator(schema, rng, words).generate()
        return orjson.dumps(value).decode()
    if fmt is not None and fmt.get("type") == "json_object":
        return orjson.dumps({"answer": " ".join(rng.choice(words) for _ in range(6))}).decode()
    picked = [rng.choice(words) for _ in range(rng.randint(8, 40))]
    return "Emulated reply: " + " ".join(picked) + "."


def _reasoning_tokens(model: str, effort: Any, canonical: bytes, cfg: EmulatorConfig) -> int:
    if not _reasons(model, tuple(cfg.reasoning_model_prefixes)):
        return 0
    factor = _EFFORT_FACTOR.get(str(effort), 1.0) if effort is not None else 1.0
    rng = random.Random(seed_of_bytes("reasoning", canonical))
    return int(rng.randint(cfg.reasoning_tokens_min, cfg.reasoning_tokens_max) * factor)


@lru_cache(maxsize=256)
def _reasons(model: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `model` is a reasoning model."""
    return model.startswith(prefixes)


@lru_cache(maxsize=256)
def _encoding(model: str) -> tiktoken.Encoding:
    return encoding_for_model(model)


@lru_cache(maxsize=256)
def _fingerprint(model: str) -> str:
    return "fp_" + hex_id("fingerprint", model, length=10)


def _cached_tokens(prompt_tokens: int, cfg: EmulatorConfig) -> int:
    if cfg.cached_token_fraction <= 0 or prompt_tokens < cfg.cached_token_min_prompt:
        return 0
    return int(prompt_tokens * cfg.cached_token_fraction) // 128 * 128


@dataclass
class _Generation:
    text: str
    text_tokens: int
    reasoning_tokens: int
    truncated: bool


def _generate(model: str, text: str, reasoning: int, limit: Any) -> _Generation:
    """Apply the completion-token limit: reasoning first, then as much text as fits."""
    encoding = _encoding(model)
    tokens = encoding.encode_ordinary(text)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return _Generation(text, len(tokens), reasoning, False)
    reasoning = min(reasoning, max(limit, 0))
    room = max(limit - reasoning, 0)
    if len(tokens) <= room:
        return _Generation(text, len(tokens), reasoning, False)
    cut = encoding.decode(tokens[:room])
    while cut and count_text(encoding, cut) > room:
        cut = cut[:-1]
    return _Generation(cut, count_text(encoding, cut), reasoning, True)


def _billed(prompt: int, cached: int, output: int, reasoning: int) -> dict[str, int]:
    return {
        "requests": 1,
        "input_tokens": prompt,
        "cached_tokens": cached,
        "output_tokens": output,
        "reasoning_tokens": reasoning,
    }


# endpoints


def chat_completion(body: dict[str, Any], prompt_tokens: int, ctx: LineContext) -> Reply:
    model = body["model"]
    cfg = ctx.config
    canonical = _canonical(body)
    rng = random.Random(seed_of_bytes("content", canonical))
    fmt = _obj(body.get("response_format")) or None
    spec = _obj((fmt or {}).get("json_schema"))
    if (refused := invalid_schema(fmt, spec, "response_format")) is not None:
        return refused
    schema = spec.get("schema")
    text = _content(fmt, schema, _words(body.get("messages") or []), rng)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    reasoning = _reasoning_tokens(model, body.get("reasoning_effort"), canonical, cfg)
    gen = _generate(model, text, reasoning, limit)
    cached = _cached_tokens(prompt_tokens, cfg)
    completion = gen.text_tokens + gen.reasoning_tokens
    reply = {
        "id": "chatcmpl-" + ctx.ids.base62(29),
        "object": "chat.completion",
        "created": ctx.created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text, "refusal": None},
                "logprobs": None,
                "finish_reason": "length" if gen.truncated else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": gen.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": _fingerprint(model),
    }
    return Reply(200, reply, _billed(prompt_tokens, cached, completion, gen.reasoning_tokens))


def responses(body: dict[str, Any], prompt_tokens: int, ctx: LineContext) -> Reply:
    model = body["model"]
    cfg = ctx.config
    canonical = _canonical(body)
    rng = random.Random(seed_of_bytes("content", canonical))
    fmt = _obj(_obj(body.get("text")).get("format")) or None
    if (refused := invalid_schema(fmt, fmt or {}, "text.format.schema")) is not None:
        return refused
    schema = fmt.get("schema") if fmt else None
    text = _content(fmt, schema, _words(responses_messages(body)), rng)
    effort = _obj(body.get("reasoning")).get("effort")
    reasoning = _reasoning_tokens(model, effort, canonical, cfg)
    gen = _generate(model, text, reasoning, body.get("max_output_tokens"))
    cached = _cached_tokens(prompt_tokens, cfg)
    output_tokens = gen.text_tokens + gen.reasoning_tokens
    output: list[dict[str, Any]] = []
    if _reasons(model, tuple(cfg.reasoning_model_prefixes)):
        output.append(
            {
                "type": "reasoning",
                "id": "rs_" + ctx.ids.hex48("rs"),
                "summary": [],
            }
        )
    output.append(
        {
            "type": "message",
            "id": "msg_" + ctx.ids.hex48("msg"),
            "status": "incomplete" if gen.truncated else "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": gen.text, "annotations": []}],
        }
    )
    reply = {
        "id": "resp_" + ctx.ids.hex48("resp"),
        "object": "response",
        "created_at": ctx.created,
        "status": "incomplete" if gen.truncated else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if gen.truncated else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "text": {"format": fmt or {"type": "text"}},
        "usage": {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": gen.reasoning_tokens},
            "total_tokens": prompt_tokens + output_tokens,
        },
    }
    return Reply(200, reply, _billed(prompt_tokens, cached, output_tokens, gen.reasoning_tokens))


def default_dimensions(model: str) -> int:
    return 3072 if "3-large" in model else 1536


def embedding_vector(model: str, dimensions: int, text: str) -> np.ndarray:
    """A unit vector seeded from the text (and model and size): same text, same vector."""
    rng = np.random.default_rng(seed_int("embedding", model, dimensions, text))
    vector = rng.standard_normal(dimensions)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def embeddings(body: dict[str, Any], prompt_tokens: int, ctx: LineContext) -> Reply:
    model = body["model"]
    encoding = encoding_for_model(model)
    texts = embedding_inputs(body)
    for text in texts:
        tokens = count_text(encoding, text)
        if tokens > EMBEDDING_MAX_INPUT_TOKENS:
            return context_length_error("/v1/embeddings", tokens, EMBEDDING_MAX_INPUT_TOKENS)
    dims = body.get("dimensions")
    dimensions = dims if isinstance(dims, int) and dims > 0 else default_dimensions(model)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(texts):
        vector = embedding_vector(model, dimensions, text)
        embedding: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    reply = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return Reply(200, reply, _billed(prompt_tokens, 0, 0, 0))
