"""Parsing and classifying Batch API output and error lines. Pure functions, no I/O.

A line is either a *result* (status 200 with a usable body) or an *error* row, classified:
- retryable: HTTP 429 (except insufficient_quota), 408, 5xx; non-HTTP `request_timeout`,
  `batch_expired`, `batch_cancelled` and unknown non-HTTP codes; lines that never came back (missing);
- permanent: other HTTP 4xx (e.g. context_length_exceeded) and output that does not validate against
  the job's schema (`invalid_output`, billed: the model did answer).
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from schemas.job import RequestSpec
from schemas.tables import output_fields
from tasks.costing import usage_from_body

RETRYABLE_NON_HTTP = {"request_timeout", "batch_expired", "batch_cancelled"}
PERMANENT_429_CODES = {"insufficient_quota"}


def is_retryable_http(status_code: int, code: str | None) -> bool:
    if status_code == 429:
        return code not in PERMANENT_429_CODES
    return status_code == 408 or status_code >= 500


def _usage_columns(endpoint: str, usage: dict[str, Any] | None) -> dict[str, int]:
    u = usage_from_body(endpoint, usage)
    return {
        "input_tokens": u.input_tokens,
        "cached_tokens": u.cached_tokens,
        "cache_write_tokens": u.cache_write_tokens,
        "output_tokens": u.output_tokens,
        "reasoning_tokens": u.reasoning_tokens,
    }


_ZERO_USAGE = {k: 0 for k in _usage_columns("/v1/embeddings", None)}


class InvalidOutput(ValueError):
    pass


def _check_value(name: str, value: Any, arrow_type: pa.DataType) -> Any:
    if value is None:
        return None
    ok = True
    if pa.types.is_string(arrow_type):
        if not isinstance(value, str):
            value = orjson.dumps(value).decode()
    elif pa.types.is_integer(arrow_type):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif pa.types.is_floating(arrow_type):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif pa.types.is_boolean(arrow_type):
        ok = isinstance(value, bool)
    elif pa.types.is_list(arrow_type):
        ok = isinstance(value, list)
    if not ok:
        raise InvalidOutput(f"field {name!r}: {value!r} is not of type {arrow_type}")
    return value


class LineParser:
    """Turns one decoded output/error line into a result row or an error row for a job's request."""

    def __init__(self, request: RequestSpec, attempt: int, batch_id: str) -> None:
        self.request = request
        self.endpoint = request.endpoint
        self.attempt = attempt
        self.batch_id = batch_id
        self.fields = output_fields(request)
        self.required = set((request.output_schema or {}).get("required", []))
        if request.output_schema:
            self.required = set(request.output_schema["properties"])  # strict mode: all required

    def parse(self, line: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """('result', row) or ('error', row)."""
        custom_id = line.get("custom_id")
        response = line.get("response")
        error = line.get("error")
        if response is None:
            err = error or {}
            code = err.get("code") or "unknown"
            return "error", self._error(
                custom_id, "non_http", None, code, err.get("message"), retryable=True
            )
        status = int(response.get("status_code") or 0)
        body = response.get("body") or {}
        if status != 200:
            err = body.get("error") or {}
            code = err.get("code") or err.get("type") or f"http_{status}"
            return "error", self._error(
                custom_id,
                "http",
                status,
                code,
                err.get("message"),
                retryable=is_retryable_http(status, err.get("code")),
            )
        usage = _usage_columns(self.endpoint, body.get("usage"))
        model = body.get("model")
        try:
            columns, finish_reason = self._columns(body)
        except InvalidOutput as exc:
            row = self._error(custom_id, "invalid_output", 200, "invalid_output", str(exc), False)
            row.update(usage, billed=True, model=model)
            return "error", row
        return "result", {
            "custom_id": custom_id,
            "attempt": self.attempt,
            "batch_id": self.batch_id,
            "model": model,
            "finish_reason": finish_reason,
            **columns,
            **usage,
        }

    def _columns(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        if self.endpoint == "/v1/embeddings":
            data = body.get("data") or []
            if not data or not isinstance(data[0].get("embedding"), list):
                raise InvalidOutput("embedding response has no vector")
            return {"embedding": data[0]["embedding"]}, None
        if self.endpoint == "/v1/responses":
            text, finish = _responses_text(body)
        else:
            choice = (body.get("choices") or [{}])[0]
            message = choice.get("message") or {}
            finish = choice.get("finish_reason")
            if message.get("refusal"):
                raise InvalidOutput(f"the model refused: {message['refusal']}")
            text = message.get("content")
        if not self.request.output_schema:
            return {"response_text": text}, finish
        if text is None:
            raise InvalidOutput("structured output expected, the response has no content")
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InvalidOutput(f"response is not valid JSON ({finish=}): {exc}") from exc
        if not isinstance(obj, dict):
            raise InvalidOutput("structured output is not a JSON object")
        missing = self.required - set(obj)
        if missing:
            raise InvalidOutput(f"structured output lacks {sorted(missing)}")
        columns = {f.name: _check_value(f.name, obj.get(f.name), f.type) for f in self.fields}
        return columns, finish

    def _error(
        self,
        custom_id: Any,
        kind: str,
        status: int | None,
        code: str,
        message: str | None,
        retryable: bool,
    ) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "attempt": self.attempt,
            "batch_id": self.batch_id,
            "kind": kind,
            "status_code": status,
            "code": code,
            "message": (message or "")[:2000],
            "retryable": retryable,
            "billed": False,
            "model": None,
            **_ZERO_USAGE,
        }

    def missing(self, custom_id: str) -> dict[str, Any]:
        return self._error(custom_id, "missing", None, "missing", "line never came back", True)

    def batch_failed(
        self, custom_id: str, code: str, message: str, retryable: bool
    ) -> dict[str, Any]:
        return self._error(custom_id, "batch_failed", None, code, message, retryable)


def _responses_text(body: dict[str, Any]) -> tuple[str | None, str | None]:
    parts = [
        content.get("text", "")
        for item in body.get("output") or []
        if item.get("type") == "message"
        for content in item.get("content") or []
        if content.get("type") == "output_text"
    ]
    status = body.get("status")
    finish = (
        "stop"
        if status == "completed"
        else ((body.get("incomplete_details") or {}).get("reason") or status)
    )
    return ("".join(parts) if parts else None), finish
