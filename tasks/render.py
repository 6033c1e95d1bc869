"""Rendering one request per row: custom ids, bodies, JSONL lines. Pure functions, no I/O."""

from __future__ import annotations

import copy
import hashlib
import re
import string
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from schemas.job import RequestSpec

_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,60}")


def custom_id_for(id_value: Any) -> str:
    """A stable custom_id from a row's id value, never from its position: `r-<id>` when the id is short
    and safe, else `h-<sha256 of the id>` (≤ 64 characters either way)."""
    text = str(id_value)
    if _SAFE_ID.fullmatch(text):
        return f"r-{text}"
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:60]


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

    def _fill(self, template: str, row: dict[str, Any]) -> str:
        return template.format_map({k: "" if row[k] is None else row[k] for k in self.fields})

    def body(self, row: dict[str, Any]) -> dict[str, Any]:
        user = self._fill(self.spec.template, row)
        body = dict(self._base)
        if self.endpoint == "/v1/embeddings":
            body["input"] = user
            return body
        system = self.spec.system_prompt
        if system and not self._system_is_static:
            system = self._fill(system, row)
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


def iter_custom_ids(lines: Iterable[bytes]) -> Iterator[str]:
    for raw in lines:
        if raw.strip():
            yield orjson.loads(raw)["custom_id"]
