"""The Starlette application: /v1 routes behind auth and route faults, plus the /_emulator admin routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from emulator import api
from emulator.api import JSONResponse
from emulator.config import RouteFault
from emulator.engine import Engine
from emulator.errors import NO_API_KEY, ApiError, error_body
from emulator.faults import route_fault_body

Handler = Callable[[Request, Engine], Awaitable[Response]]

V1_ROUTES: list[tuple[str, str, str, Handler]] = [
    # (method, path under /v1, route key used by route faults and api_calls, handler)
    ("POST", "/files", "POST /files", api.create_file),
    ("GET", "/files", "GET /files", api.list_files),
    ("GET", "/files/{file_id}", "GET /files/{id}", api.get_file),
    ("GET", "/files/{file_id}/content", "GET /files/{id}/content", api.file_content),
    ("DELETE", "/files/{file_id}", "DELETE /files/{id}", api.delete_file),
    ("POST", "/batches", "POST /batches", api.create_batch),
    ("GET", "/batches", "GET /batches", api.list_batches),
    ("GET", "/batches/{batch_id}", "GET /batches/{id}", api.get_batch),
    ("POST", "/batches/{batch_id}/cancel", "POST /batches/{id}/cancel", api.cancel_batch),
]


def error_response(error: ApiError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _check_auth(request: Request, api_key: str | None) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, NO_API_KEY)
    if api_key is not None and token != api_key:
        shown = f"{token[:3]}*****{token[-4:]}" if len(token) > 8 else "*****"
        raise ApiError(
            401,
            f"Incorrect API key provided: {shown}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )


def _fault_response(fault: RouteFault) -> Response:
    headers = {}
    if fault.retry_after is not None:
        headers["retry-after"] = f"{fault.retry_after:g}"
    return JSONResponse(route_fault_body(fault), status_code=fault.status, headers=headers)


def _v1_endpoint(engine: Engine, route: str, handler: Handler) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        try:
            _check_auth(request, engine.config.api_key)
            fault = engine.route_call(route)
            if fault is not None and not fault.execute:
                return _fault_response(fault)
            response = await handler(request, engine)
            return _fault_response(fault) if fault is not None else response
        except ApiError as error:
            return error_response(error)

    return endpoint


def _admin_routes(engine: Engine) -> list[Route]:
    async def stats(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(engine.stats))

    async def get_config(request: Request) -> Response:
        return JSONResponse(engine.config.model_dump(mode="json"))

    async def set_config(request: Request) -> Response:
        try:
            changes = orjson.loads(await request.body() or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object of config changes")
            config = await run_in_threadpool(lambda: engine.configure(**changes))
        except (ValueError, ValidationError) as exc:
            return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)
        return JSONResponse(config.model_dump(mode="json"))

    async def clock(request: Request) -> Response:
        body = orjson.loads(await request.body() or b"{}")
        seconds = float(body.get("advance_seconds", 0)) if isinstance(body, dict) else 0.0
        now = engine.advance_clock(seconds)
        return JSONResponse({"now": int(now), "clock_scale": engine.clock.scale})

    return [
        Route("/_emulator/stats", stats, methods=["GET"]),
        Route("/_emulator/config", get_config, methods=["GET"]),
        Route("/_emulator/config", set_config, methods=["POST"]),
        Route("/_emulator/clock", clock, methods=["POST"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"Invalid URL ({request.method} {request.url.path})"
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=status)


def create_app(engine: Engine) -> Starlette:
    routes = [
        Route(f"/v1{path}", _v1_endpoint(engine, key, handler), methods=[method])
        for method, path, key, handler in V1_ROUTES
    ]
    return Starlette(
        routes=routes + _admin_routes(engine),
        exception_handlers={HTTPException: _http_error},
    )
