"""The /v1 Files and Batches handlers: request parsing and synchronous (HTTP 400) validation."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from emulator.engine import Engine
from emulator.errors import ApiError, invalid_type, invalid_value, missing_parameter
from emulator.models import BatchRecord
from emulator.multipart import MultipartError, parse_multipart

SUPPORTED_ENDPOINTS = ["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
FILE_PURPOSES = ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]
MIN_TTL, MAX_TTL = 3600, 2592000


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _int_param(name: str, raw: Any, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise invalid_type(name, "an integer", raw) from None
    if value < low:
        raise ApiError(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got "
            f"{value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if value > high:
        raise ApiError(
            400,
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got "
            f"{value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _ttl(name: str, anchor: Any, seconds: Any) -> int | None:
    """An `expires_after`-style {anchor: created_at, seconds: 3600..2592000}, as seconds."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise invalid_value(f"{name}.anchor", anchor, ["created_at"])
    return _int_param(f"{name}.seconds", seconds, MIN_TTL, MIN_TTL, MAX_TTL)


def _list_body(items: list[Any], has_more: bool) -> dict[str, Any]:
    data = [item.to_api() for item in items]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


# files


async def create_file(request: Request, engine: Engine) -> Response:
    try:
        form = parse_multipart(await request.body(), request.headers.get("content-type", ""))
    except MultipartError as exc:
        raise ApiError(400, f"Could not parse multipart form: {exc}.") from None
    if "file" not in form:
        raise missing_parameter("file")
    if "purpose" not in form:
        raise missing_parameter("purpose")
    purpose = form["purpose"].text()
    if purpose not in FILE_PURPOSES:
        raise invalid_value("purpose", purpose, FILE_PURPOSES)
    upload = form["file"]
    filename = upload.filename or "upload"
    config = engine.config
    if purpose == "batch" and not filename.lower().endswith(".jsonl"):
        raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl", param="file")
    limit = config.max_batch_file_bytes if purpose == "batch" else config.max_file_bytes
    if len(upload.data) > limit:
        raise ApiError(400, "File is too large.", param="file")
    anchor = form.get("expires_after[anchor]")
    seconds = form.get("expires_after[seconds]")
    ttl = _ttl(
        "expires_after",
        anchor.text() if anchor else None,
        seconds.text() if seconds else None,
    )
    record = await run_in_threadpool(engine.create_file, filename, purpose, upload.data, ttl)
    return JSONResponse(record.to_api())


async def list_files(request: Request, engine: Engine) -> Response:
    query = request.query_params
    limit = _int_param("limit", query.get("limit"), 10000, 1, 10000)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid_value("order", order, ["asc", "desc"])
    items, has_more = engine.list_files(query.get("after"), limit, order, query.get("purpose"))
    return JSONResponse(_list_body(items, has_more))


async def get_file(request: Request, engine: Engine) -> Response:
    return JSONResponse(engine.get_file(request.path_params["file_id"]).to_api())


async def file_content(request: Request, engine: Engine) -> Response:
    path = engine.file_path(request.path_params["file_id"])
    return FileResponse(path, media_type="application/octet-stream")


async def delete_file(request: Request, engine: Engine) -> Response:
    record = await run_in_threadpool(engine.delete_file, request.path_params["file_id"])
    return JSONResponse({"id": record.id, "object": "file", "deleted": True})


# batches


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise invalid_type("metadata", "an object", metadata)
    if len(metadata) > 16:
        raise ApiError(
            400,
            "Invalid 'metadata': too many properties. Expected an object with at most 16 "
            f"properties, but got an object with {len(metadata)} properties instead.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > 64:
            raise ApiError(
                400,
                "Invalid 'metadata': key too long. Expected keys with maximum length 64, but got "
                f"a key with length {len(key)} instead.",
                param="metadata",
                code="string_above_max_length",
            )
        if not isinstance(value, str):
            raise invalid_type(f"metadata.{key}", "a string", value)
        if len(value) > 512:
            raise ApiError(
                400,
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                f"length 512, but got a string with length {len(value)} instead.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )
    return metadata


async def create_batch(request: Request, engine: Engine) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
        )
    for name in ("input_file_id", "endpoint", "completion_window"):
        if body.get(name) is None:
            raise missing_parameter(name)
    if body["endpoint"] not in SUPPORTED_ENDPOINTS:
        raise invalid_value("endpoint", body["endpoint"], SUPPORTED_ENDPOINTS)
    if body["completion_window"] != "24h":
        raise invalid_value("completion_window", body["completion_window"], ["24h"])
    metadata = _check_metadata(body.get("metadata"))
    expires = body.get("output_expires_after")
    if expires is not None and not isinstance(expires, dict):
        raise invalid_type("output_expires_after", "an object", expires)
    expires = expires or {}
    ttl = _ttl("output_expires_after", expires.get("anchor"), expires.get("seconds"))
    batch = await run_in_threadpool(
        engine.create_batch, body["input_file_id"], body["endpoint"], metadata, ttl
    )
    return JSONResponse(batch.to_api())


async def list_batches(request: Request, engine: Engine) -> Response:
    limit = _int_param("limit", request.query_params.get("limit"), 20, 1, 100)
    items, has_more = engine.list_batches(request.query_params.get("after"), limit)
    return JSONResponse(_list_body(items, has_more))


async def get_batch(request: Request, engine: Engine) -> Response:
    batch: BatchRecord = engine.get_batch(request.path_params["batch_id"])
    return JSONResponse(batch.to_api())


async def cancel_batch(request: Request, engine: Engine) -> Response:
    batch = await run_in_threadpool(engine.cancel_batch, request.path_params["batch_id"])
    return JSONResponse(batch.to_api())
