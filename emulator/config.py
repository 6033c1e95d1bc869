"""Emulator settings: timing, limits, models and fault injection, as one pydantic model.

`EmulatorConfig` is given at start (constructor, `--config` file, CLI flags) and can be changed at run time
with `EmulatorServer.configure(...)` or `POST /_emulator/config`; `apply_changes` merges such a partial
change into a config (sub-models merge field by field, every other value is replaced).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LineFaultKind = Literal[
    "rate_limit_exceeded", "server_error", "context_length_exceeded", "request_timeout"
]
LINE_FAULT_KINDS: tuple[LineFaultKind, ...] = (
    "rate_limit_exceeded",
    "server_error",
    "context_length_exceeded",
    "request_timeout",
)

DEFAULT_MODELS = [
    "gpt-3.5-turbo",
    "gpt-4",
    "gpt-4-turbo",
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-5.1",
    "gpt-5.2",
    "gpt-5.4",
    "gpt-5.5",
    "gpt-5.6",
    "gpt-6",
    "gpt-6.1",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ForcedLineFailure(_Strict):
    """Make every line with a given custom_id fail with `kind` (in at most `times` batches)."""

    kind: LineFaultKind
    times: int | None = Field(default=None, ge=0)


class RouteFault(_Strict):
    """Make the next `times` matching API calls (after letting `skip` through) answer `status`."""

    route: str
    status: int = Field(default=500, ge=400, le=599)
    times: int = Field(default=1, ge=0)
    skip: int = Field(default=0, ge=0)
    retry_after: float | None = Field(default=None, ge=0)
    execute: bool = False

    @field_validator("route")
    @classmethod
    def _normalise_route(cls, value: str) -> str:
        return normalise_route(value)


class ExpireFault(_Strict):
    """Expire a batch once `fraction` of its lines have finished (in at most `times` batches)."""

    fraction: float = Field(ge=0.0, le=1.0)
    times: int | None = Field(default=None, ge=0)


class StuckFault(_Strict):
    """Keep batches in `finalizing` while this fault is set (at most `times` batches get stuck)."""

    times: int | None = Field(default=None, ge=0)


class FaultConfig(_Strict):
    line_failure_rates: dict[LineFaultKind, float] = Field(default_factory=dict)
    forced_line_failures: dict[str, ForcedLineFailure] = Field(default_factory=dict)
    expire_after_fraction: ExpireFault | None = None
    stuck_in_finalizing: StuckFault | None = None
    route_faults: list[RouteFault] = Field(default_factory=list)

    @field_validator("line_failure_rates")
    @classmethod
    def _check_rates(cls, rates: dict[LineFaultKind, float]) -> dict[LineFaultKind, float]:
        if any(rate < 0 for rate in rates.values()) or sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError("line failure rates must be >= 0 and add up to at most 1")
        return rates

    @field_validator("forced_line_failures", mode="before")
    @classmethod
    def _forced_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"kind": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("expire_after_fraction", mode="before")
    @classmethod
    def _expire_shorthand(cls, value: Any) -> Any:
        return {"fraction": value} if isinstance(value, int | float) else value

    @field_validator("stuck_in_finalizing", mode="before")
    @classmethod
    def _stuck_shorthand(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


class EmulatorConfig(_Strict):
    """Every setting of the emulator; emulator/README.md describes each one."""

    seed: int = 0  # seed of the line-fault draws (ids and content do not depend on it)
    # time: emulated seconds per real second, and emulated durations
    clock_scale: float = Field(default=60.0, gt=0)
    validating_seconds: float = Field(default=6.0, ge=0)
    lines_per_second: float = Field(default=20.0, gt=0)
    finalizing_seconds: float = Field(default=6.0, ge=0)
    cancelling_seconds: float = Field(default=6.0, ge=0)
    # usage
    cached_token_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    cached_token_min_prompt: int = Field(default=1024, ge=0)
    reasoning_tokens_min: int = Field(default=64, ge=0)
    reasoning_tokens_max: int = Field(default=256, ge=0)
    reasoning_model_prefixes: list[str] = Field(default_factory=lambda: ["o1", "o3", "o4", "gpt-5"])
    # models and limits
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    context_window_tokens: int = Field(default=128_000, gt=0)
    token_limits: dict[str, int] = Field(default_factory=dict)
    default_token_limit: int | None = Field(default=None, ge=0)
    max_batch_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    max_file_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    max_requests_per_batch: int = Field(default=50_000, gt=0)
    max_embedding_inputs_per_batch: int = Field(default=50_000, gt=0)
    # behaviour
    shuffle_output: bool = True
    api_key: str | None = None  # None: any non-empty bearer token is accepted
    tick_seconds: float = Field(default=0.02, gt=0)  # real seconds between worker passes
    faults: FaultConfig = Field(default_factory=FaultConfig)

    @model_validator(mode="after")
    def _check_reasoning_range(self) -> EmulatorConfig:
        if self.reasoning_tokens_min > self.reasoning_tokens_max:
            raise ValueError("reasoning_tokens_min must not exceed reasoning_tokens_max")
        return self

    def token_limit_for(self, model: str) -> int | None:
        return self.token_limits.get(model, self.default_token_limit)


def normalise_route(route: str) -> str:
    """'post /v1/batches/{batch_id}' -> 'POST /batches/{id}' (method upper-case, no /v1, params as {id})."""
    method, _, path = route.strip().partition(" ")
    path = path.strip()
    if path.startswith("/v1/"):
        path = path[3:]
    parts = ["{id}" if p.startswith("{") and p.endswith("}") else p for p in path.split("/")]
    return f"{method.upper()} {'/'.join(parts).rstrip('/') or '/'}"


def apply_changes(config: BaseModel, changes: dict[str, Any]) -> Any:
    """A copy of `config` with `changes` applied: nested models merge key by key, other values replace."""
    data = config.model_dump()
    for key, value in changes.items():
        current = getattr(config, key, None)
        if isinstance(current, BaseModel) and isinstance(value, dict):
            data[key] = apply_changes(current, value).model_dump()
        elif isinstance(value, BaseModel):
            data[key] = value.model_dump()
        else:
            data[key] = value
    return type(config).model_validate(data)


def changed_paths(changes: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted names of every field a change touches ('faults', 'faults.route_faults', ...)."""
    paths: set[str] = set()
    for key, value in changes.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict) and key == "faults":
            paths |= changed_paths(value, prefix=f"{path}.")
    return paths
