"""Rendering one request per row: custom ids, bodies, JSONL lines. Pure functions, no I/O.

Two paths give the same JSON. `RequestRenderer.body` / `.line` render one row from a dict. The batch
path (`RequestRenderer.render_batch`) renders a whole Arrow record batch with Arrow kernels and no
Python object per row: the template is filled column-wise, the text is JSON-escaped on its UTF-8
bytes, and each line is a precomputed static frame around the two strings that vary (the custom_id
and the escaped text), so a batch's lines are one contiguous buffer of JSONL. Arrow kernels release
the GIL: batches render in parallel on threads. Templates a frame cannot express (a system prompt
with placeholders) fall back to `body`/`line` per row."""

from __future__ import annotations

import copy
import hashlib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from schemas.job import RequestSpec

_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,60}")


def custom_id_for(id_value: Any) -> str:
    """A stable custom_id from a row's id value, never from its position: `r-<id>` when the id is short
    and safe, else `h-<sha256 of the id>` (≤ 64 characters either way)."""
    text = str(id_value)
    if _SAFE_ID.fullmatch(text):
        return f"r-{text}"
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:60]


_SAFE_ID_RE2 = "^[A-Za-z0-9_.:-]{1,60}$"  # _SAFE_ID as an anchored RE2 pattern (for Arrow kernels)


def _is_text(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    )


def custom_ids_for(values: pa.Array) -> pa.Array:
    """`custom_id_for` of every value of an id column (non-null), as a string array. Strings and
    integers are handled by Arrow kernels; only ids that need hashing, and other types, go through
    Python."""
    if _is_text(values.type):
        text = values.cast(pa.string())
    elif pa.types.is_integer(values.type):
        text = pc.cast(values, pa.string())
    else:
        return pa.array([custom_id_for(v) for v in values.to_pylist()], pa.string())
    out = pc.binary_join_element_wise("r-", text, "")
    safe = pc.match_substring_regex(text, _SAFE_ID_RE2)
    if safe.false_count:
        fixed = out.to_pylist()
        raw = text.to_pylist()
        for i in np.flatnonzero(~np.asarray(safe.fill_null(False))).tolist():
            fixed[i] = custom_id_for(raw[i])
        out = pa.array(fixed, pa.string())
    return out


def value_offsets(array: pa.Array) -> np.ndarray:
    """The value offsets of a string/binary array (large or not) as int64, len(array) + 1 of them."""
    width = 8 if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type) else 4
    kind = np.int64 if width == 8 else np.int32
    offsets = np.frombuffer(array.buffers()[1], kind, len(array) + 1, array.offset * width)
    return offsets.astype(np.int64)


def _utf8_bytes(array: pa.Array) -> np.ndarray:
    """The data bytes of a string/binary array (sliced or not), as a uint8 view."""
    offsets = value_offsets(array)
    data = array.buffers()[2]
    if data is None:
        return np.zeros(0, np.uint8)
    return np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]]


def text_lengths(array: pa.Array) -> np.ndarray:
    """Byte length of every value of a string/binary array (nulls count 0)."""
    return np.diff(value_offsets(array))


def json_escaped(texts: pa.Array, raw: list[bytes] | None = None) -> list[bytes]:
    """Every string of a (non-null) string array escaped for use inside a JSON string literal
    (without the quotes), as UTF-8 bytes. The Python twin of `json_escaped_array`."""
    if raw is None:
        raw = texts.cast(pa.large_binary()).to_pylist()
    return [orjson.dumps(t.decode())[1:-1] for t in raw]


_ESCAPES = {  # byte -> (text, JSON escape); the backslash first, so later escapes stay intact
    0x5C: ("\\", "\\\\"),
    0x22: ('"', '\\"'),
    0x0A: ("\n", "\\n"),
    0x09: ("\t", "\\t"),
    0x0D: ("\r", "\\r"),
}


