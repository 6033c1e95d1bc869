"""What OpenAI's strict structured outputs refuse in a JSON Schema, told before a night is sent.

nightbatch sends `output_schema` with `strict: true`, and OpenAI refuses a schema outside strict mode's
subset of JSON Schema with a 400 on every line. The rules, from OpenAI's Structured Outputs guide,
"Supported schemas" (https://platform.openai.com/docs/guides/structured-outputs#supported-schemas, now
developers.openai.com/api/docs/guides/structured-outputs):

- Supported: the types string, number, boolean, integer, object, array and null (as in
  `"type": ["string", "null"]`), `enum`, `const`, `anyOf`, `$defs` / `$ref` (recursion included);
  for strings `pattern` and `format` (formats date-time, time, date, duration, email, hostname, ipv4,
  ipv6, uuid); for numbers `multipleOf`, `minimum`, `maximum`, `exclusiveMinimum`,
  `exclusiveMaximum`; for arrays `minItems`, `maxItems`.
- "Root objects must not be anyOf and must be an object."
- "Some type-specific keywords are not yet supported": composition `allOf`, `not`,
  `dependentRequired`, `dependentSchemas`, `if`, `then`, `else`. For fine-tuned models also
  `minLength`, `maxLength`, `pattern`, `format`, `minimum`, `maximum`, `multipleOf`,
  `patternProperties`, `minItems`, `maxItems`.
- Limits: 5,000 object properties in all and 10 levels of nesting (an older version of the guide said
  5; the larger is used); 120,000 characters of property names, definition names, enum and const
  values; 1,000 enum values in all; a string enum of more than 250 values at most 15,000 characters.

Two refusals are the API's own words rather than the guide's list: `oneOf` ("In context=(...), 'oneOf'
is not permitted.", reported at the root, under properties and in array items: OpenAI community forum
thread 932422, openai/openai-agents-js#1138, openai/openai-agents-python#474, whose SDKs now rewrite it
to `anyOf`), and a format outside the nine ("'uri' is not a valid format.", cyanheads/git-mcp-server#47).

Only what is documented (or reported) as refused is refused here: keywords the guide does not mention
(`minLength` on a base model, `uniqueItems`, `default`, `title`, ...) are let through, since reports
disagree on them. `additionalProperties: false` and `required` are not asked of the user:
`tasks.render.strict_schema` closes every object and requires every property before sending. How the
API counts nesting is not documented; objects are counted below the root, arrays and unions adding no
level and `$ref` not followed, so a schema is refused only when it is certainly too deep.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SUPPORTED_FORMATS = (
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "uuid",
)
MAX_PROPERTIES = 5_000
MAX_NESTING = 10
MAX_STRING_CHARS = 120_000
MAX_ENUM_VALUES = 1_000
LARGE_ENUM = 250
MAX_LARGE_ENUM_CHARS = 15_000

_SUPPORTED = "of the composition and conditional keywords it supports anyOf only"
_UNSUPPORTED: dict[str, str] = {
    "allOf": "merge its branches into this one schema (one 'properties' holding all of theirs)",
    "oneOf": "write 'anyOf' with the same branches",
    "not": "remove it and list the allowed values with 'enum' (or say what to avoid in "
    "'description')",
    "if": "remove if/then/else and write 'anyOf' with one branch per case",
    "then": "remove if/then/else and write 'anyOf' with one branch per case",
    "else": "remove if/then/else and write 'anyOf' with one branch per case",
    "dependentRequired": "remove it: strict mode requires every property anyway; give a property "
    'that may be empty a null type ("type": ["string", "null"])',
    "dependentSchemas": "remove it and write 'anyOf' with one object branch per case",
}
# Not supported for fine-tuned models, on top of the above.
_FINE_TUNED_UNSUPPORTED = (
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "multipleOf",
    "patternProperties",
    "minItems",
    "maxItems",
)
# Where a keyword's value is a subschema, or a list or name map of them (JSON Schema 2020-12, and
# draft 7's `definitions`). Any other keyword's value is data (enum, const, default, examples, ...).
_SINGLE = (
    "items",
    "additionalProperties",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "not",
    "if",
    "then",
    "else",
)
_LISTED = ("anyOf", "oneOf", "allOf", "prefixItems")
_NAMED = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")

Path = tuple[str, ...]


def strict_mode_problem(schema: dict[str, Any], fine_tuned: bool = False) -> str | None:
    """The first thing in `schema` that OpenAI strict mode refuses, with its path and the fix, or None.

    `schema` is already valid against the JSON Schema meta-schema. `fine_tuned`: the request's model
    is a fine-tuned one (`ft:...`), for which fewer keywords are supported."""
    if "anyOf" in schema:
        return (
            "the schema root: 'anyOf' is not supported at the root by OpenAI strict mode (the root "
            "must be one object); move the anyOf under a property of the root object"
        )
    nodes = list(_subschemas(schema, ()))
    for path, node in nodes:
        problem = _node_problem(path, node, fine_tuned)
        if problem:
            return problem
    return _limit_problem(schema, nodes)


def _where(path: Path) -> str:
    return "/".join(path) or "the schema root"


def _node_problem(path: Path, node: dict[str, Any], fine_tuned: bool) -> str | None:
    for keyword, fix in _UNSUPPORTED.items():
        if keyword in node:
            return (
                f"{_where(path)}: {keyword!r} is not supported by OpenAI strict mode "
                f"({_SUPPORTED}); {fix}"
            )
    if fine_tuned:
        for keyword in _FINE_TUNED_UNSUPPORTED:
            if keyword in node:
                return (
                    f"{_where(path)}: {keyword!r} is not supported by OpenAI strict mode for "
                    "fine-tuned models; remove it (say it in 'description') or use a base model"
                )
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt not in SUPPORTED_FORMATS and _is_string(node):
        return (
            f"{_where(path)}: format {fmt!r} is not supported by OpenAI strict mode (supported: "
            f"{', '.join(SUPPORTED_FORMATS)}); use one of those or a 'pattern', or remove 'format' "
            "and say it in 'description'"
        )
    return None


def _is_string(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


def _limit_problem(schema: dict[str, Any], nodes: list[tuple[Path, dict[str, Any]]]) -> str | None:
    properties = 0
    chars = 0
    enum_values = 0
    for path, node in nodes:
        names = node.get("properties")
        if isinstance(names, dict):
            properties += len(names)
            chars += sum(len(name) for name in names)
        for key in ("$defs", "definitions"):
            if isinstance(node.get(key), dict):
                chars += sum(len(name) for name in node[key])
        enum = node.get("enum")
        if isinstance(enum, list):
            enum_values += len(enum)
            strings = [v for v in enum if isinstance(v, str)]
            chars += sum(len(v) for v in strings)
            if len(strings) > LARGE_ENUM and sum(len(v) for v in strings) > MAX_LARGE_ENUM_CHARS:
                return (
                    f"{_where(path)}: an enum of {len(strings)} strings has "
                    f"{sum(len(v) for v in strings):,} characters; OpenAI strict mode allows "
                    f"{MAX_LARGE_ENUM_CHARS:,} in an enum of more than {LARGE_ENUM} values: "
                    "shorten or split it, or make it a plain string described in 'description'"
                )
        if isinstance(node.get("const"), str):
            chars += len(node["const"])
    if properties > MAX_PROPERTIES:
        return (
            f"the schema has {properties:,} object properties in all; OpenAI strict mode allows "
            f"{MAX_PROPERTIES:,}: drop some or split the job in two"
        )
    if enum_values > MAX_ENUM_VALUES:
        return (
            f"the schema has {enum_values:,} enum values in all; OpenAI strict mode allows "
            f"{MAX_ENUM_VALUES:,}: shorten the enums or make some plain strings"
        )
    if chars > MAX_STRING_CHARS:
        return (
            f"the schema's property names, definition names, enum and const values come to "
            f"{chars:,} characters; OpenAI strict mode allows {MAX_STRING_CHARS:,}: shorten them"
        )
    deep = _too_deep(schema, (), 0)
    if deep is not None:
        return (
            f"{_where(deep)}: objects are nested more than {MAX_NESTING} levels below the root; "
            "OpenAI strict mode allows "
            f"{MAX_NESTING}: flatten the schema (or return the inner part as a JSON string)"
        )
    return None


def _too_deep(node: dict[str, Any], path: Path, depth: int) -> Path | None:
    """The path of an object nested deeper than the limit below the root ($ref not followed)."""
    if path and _is_object(node):
        depth += 1
        if depth > MAX_NESTING:
            return path
    for sub_path, sub in _children(node, path):
        if sub_path[len(path)] in ("$defs", "definitions"):
            continue  # counted where it is used; a recursive $ref has no depth of its own
        found = _too_deep(sub, sub_path, depth)
        if found is not None:
            return found
    return None


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in node


def _subschemas(node: dict[str, Any], path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every subschema that is a JSON object, with its path, parents first."""
    yield path, node
    for sub_path, sub in _children(node, path):
        yield from _subschemas(sub, sub_path)


def _children(node: dict[str, Any], path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    closed = node.get("type") == "object" or (
        isinstance(node.get("type"), list) and "object" in node["type"]
    )
    for key in _SINGLE:
        # strict_schema replaces an object's additionalProperties with false before sending
        if key == "additionalProperties" and closed:
            continue
        if isinstance(node.get(key), dict):
            yield (*path, key), node[key]
    for key in _LISTED:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                if isinstance(sub, dict):
                    yield (*path, key, str(i)), sub
    for key in _NAMED:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                if isinstance(sub, dict):
                    yield (*path, key, name), sub
