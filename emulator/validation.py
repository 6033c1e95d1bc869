"""Validation of a batch input file, as done while the batch is `validating`.

Every bad line gets one `BatchError` (`{code, message, param, line}`, 1-based line, the first problem found
on that line); whole-file problems (empty file, too many requests or embedding inputs) get one entry with
`line: null`. Blank lines are skipped but still counted in line numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from emulator.config import EmulatorConfig
from emulator.tokens import PromptTokenCounter
from tasks.tokens import count_requests_tokens, embedding_inputs

ENDPOINT_NAMES = {
    "/v1/chat/completions": "Chat Completions",
    "/v1/responses": "Responses",
    "/v1/embeddings": "Embeddings",
}
_REQUIRED_BODY_FIELD = {
    "/v1/chat/completions": ("messages", "Messages"),
    "/v1/responses": ("input", "Input"),
    "/v1/embeddings": ("input", "Input"),
}


@dataclass
class InputLine:
    custom_id: str
    body: dict[str, Any]


@dataclass
class Validation:
    lines: list[InputLine] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    prompt_tokens: list[int] = field(default_factory=list)

    @property
    def input_tokens(self) -> int:
        return sum(self.prompt_tokens)


def batch_error(
    code: str, message: str, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def model_supported(model: str, config: EmulatorConfig) -> bool:
    return any(model == known or model.startswith(known + "-") for known in config.models)


def _raw_lines(data: bytes) -> list[tuple[int, bytes]]:
    return [(n, raw) for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]


def _check_line(
    raw: bytes, endpoint: str, config: EmulatorConfig, supported: dict[str, bool]
) -> tuple[InputLine | None, dict[str, Any] | None]:
    """(the parsed line, None) or (None, an error without its line number)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return None, batch_error("invalid_json_line", "This line is not parseable as valid JSON.")
    for name in ("custom_id", "method", "url", "body"):
        if obj.get(name) is None:
            return None, batch_error(
                "missing_required_parameter", f"Missing required parameter: '{name}'.", name
            )
    if not isinstance(obj["custom_id"], str):
        return None, batch_error(
            "invalid_type", "Invalid type for 'custom_id': expected a string.", "custom_id"
        )
    if obj["method"] != "POST":
        return None, batch_error(
            "invalid_value",
            f"Invalid value: '{obj['method']}'. Supported values are: 'POST'.",
            "method",
        )
    if obj["url"] != endpoint:
        return None, batch_error(
            "invalid_url",
            "The URL provided for this request does not match the batch endpoint.",
            "url",
        )
    body = obj["body"]
    if not isinstance(body, dict):
        return None, batch_error(
            "invalid_type", "Invalid type for 'body': expected an object.", "body"
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None, batch_error("invalid_request", "Model parameter is required.", "body.model")
    if body.get("stream"):
        return None, batch_error(
            "streaming_unsupported",
            f"{ENDPOINT_NAMES[endpoint]}: Streaming is not supported in the Batch API.",
            "body.stream",
        )
    known = supported.get(model)
    if known is None:
        known = supported[model] = model_supported(model, config)
    if not known:
        return None, batch_error(
            "model_not_found",
            f"The provided model '{model}' is not supported by the Batch API.",
            "body.model",
        )
    name, title = _REQUIRED_BODY_FIELD[endpoint]
    if body.get(name) in (None, "", []):
        return None, batch_error(
            "invalid_request", f"{title} parameter is required.", f"body.{name}"
        )
    return InputLine(obj["custom_id"], body), None


def _cross_check(line: InputLine, seen: set[str], model: str | None) -> dict[str, Any] | None:
    """Problems between lines: a repeated custom_id, a second model."""
    if line.custom_id in seen:
        return batch_error(
            "duplicate_custom_id",
            f"The custom_id '{line.custom_id}' for this request is a duplicate of another "
            "request. The custom_id parameter must be unique for each request in a batch.",
            "custom_id",
        )
    if model is not None and line.body["model"] != model:
        return batch_error(
            "mismatched_model",
            f"The model '{line.body['model']}' for this request does not match the rest of the "
            "batch. Each batch must contain requests for a single model.",
            "body.model",
        )
    return None


def parse_lines(data: bytes) -> list[InputLine]:
    """The lines of an input file that already passed validation."""
    lines = []
    for _, raw in _raw_lines(data):
        obj = orjson.loads(raw)
        lines.append(InputLine(obj["custom_id"], obj["body"]))
    return lines


def validate_input(
    data: bytes,
    endpoint: str,
    config: EmulatorConfig,
    tokens: PromptTokenCounter | None = None,
) -> Validation:
    """The file's lines, or its errors. Prompt tokens are counted as `count_request_tokens` counts
    them, by `tokens` if given (a large file in its helper processes, while the lines are checked
    here), else here."""
    result = Validation()
    raw_lines = _raw_lines(data)
    if not raw_lines:
        result.errors.append(
            batch_error(
                "empty_file",
                "The input file is empty. Please ensure that the batch contains at least one "
                "request.",
            )
        )
        return result
    if len(raw_lines) > config.max_requests_per_batch:
        result.errors.append(
            batch_error(
                "too_many_tasks",
                f"The batch input file contains {len(raw_lines):,} requests; the maximum is "
                f"{config.max_requests_per_batch:,} requests per batch.",
            )
        )
        return result
    pending = tokens.start_file(endpoint, data) if tokens is not None else None
    seen: set[str] = set()
    supported: dict[str, bool] = {}
    for number, raw in raw_lines:
        line, error = _check_line(raw, endpoint, config, supported)
        if line is not None:
            error = _cross_check(line, seen, result.model)
            line = None if error is not None else line
        if line is None:
            assert error is not None
            result.errors.append({**error, "line": number})
            continue
        seen.add(line.custom_id)
        result.model = result.model or line.body["model"]
        result.lines.append(line)
    if endpoint == "/v1/embeddings" and not result.errors:
        inputs = sum(len(embedding_inputs(line.body)) for line in result.lines)
        if inputs > config.max_embedding_inputs_per_batch:
            result.errors.append(
                batch_error(
                    "too_many_tasks",
                    f"The batch contains {inputs:,} embedding inputs; the maximum is "
                    f"{config.max_embedding_inputs_per_batch:,} embedding inputs per batch.",
                )
            )
    if not result.errors:
        counted = pending() if pending is not None else None
        if counted is not None and len(counted) == len(result.lines):
            result.prompt_tokens = counted
        else:
            bodies = [line.body for line in result.lines]
            count = tokens.count if tokens is not None else count_requests_tokens
            result.prompt_tokens = count(endpoint, bodies)
    return result