def json_escaped_array(texts: pa.Array) -> pa.Array:
    """Every string of a (non-null) large_string array escaped for use inside a JSON string literal
    (without the quotes), as a large_binary array, by Arrow kernels on the UTF-8 bytes. JSON needs
    only `"`, `\\` and control characters escaped: one replace pass per such character present in
    the batch (found with memchr-speed `bytes.find` on the data buffer); a batch left with any other
    control character goes through orjson (`json_escaped`)."""
    data = _utf8_bytes(texts).tobytes()
    out = texts.cast(pa.large_binary())
    for pattern, replacement in _ESCAPES.values():
        if data.find(pattern.encode()) >= 0:
            out = pc.replace_substring(out, pattern, replacement)
    if len(out) and len(data) and int(_utf8_bytes(out).min()) < 0x20:
        return pa.array(json_escaped(texts), pa.large_binary())
    return out


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as OpenAI strict mode wants it: every object closed and every property required.
    (A common trap: strict structured output rejects open objects or optional properties.)"""
    schema = copy.deepcopy(schema)

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or (
                isinstance(node.get("type"), list) and "object" in node["type"]
            ):
                props = node.setdefault("properties", {})
                node["additionalProperties"] = False
                node["required"] = list(props)
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for item in node:
                fix(item)

    fix(schema)
    return schema


_ID_SENTINEL = "\x01nightbatch-custom-id\x01"
_TEXT_SENTINEL = "\x01nightbatch-text\x01"
_FORMATTER = string.Formatter()


@dataclass
class RenderedBatch:
    """The request lines of one record batch, ready to be packed into shards.

    On the framed path `data` holds every line (a large_binary array whose buffer is the batch's
    JSONL) and `texts` every row's request text, so its tokens can be counted; on the per-row path
    `lines` and `bodies` hold each line and body."""

    custom_ids: pa.Array  # string
    lengths: np.ndarray  # bytes of each line, newline included
    data: pa.Array | None = None
    texts: pa.Array | None = None  # large_string
    text_lengths: np.ndarray | None = None  # UTF-8 bytes of each text
    lines: list[bytes] | None = None
    bodies: list[dict[str, Any]] | None = None
    keys: pa.Array | None = None  # each line's cache key (binary(16)), when the cache is on

    def __len__(self) -> int:
        return len(self.lengths)

    def line(self, i: int) -> bytes:
        """The bytes of line i (newline included)."""
        if self.lines is not None:
            return self.lines[i]
        assert self.data is not None
        offsets = value_offsets(self.data)
        return bytes(memoryview(self.data.buffers()[2])[offsets[i] : offsets[i + 1]])

    def select(self, keep: np.ndarray) -> RenderedBatch:
        """The lines where `keep` is true, in order."""
        mask = pa.array(keep, pa.bool_())
        return RenderedBatch(
            custom_ids=self.custom_ids.filter(mask),
            lengths=self.lengths[keep],
            data=self.data.filter(mask) if self.data is not None else None,
            texts=self.texts.filter(mask) if self.texts is not None else None,
            text_lengths=self.text_lengths[keep] if self.text_lengths is not None else None,
            lines=[x for x, k in zip(self.lines, keep, strict=True) if k]
            if self.lines is not None
            else None,
            bodies=[x for x, k in zip(self.bodies, keep, strict=True) if k]
            if self.bodies is not None
            else None,
            keys=self.keys.filter(mask) if self.keys is not None else None,
        )

    def chunk(self, start: int, stop: int) -> bytes | memoryview:
        """The JSONL bytes of lines [start, stop) (a view into the batch's buffer: no copy)."""
        if self.lines is not None:
            return b"".join(self.lines[start:stop])
        assert self.data is not None
        offsets = value_offsets(self.data)
        return memoryview(self.data.buffers()[2])[offsets[start] : offsets[stop]]


def concat_rendered(batches: list[RenderedBatch]) -> RenderedBatch:
    """One rendered batch of these batches' lines, in order (of one renderer: all framed or all
    per-row)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]

    def arrays(name: str) -> pa.Array | None:
        if getattr(first, name) is None:
            return None
        return pa.concat_arrays([getattr(b, name) for b in batches])

    def numbers(name: str) -> np.ndarray | None:
        if getattr(first, name) is None:
            return None
        return np.concatenate([getattr(b, name) for b in batches])

    def items(name: str) -> list[Any] | None:
        if getattr(first, name) is None:
            return None
        return [item for b in batches for item in getattr(b, name)]

    return RenderedBatch(
        custom_ids=pa.concat_arrays([b.custom_ids for b in batches]),
        lengths=np.concatenate([b.lengths for b in batches]),
        data=arrays("data"),
        texts=arrays("texts"),
        text_lengths=numbers("text_lengths"),
        lines=items("lines"),
        bodies=items("bodies"),
        keys=arrays("keys"),
    )


class RequestRenderer:
    """Builds the request body for a row of a job's source. Static parts are built once."""

    def __init__(self, spec: RequestSpec) -> None:
        self.spec = spec
        self.endpoint = spec.endpoint
        self.fields = spec.template_fields()
        self._system_is_static = not any(
            name for _, name, _, _ in string.Formatter().parse(spec.system_prompt or "")
        )
        self._base: dict[str, Any] = {"model": spec.model, **spec.params}
        schema = strict_schema(spec.output_schema) if spec.output_schema else None
        if schema is not None and spec.endpoint == "/v1/chat/completions":
            self._base["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": spec.schema_name, "schema": schema, "strict": True},
            }
        if schema is not None and spec.endpoint == "/v1/responses":
            text = dict(self._base.get("text") or {})
            text["format"] = {
                "type": "json_schema",
                "name": spec.schema_name,
                "schema": schema,
                "strict": True,
            }
            self._base["text"] = text
        self._template = list(_FORMATTER.parse(spec.template))
        self.frame = self._line_frame()

    def _fill(self, template: str, row: dict[str, Any]) -> str:
        return template.format_map({k: "" if row[k] is None else row[k] for k in self.fields})

    def body(self, row: dict[str, Any]) -> dict[str, Any]:
        user = self._fill(self.spec.template, row)
        system = self.spec.system_prompt
        if system and not self._system_is_static:
            system = self._fill(system, row)
        return self._body(user, system)

    def body_for_text(self, text: str) -> dict[str, Any]:
        """The body of a row whose filled template is `text` (the system prompt must be static)."""
        assert self._system_is_static
        return self._body(text, self.spec.system_prompt)

    def _body(self, user: str, system: str | None) -> dict[str, Any]:
        body = dict(self._base)
        if self.endpoint == "/v1/embeddings":
            body["input"] = user
            return body
        if self.endpoint == "/v1/responses":
            if system:
                body["instructions"] = system
            body["input"] = user
            return body
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        body["messages"] = messages
        return body

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        return orjson.dumps(
            {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body},
            option=orjson.OPT_APPEND_NEWLINE,
        )

    def _line_frame(self) -> tuple[bytes, bytes, bytes] | None:
        """(head, middle, tail): a line is head + custom_id + middle + escaped text + tail. None when
        the varying parts are not just those two strings (a templated system prompt)."""
        if not self._system_is_static:
            return None
        line = self.line(_ID_SENTINEL, self.body_for_text(_TEXT_SENTINEL))
        marks = [orjson.dumps(_ID_SENTINEL)[1:-1], orjson.dumps(_TEXT_SENTINEL)[1:-1]]
        if any(line.count(mark) != 1 for mark in marks):
            return None
        head, rest = line.split(marks[0])
        middle, tail = rest.split(marks[1])
        return head, middle, tail

    def texts(self, batch: pa.RecordBatch) -> pa.Array:
        """The filled template of every row, as a string array (nulls filled with "", as in `body`)."""
        parts: list[Any] = []
        for literal, name, spec, conversion in self._template:
            if literal:
                parts.append(literal)
            if name is not None:
                parts.append(_formatted(batch.column(name), spec or "", conversion))
        if not any(isinstance(p, pa.Array) for p in parts):
            return pa.array(["".join(parts)] * batch.num_rows, pa.string())
        joined = pc.binary_join_element_wise(
            *parts, "", null_handling="replace", null_replacement=""
        )
        return joined.cast(pa.string())

    def render_batch(self, batch: pa.RecordBatch, id_column: str) -> RenderedBatch:
        """The request lines of every row of `batch` (which holds the id and the template's columns;
        ids must not be null)."""
        custom_ids = custom_ids_for(batch.column(id_column))
        batch = _nested_as_json(batch, self.fields)
        if self.frame is None:
            records = batch.to_pylist()
            ids = custom_ids.to_pylist()
            bodies = [self.body(record) for record in records]
            lines = [self.line(cid, body) for cid, body in zip(ids, bodies, strict=True)]
            lengths = np.fromiter(map(len, lines), np.int64, len(lines))
            return RenderedBatch(custom_ids, lengths, lines=lines, bodies=bodies)
        head, middle, tail = (pa.scalar(part, pa.large_binary()) for part in self.frame)
        texts = self.texts(batch).cast(pa.large_string())
        data = pc.binary_join_element_wise(
            head,
            custom_ids.cast(pa.large_binary()),
            middle,
            json_escaped_array(texts),
            tail,
            pa.scalar(b"", pa.large_binary()),
        )
        return RenderedBatch(
            custom_ids,
            text_lengths(data),
            data=data,
            texts=texts,
            text_lengths=text_lengths(texts),
        )


