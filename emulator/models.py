"""Persisted records (files, batches, billed usage) and their OpenAI-shaped JSON views."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
TERMINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


class FileRecord(BaseModel):
    id: str
    seq: int
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None = None
    deleted: bool = False

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class Usage(BaseModel):
    """Billed usage: successful lines only."""

    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, other: Usage | dict[str, int]) -> None:
        values = other.model_dump() if isinstance(other, Usage) else other
        for key, value in values.items():
            setattr(self, key, getattr(self, key) + value)

    def to_api(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.input_tokens + self.output_tokens,
        }


class BatchRecord(BaseModel):
    id: str
    seq: int
    seed: int = 0
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: int | None = None
    status: BatchStatus = "validating"
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    # emulated unix times (floats; the API shows them as ints)
    created_t: float
    expires_t: float
    validation_due_t: float
    in_progress_t: float | None = None
    finalizing_t: float | None = None
    finalize_due_t: float | None = None
    completed_t: float | None = None
    failed_t: float | None = None
    expired_t: float | None = None
    cancelling_t: float | None = None
    cancel_due_t: float | None = None
    cancelled_t: float | None = None
    # progress
    total: int = 0
    completed: int = 0
    failed: int = 0
    done: int = 0
    usage: Usage = Field(default_factory=Usage)
    input_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    # pace: `pace_done` lines were done at `pace_t`, then one every 1/lines_per_second (re-anchored
    # when lines_per_second is changed at run time)
    lines_per_second: float | None = None
    pace_t: float | None = None
    pace_done: int = 0
    # decisions taken once and kept, so a restart replays them
    expire_after_lines: int | None = None
    stuck: bool = False

    def time_when_done(self, lines: int) -> float:
        """Emulated time at which `lines` lines of the batch are finished, at the current pace."""
        assert self.pace_t is not None and self.lines_per_second
        return self.pace_t + (lines - self.pace_done) / self.lines_per_second

    def lines_due(self, when: float) -> int:
        """How many lines are finished by emulated time `when`, at the current pace."""
        assert self.pace_t is not None and self.lines_per_second
        return self.pace_done + math.floor((when - self.pace_t) * self.lines_per_second + 1e-9)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_api(self) -> dict[str, Any]:
        started = self.in_progress_t is not None
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": _ts(self.created_t),
            "in_progress_at": _ts(self.in_progress_t),
            "expires_at": int(self.created_t) + 86400,
            "finalizing_at": _ts(self.finalizing_t),
            "completed_at": _ts(self.completed_t),
            "failed_at": _ts(self.failed_t),
            "expired_at": _ts(self.expired_t),
            "cancelling_at": _ts(self.cancelling_t),
            "cancelled_at": _ts(self.cancelled_t),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": self.usage.to_api() if started else None,
            "metadata": self.metadata,
        }
