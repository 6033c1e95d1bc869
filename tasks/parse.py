"""Parsing and classifying Batch API output and error lines. Pure functions, no I/O.

A line is either a *result* (status 200 with a usable body) or an *error* row, classified:
- retryable: HTTP 429 (except insufficient_quota), 408, 5xx; non-HTTP `request_timeout`,
  `batch_expired`, `batch_cancelled` and unknown non-HTTP codes; lines that never came back (missing);
- permanent: other HTTP 4xx (e.g. context_length_exceeded) and output that does not validate against
  the job's schema (`invalid_output`, billed: the model did answer).

Two paths, one result. `LineParser.parse` takes one decoded line. `LineParser.read_lines` +
`parse_table` take a whole chunk of a file: Arrow's JSON reader reads only the fields parsing needs
(GIL released, no Python object per line), the lines that are plain successes become result columns
by Arrow kernels, and every other line (errors, refusals, output that may not validate) goes through
`parse`, so it is classified exactly as before. A chunk Arrow cannot read with the expected types is
left to `parse` line by line; /v1/responses lines always are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from schemas.job import RequestSpec
from schemas.tables import output_fields, results_schema
from tasks.costing import usage_from_body
from tasks.outputschema import OutputSchema

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


_NO_LINES = np.zeros(0, np.int64)


@dataclass
class ParsedLines:
    """The result rows and error rows of a chunk's lines, and the line each came from."""

    results: pa.Table
    result_lines: np.ndarray
    errors: list[dict[str, Any]]
    error_lines: np.ndarray

    def kept(self, keep: np.ndarray) -> ParsedLines:
        """Only the rows of the lines where `keep` is true."""
        results = self.results
        if not keep[self.result_lines].all():
            results = results.filter(pa.array(keep[self.result_lines]))
        errors = [
            row for row, i in zip(self.errors, self.error_lines.tolist(), strict=True) if keep[i]
        ]
        return ParsedLines(results, _NO_LINES, errors, _NO_LINES)


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
        self.schema = results_schema(request)
        self.output = OutputSchema(request.output_schema) if request.output_schema else None
        self.line_schema = _LINE_SCHEMAS.get(self.endpoint)

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
        return self._structured(text, finish), finish

    def _structured(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        """The output columns of a structured-output text; raises InvalidOutput."""
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
        problem = self.output.first_error(obj) if self.output is not None else None
        if problem is not None:
            raise InvalidOutput(f"structured output does not match the schema: {problem}")
        return {f.name: _check_value(f.name, obj.get(f.name), f.type) for f in self.fields}

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

    # ---- whole chunks ----------------------------------------------------------------------------

    def read_lines(self, data: bytes | memoryview) -> pa.Table | None:
        """The fields parsing reads, of every line of a chunk of JSONL (blank lines skipped), or None
        when this endpoint's lines are parsed one by one or a line does not have the expected shape
        and types (then parse that chunk line by line)."""
        if self.line_schema is None:
            return None
        try:
            return pj.read_json(
                pa.BufferReader(pa.py_buffer(data)),
                read_options=pj.ReadOptions(block_size=READ_BLOCK_BYTES),
                parse_options=pj.ParseOptions(
                    explicit_schema=self.line_schema, unexpected_field_behavior="ignore"
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None

    def parse_table(self, lines: pa.Table) -> ParsedLines:
        """The result rows (a table in the results schema) and the error rows of lines read by
        `read_lines`, each line classified as `parse` classifies it, with the line each came from."""
        lines = lines.combine_chunks()
        response = lines.column("response").chunk(0) if lines.num_rows else None
        if response is None:
            return ParsedLines(self.schema.empty_table(), _NO_LINES, [], _NO_LINES)
        status = pc.struct_field(response, "status_code")
        body = pc.struct_field(response, "body")
        listed = pc.struct_field(body, "data" if self.endpoint == "/v1/embeddings" else "choices")
        answered = _mask(
            pc.and_(pc.equal(status, 200), pc.greater(pc.list_value_length(listed), 0))
        )
        rows = np.flatnonzero(answered)
        fast = np.zeros(lines.num_rows, bool)
        columns: dict[str, Any] = {}
        if len(rows):
            picked = pa.array(rows)
            first = pc.list_element(listed.take(picked), 0)
            ok, columns = self._fast_columns(first, pc.struct_field(body, "usage").take(picked))
            fast[rows[ok]] = True
            columns["model"] = pc.struct_field(body, "model").take(pa.array(rows[ok]))
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        result_lines, error_lines = [], []
        slow = np.flatnonzero(~fast)
        for i, line in zip(slow.tolist(), lines.take(pa.array(slow)).to_pylist(), strict=True):
            kind, row = self.parse(line)
            if kind == "result":
                results.append(row)
                result_lines.append(i)
            else:
                errors.append(row)
                error_lines.append(i)
        table = self._result_table(lines.column("custom_id").filter(pa.array(fast)), columns)
        if results:
            table = pa.concat_tables([table, pa.Table.from_pylist(results, schema=self.schema)])
        return ParsedLines(
            table,
            np.concatenate([np.flatnonzero(fast), np.array(result_lines, np.int64)]),
            errors,
            np.array(error_lines, np.int64),
        )

    def _fast_columns(
        self, first: pa.Array, usage: pa.Array
    ) -> tuple[np.ndarray, dict[str, pa.Array]]:
        """For answered lines (status 200, a choice / a data item): which are plain successes, and
        their output, finish_reason and usage columns (for those lines only)."""
        n = len(first)
        if self.endpoint == "/v1/embeddings":
            vector = pc.struct_field(first, "embedding")
            ok = _mask(pc.is_valid(vector))
            columns = {
                "embedding": vector.cast(pa.list_(pa.float32())),
                "finish_reason": pa.nulls(n, pa.string()),
                "input_tokens": _count(usage, "prompt_tokens"),
            }
            for name in (
                "cached_tokens",
                "cache_write_tokens",
                "output_tokens",
                "reasoning_tokens",
            ):
                columns[name] = pa.array(np.zeros(n, np.int64))
            return ok, {name: array.filter(pa.array(ok)) for name, array in columns.items()}
        message = pc.struct_field(first, "message")
        content = pc.struct_field(message, "content")
        refused = _mask(pc.greater(pc.utf8_length(pc.struct_field(message, "refusal")), 0))
        columns = {
            "finish_reason": pc.struct_field(first, "finish_reason"),
            "input_tokens": _count(usage, "prompt_tokens"),
            "cached_tokens": _count(usage, "prompt_tokens_details", "cached_tokens"),
            "cache_write_tokens": _count(usage, "prompt_tokens_details", "cache_write_tokens"),
            "output_tokens": _count(usage, "completion_tokens"),
            "reasoning_tokens": _count(usage, "completion_tokens_details", "reasoning_tokens"),
        }
        if not self.request.output_schema:
            columns["response_text"] = content
            return ~refused, {
                name: array.filter(pa.array(~refused)) for name, array in columns.items()
            }
        ok = ~refused & _mask(pc.is_valid(content))
        valid, outputs = self._structured_columns(content.filter(pa.array(ok)))
        ok[np.flatnonzero(ok)[~valid]] = False
        aligned = {name: array.filter(pa.array(ok)) for name, array in columns.items()}
        return ok, {**aligned, **outputs}  # outputs: one value per valid text, in order

    def _structured_columns(self, texts: pa.Array) -> tuple[np.ndarray, dict[str, pa.Array]]:
        """The structured-output texts that surely validate, and their output columns (for those
        texts only). Arrow's JSON reader takes one-line objects; a text it may read differently
        from `parse` (a key absent or null, a type to coerce, not valid JSON) is left out, to go
        through `parse`."""
        candidate = _mask(pc.starts_with(texts, "{")) & ~_mask(pc.match_substring(texts, "\n"))
        if self.output is not None and not self.output.columnar:
            return self._structured_columns_by_row(texts)  # nested: the validator sees each
        rows = np.flatnonzero(candidate)
        if not len(rows):
            return candidate, {f.name: pa.array([], f.type) for f in self.fields}
        chosen = texts if len(rows) == len(texts) else texts.take(pa.array(rows))
        try:
            table = pj.read_json(
                pa.BufferReader(_joined_lines(chosen)),
                parse_options=pj.ParseOptions(
                    explicit_schema=pa.schema(self.fields), unexpected_field_behavior="ignore"
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return self._structured_columns_by_row(texts)
        if table.num_rows != len(rows):
            return self._structured_columns_by_row(texts)
        table = table.combine_chunks()
        complete = np.ones(len(rows), bool)
        for column in table.columns:
            complete &= ~_mask(pc.is_null(column))  # absent or null: let `parse` decide
        if self.output is not None:  # enum and bounds, column by column; breaking rows: `parse`
            columns = {f.name: table.column(f.name).chunk(0) for f in self.fields}
            complete &= ~self.output.column_violations(columns, len(rows))
        candidate[rows[~complete]] = False
        keep = pa.array(complete)
        return candidate, {f.name: table.column(f.name).chunk(0).filter(keep) for f in self.fields}

    def _structured_columns_by_row(self, texts: pa.Array) -> tuple[np.ndarray, dict[str, pa.Array]]:
        valid = np.zeros(len(texts), bool)
        rows: list[dict[str, Any]] = []
        for i, text in enumerate(texts.to_pylist()):
            try:
                rows.append(self._structured(text))
                valid[i] = True
            except InvalidOutput:
                continue
        table = pa.Table.from_pylist(rows, schema=pa.schema(self.fields))
        return valid, {f.name: table.column(f.name).combine_chunks() for f in self.fields}

    def _result_table(self, custom_ids: Any, columns: dict[str, Any]) -> pa.Table:
        n = len(custom_ids)
        columns = {
            **columns,
            "custom_id": custom_ids,
            "attempt": pa.array(np.full(n, self.attempt, np.int32)),
            "batch_id": pa.repeat(pa.scalar(self.batch_id, pa.string()), n),
        }
        if n == 0:
            return self.schema.empty_table()
        arrays = [columns[f.name] for f in self.schema]
        return pa.Table.from_arrays(
            [a.cast(f.type) for a, f in zip(arrays, self.schema, strict=True)],
            schema=self.schema,
        )


READ_BLOCK_BYTES = 32 << 20  # > a collect chunk: one block, one Arrow chunk, no copies


def _joined_lines(texts: pa.Array) -> pa.Buffer:
    """The strings of an array as one buffer, a newline after each (Arrow kernels: each string with
    its newline is written contiguously, so the data buffer is the joined text)."""
    newline, nothing = pa.scalar("\n", pa.large_string()), pa.scalar("", pa.large_string())
    lined = pc.binary_join_element_wise(texts.cast(pa.large_string()), newline, nothing)
    offsets = np.frombuffer(lined.buffers()[1], np.int64, len(lined) + 1, lined.offset * 8)
    return lined.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))


def _mask(condition: Any) -> np.ndarray:
    """A boolean Arrow array as numpy, null as False."""
    return np.asarray(pc.fill_null(condition, False).to_numpy(zero_copy_only=False), bool)


def _count(usage: pa.Array, *path: str) -> pa.Array:
    """A usage count (`costing._count`): absent or null is 0."""
    value = usage
    for name in path:
        value = pc.struct_field(value, name)
    return pc.fill_null(value, 0).cast(pa.int64())


def _struct(*fields: tuple[str, pa.DataType]) -> pa.DataType:
    return pa.struct([pa.field(name, kind) for name, kind in fields])


_ERROR = _struct(("code", pa.string()), ("message", pa.string()))
_HTTP_ERROR = _struct(("code", pa.string()), ("type", pa.string()), ("message", pa.string()))


def _line_schema(body: pa.DataType) -> pa.Schema:
    response = _struct(("status_code", pa.int64()), ("body", body))
    return pa.schema([("custom_id", pa.string()), ("response", response), ("error", _ERROR)])


_CHAT_USAGE = _struct(
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    (
        "prompt_tokens_details",
        _struct(("cached_tokens", pa.int64()), ("cache_write_tokens", pa.int64())),
    ),
    ("completion_tokens_details", _struct(("reasoning_tokens", pa.int64()))),
)
_CHOICE = _struct(
    ("message", _struct(("content", pa.string()), ("refusal", pa.string()))),
    ("finish_reason", pa.string()),
)
_LINE_SCHEMAS = {
    "/v1/chat/completions": _line_schema(
        _struct(
            ("model", pa.string()),
            ("choices", pa.list_(_CHOICE)),
            ("usage", _CHAT_USAGE),
            ("error", _HTTP_ERROR),
        )
    ),
    "/v1/embeddings": _line_schema(
        _struct(
            ("model", pa.string()),
            ("data", pa.list_(_struct(("embedding", pa.list_(pa.float64()))))),
            ("usage", _struct(("prompt_tokens", pa.int64()))),
            ("error", _HTTP_ERROR),
        )
    ),
}


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