def _nested_as_json(batch: pa.RecordBatch, names: list[str]) -> pa.RecordBatch:
    """`batch` with its list, struct and map columns among `names` as JSON text (null stays null),
    so a template shows them as JSON rather than as Python's repr."""
    for name in names:
        i = batch.schema.get_field_index(name)
        if i >= 0 and pa.types.is_nested(batch.schema.field(i).type):
            text = pa.array(
                [None if v is None else orjson.dumps(v, default=str).decode()
                 for v in batch.column(i).to_pylist()],
                pa.string(),
            )  # fmt: skip
            batch = batch.set_column(i, name, text)
    return batch


def _formatted(column: pa.Array, spec: str, conversion: str | None) -> pa.Array:
    """A column's values as `str.format` renders them in a template (null as ""): Arrow casts for
    strings and integers without a format spec, Python's own formatting for everything else."""
    if not spec and not conversion:
        if _is_text(column.type):
            return column.cast(pa.string())
        if pa.types.is_integer(column.type):
            return pc.cast(column, pa.string())
    values: Sequence[Any] = column.to_pylist()
    return pa.array(
        [
            _FORMATTER.format_field(
                _FORMATTER.convert_field("" if v is None else v, conversion), spec
            )
            for v in values
        ],
        pa.string(),
    )
