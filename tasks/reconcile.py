"""Reconciliation: batches at the provider that carry a run's metadata but are no shard's batch.

Leases make new strays impossible, but a run may meet batches left by an older version, by hand, or
by a process that lost its lease after creating. Such a batch is cancelled while open and, once
terminal, its billed usage (every line of its output and error files that carries usage) is counted
in the run's cost record, so the record always equals what the provider billed for the run. Its
results are never served: every row's answer comes from its shard's own batch. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from schemas.manifest import TERMINAL_BATCH_STATUSES, RunManifest, StrayBatch
from tasks.costing import usage_from_body

if TYPE_CHECKING:  # the adapter's record type only: this module talks to no API
    from tasks.batch_api import BatchInfo

USAGE_KEYS = (
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)


def run_metadata_filter(run_id: str) -> dict[str, str]:
    return {"nightbatch_run": run_id[:512]}


def strays_of(manifest: RunManifest, batches: Iterable[BatchInfo], now: str) -> list[StrayBatch]:
    """The batches of this run (by metadata) that no shard records and that are not known yet."""
    known = {s.batch_id for s in manifest.shards if s.batch_id}
    known |= {s.batch_id for s in manifest.stray_batches}
    return [
        StrayBatch(
            batch_id=b.id,
            shard_id=b.metadata.get("nightbatch_shard", "?"),
            attempt=int(b.metadata.get("nightbatch_attempt", "0") or 0),
            status=b.status,
            input_file_id=b.input_file_id,
            output_file_id=b.output_file_id,
            error_file_id=b.error_file_id,
            found_at=now,
        )
        for b in batches
        if b.id not in known
    ]


def open_strays(manifest: RunManifest) -> list[StrayBatch]:
    return [s for s in manifest.stray_batches if s.status not in TERMINAL_BATCH_STATUSES]


def uncounted_strays(manifest: RunManifest) -> list[StrayBatch]:
    return [s for s in manifest.stray_batches if not s.usage_counted]


def with_stray(manifest: RunManifest, stray: StrayBatch, now: str) -> RunManifest:
    """Add or replace one stray batch record."""
    others = [s for s in manifest.stray_batches if s.batch_id != stray.batch_id]
    return manifest.model_copy(update={"stray_batches": [*others, stray], "updated_at": now})


def billed_usage_of_lines(
    lines: Iterable[bytes], endpoint: str, model: str
) -> dict[str, dict[str, int]]:
    """Token totals per model of every line that carries usage (output and error files alike)."""
    totals: dict[str, dict[str, int]] = {}
    for line in _nonempty(lines):
        record: Any = orjson.loads(line)
        body = ((record.get("response") or {}).get("body")) or {}
        if not isinstance(body, dict) or not body.get("usage"):
            continue
        usage = usage_from_body(endpoint, body["usage"])
        acc = totals.setdefault(
            str(body.get("model") or model), {"lines": 0, **dict.fromkeys(USAGE_KEYS, 0)}
        )
        acc["lines"] += 1
        for key in USAGE_KEYS:
            acc[key] += int(getattr(usage, key))
    return totals


def add_usage(into: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> None:
    for model, counts in more.items():
        acc = into.setdefault(model, {"lines": 0, **dict.fromkeys(USAGE_KEYS, 0)})
        for key, value in counts.items():
            acc[key] = acc.get(key, 0) + value


def _nonempty(lines: Iterable[bytes]) -> Iterator[bytes]:
    return (line for line in lines if line.strip())
