"""A small multipart/form-data parser (Starlette's own needs python-multipart, not a dependency here)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class MultipartError(ValueError):
    pass


def _params(header: str) -> dict[str, str]:
    params = {}
    for key, value in _PARAM.findall(header):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    return params


def boundary_of(content_type: str) -> str:
    if not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("expected multipart/form-data")
    boundary = _params(content_type).get("boundary")
    if not boundary:
        raise MultipartError("multipart body without a boundary")
    return boundary


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    """Form fields by name (the last one wins); files keep their filename."""
    delimiter = b"--" + boundary_of(content_type).encode()
    parts: dict[str, Part] = {}
    position = body.find(delimiter)
    if position < 0:
        raise MultipartError("boundary not found in the body")
    while True:
        position += len(delimiter)
        if body[position : position + 2] == b"--":
            break
        header_end = body.find(b"\r\n\r\n", position)
        next_delimiter = body.find(b"\r\n" + delimiter, header_end)
        if header_end < 0 or next_delimiter < 0:
            raise MultipartError("truncated multipart body")
        headers = body[position:header_end].decode("utf-8", errors="replace")
        data = body[header_end + 4 : next_delimiter]
        disposition = ""
        for line in headers.split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
        params = _params(disposition)
        if "name" in params:
            parts[params["name"]] = Part(params["name"], data, params.get("filename"))
        position = next_delimiter + 2
    return parts
