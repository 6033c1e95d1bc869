"""The checks OpenAI makes of a structured-output JSON Schema before it runs a request.

A schema must be a valid JSON Schema (the 2020-12 meta-schema), and each `$ref` must point into the
schema itself (`#` or `#/...`). With `strict: true` the root must be an object, and every object,
wherever it is (properties, items, anyOf/oneOf/allOf branches, $defs), must have
`additionalProperties: false` and list every one of its properties in `required`. A problem is told as
OpenAI tells it, "In context=(<path to the subschema>), <what is wrong>."; the responders turn it into a
400 `invalid_json_schema` line, never into an emulator failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

_META = Draft202012Validator(Draft202012Validator.META_SCHEMA)
_NAMED = ("properties", "$defs", "definitions")
_SINGLE = ("items", "additionalProperties", "not", "contains")
_LISTED = ("anyOf", "oneOf", "allOf", "prefixItems")

Path = tuple[str | int, ...]


def schema_problem(schema: Any, strict: bool) -> str | None:
    """What OpenAI would refuse in `schema`, or None. Cached: a batch's lines share their schema."""
    return _problem(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS), strict)


@lru_cache(maxsize=256)
def _problem(canonical: bytes, strict: bool) -> str | None:
    schema = orjson.loads(canonical)
    error = best_match(_META.iter_errors(schema))
    if error is not None:
        return f"In context={tuple(error.path)}, {error.message}."
    if strict and (not isinstance(schema, dict) or schema.get("type") != "object"):
        kind = schema.get("type") if isinstance(schema, dict) else None
        return f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{kind}\"'."
    if not isinstance(schema, dict):
        return None
    for path, node in _subschemas(schema, ()):
        ref = node.get("$ref")
        if ref is not None and not _resolves(schema, ref):
            return f"In context={path}, reference to component '{ref}' which was not found in the schema."
        if strict and _is_object(node):
            if node.get("additionalProperties") is not False:
                return (
                    f"In context={path}, 'additionalProperties' is required to be supplied and to "
                    "be false."
                )
            required = node.get("required") or []
            missing = [name for name in node.get("properties") or {} if name not in required]
            if missing:
                return (
                    f"In context={path}, 'required' is required to be supplied and to be an array "
                    "including every key in properties. Missing "
                    + ", ".join(f"'{name}'" for name in missing)
                    + "."
                )
    return None


def _subschemas(node: dict[str, Any], path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every subschema that is an object (boolean schemas have nothing to check), with its path."""
    yield path, node
    for key in _NAMED:
        for name, sub in (node.get(key) or {}).items():
            if isinstance(sub, dict):
                yield from _subschemas(sub, (*path, key, name))
    for key in _SINGLE:
        if isinstance(node.get(key), dict):
            yield from _subschemas(node[key], (*path, key))
    for key in _LISTED:
        for i, sub in enumerate(node.get(key) or []):
            if isinstance(sub, dict):
                yield from _subschemas(sub, (*path, key, i))


def _resolves(root: dict[str, Any], ref: str) -> bool:
    """Whether `ref` points at a subschema of `root` (the only refs the schema generator follows)."""
    if ref == "#":
        return True
    if not ref.startswith("#/"):
        return False
    target: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(target, dict):
            return False
        target = target.get(part.replace("~1", "/").replace("~0", "~"))
    return isinstance(target, dict)


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind)
