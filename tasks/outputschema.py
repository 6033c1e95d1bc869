"""Structured output checked against the job's JSON Schema with a real validator (`jsonschema`),
as OpenAI strict mode sends it (every object closed, every property required).

Most outputs take the vectorised path of `tasks.parse` (Arrow's JSON reader); it can only check
types, so it also checks here, column by column, the constraints a flat schema may carry (`enum`,
`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`). A schema with any other constraint,
or with nested objects or arrays of objects, sends every output through the validator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from tasks.render import strict_schema

SCALARS = {"string", "integer", "number", "boolean", "null"}
PLAIN_KEYS = {"type", "description", "title", "$comment", "examples"}
COLUMN_CHECKS = {"enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}


class OutputSchema:
    def __init__(self, schema: dict[str, Any]) -> None:
        self.validator = Draft202012Validator(strict_schema(schema))
        self.properties: dict[str, Any] = schema["properties"]
        self.columnar = all(_flat(prop) for prop in self.properties.values()) and set(
            schema
        ) <= PLAIN_KEYS | {"properties", "required", "additionalProperties"}

    def first_error(self, value: Any) -> str | None:
        """The most relevant violation of the schema, with where it is; None when valid."""
        error = best_match(self.validator.iter_errors(value))
        if error is None:
            return None
        path = "/".join(str(p) for p in error.absolute_path)
        return f"{repr(path) if path else 'the output'}: {error.message}"[:500]

    def column_violations(self, columns: dict[str, pa.Array], rows: int) -> np.ndarray:
        """Rows of a columnar read that break a constraint (to be checked one by one)."""
        bad = np.zeros(rows, bool)
        for name, prop in self.properties.items():
            column = columns[name]
            checks = []
            if "enum" in prop:
                checks.append(pc.invert(pc.is_in(column, value_set=pa.array(prop["enum"]))))
            for key, compare in (("minimum", pc.less), ("maximum", pc.greater),
                                 ("exclusiveMinimum", pc.less_equal),
                                 ("exclusiveMaximum", pc.greater_equal)):  # fmt: skip
                if key in prop:
                    checks.append(compare(column, prop[key]))
            for check in checks:
                bad |= np.asarray(pc.fill_null(check, True).to_numpy(zero_copy_only=False), bool)
        return bad


def _flat(prop: Any) -> bool:
    """A property the columnar path can check completely: a scalar (or a list of plain scalars)
    with at most the column checks."""
    if not isinstance(prop, dict) or set(prop) - PLAIN_KEYS - COLUMN_CHECKS - {"items"}:
        return False
    kinds = prop.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds} if kinds else set()
    if not kinds and "enum" not in prop:
        return False
    if kinds <= SCALARS:
        return "items" not in prop
    if kinds - {"null"} == {"array"}:
        items = prop.get("items")
        return (
            isinstance(items, dict)
            and not set(items) - PLAIN_KEYS
            and isinstance(items.get("type"), str)
            and items["type"] in SCALARS - {"null"}
            and not set(prop) & COLUMN_CHECKS
        )
    return False
