"""Deterministic JSON values that validate against a (structured-outputs style) JSON schema.

Supports: type (single or a list, e.g. ["string", "null"]), enum, const, anyOf/oneOf/allOf (first branch),
$ref into $defs/definitions, object properties/required, array items/minItems/maxItems, string
minLength/maxLength/format (date, date-time, time, email, uri, uuid), number/integer
minimum/maximum/exclusive bounds/multipleOf, boolean. Nullable values are null about one time in five;
optional properties are present about half of the time.
"""

from __future__ import annotations

import math
import random
from typing import Any

_MAX_DEPTH = 8


class SchemaGenerator:
    def __init__(self, root: dict[str, Any], rng: random.Random, words: list[str]) -> None:
        self.root = root
        self.rng = rng
        self.words = words

    def generate(self, schema: Any = None, depth: int = 0) -> Any:
        schema = self.root if schema is None else schema
        if not isinstance(schema, dict):
            return self._string({})
        if "$ref" in schema:
            schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self._choose_branch(schema[key], depth)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                merged = {**(self._resolve(part) if isinstance(part, dict) else {}), **merged}
            return self.generate(merged, depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            if "null" in kind and (not kinds or self.rng.random() < 0.2 or depth >= _MAX_DEPTH):
                return None
            kind = self.rng.choice(kinds)
        if kind is None:
            kind = (
                "object" if "properties" in schema else "array" if "items" in schema else "string"
            )
        return self._by_type(kind, schema, depth)

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < 32:
            target: Any = self.root
            for part in schema["$ref"].lstrip("#/").split("/"):
                if part:
                    target = target.get(part.replace("~1", "/").replace("~0", "~"), {})
            schema = target if isinstance(target, dict) else {}
            seen += 1
        return schema

    def _choose_branch(self, branches: list[Any], depth: int) -> Any:
        resolved = [self._resolve(b) if isinstance(b, dict) else {} for b in branches]
        non_null = [b for b in resolved if b.get("type") != "null"]
        if len(non_null) < len(resolved) and (
            not non_null or self.rng.random() < 0.2 or depth >= _MAX_DEPTH
        ):
            return None
        return self.generate(self.rng.choice(non_null), depth)

    def _by_type(self, kind: str, schema: dict[str, Any], depth: int) -> Any:
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        value: dict[str, Any] = {}
        for name, sub in properties.items():
            optional = name not in required
            if optional and (depth >= _MAX_DEPTH or self.rng.random() < 0.5):
                continue
            value[name] = self.generate(sub, depth + 1)
        return value

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        low = int(schema.get("minItems", 1 if depth < _MAX_DEPTH else 0))
        high = int(schema.get("maxItems", low + 2))
        count = self.rng.randint(low, max(low, high)) if depth < _MAX_DEPTH else low
        items = schema.get("items", {})
        prefix = schema.get("prefixItems") or []
        return [
            self.generate(prefix[i] if i < len(prefix) else items, depth + 1) for i in range(count)
        ]

    def _bounds(self, schema: dict[str, Any], step: float) -> tuple[float, float]:
        low = schema.get("minimum", 0)
        high = schema.get("maximum", max(low, 0) + 100)
        if "exclusiveMinimum" in schema:
            low = max(low, schema["exclusiveMinimum"] + step)
        if "exclusiveMaximum" in schema:
            high = min(high, schema["exclusiveMaximum"] - step)
        return float(low), float(max(low, high))

    def _integer(self, schema: dict[str, Any]) -> int:
        low, high = self._bounds(schema, 1)
        value = self.rng.randint(math.ceil(low), max(math.ceil(low), math.floor(high)))
        multiple = schema.get("multipleOf")
        if isinstance(multiple, int) and multiple > 0:
            value = max(math.ceil(low / multiple), math.floor(value / multiple)) * multiple
        return value

    def _number(self, schema: dict[str, Any]) -> float:
        low, high = self._bounds(schema, 0.01)
        multiple = schema.get("multipleOf")
        if isinstance(multiple, int | float) and multiple > 0:
            first = math.ceil(low / multiple)
            steps = self.rng.randint(first, max(first, math.floor(high / multiple)))
            return round(steps * multiple, 10)
        return round(self.rng.uniform(low, high), 2)

    def _string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if fmt is not None and (formatted := self._formatted(fmt)) is not None:
            return formatted
        rng = self.rng
        text = " ".join(rng.choices(self.words, k=rng.randint(1, 4)))
        low = int(schema.get("minLength", 0))
        high = schema.get("maxLength")
        while len(text) < low:
            text += " " + rng.choice(self.words)
        if isinstance(high, int):
            text = text[:high]
        return text

    def _formatted(self, fmt: Any) -> str | None:
        """A string of a known `format`, else None."""
        rng = self.rng
        if fmt == "date":
            return f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if fmt == "date-time":
            return (
                f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                f"T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
            )
        if fmt == "time":
            return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
        if fmt == "email":
            return f"{rng.choice(self.words).lower()}@example.com"
        if fmt in ("uri", "url"):
            return f"https://example.com/{rng.choice(self.words).lower()}"
        if fmt == "uuid":
            hexes = f"{rng.getrandbits(128):032x}"
            return f"{hexes[:8]}-{hexes[8:12]}-{hexes[12:16]}-{hexes[16:20]}-{hexes[20:]}"
        return None
