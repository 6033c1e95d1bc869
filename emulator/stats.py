"""The /_emulator/stats document: files, batches, billed usage per model and API call counts."""

from __future__ import annotations

from collections import Counter
from typing import Any

from emulator.models import BatchRecord, FileRecord, Usage


def build_stats(
    now: float,
    clock_scale: float,
    files: list[FileRecord],
    batches: list[BatchRecord],
    api_calls: Counter[str],
) -> dict[str, Any]:
    """`batches` in creation order; usage counts successful lines only (those of expired and cancelled
    batches included)."""
    files = sorted(files, key=lambda f: f.seq)
    usage: dict[str, Usage] = {}
    for batch in batches:
        if batch.model is not None and batch.usage.requests:
            usage.setdefault(batch.model, Usage()).add(batch.usage)
    return {
        "now": int(now),
        "clock_scale": clock_scale,
        "files": {
            "created": len(files),
            "by_purpose": dict(Counter(f.purpose for f in files)),
            "items": {
                f.id: {
                    "filename": f.filename,
                    "purpose": f.purpose,
                    "bytes": f.bytes,
                    "created_at": f.created_at,
                    "deleted": f.deleted,
                }
                for f in files
            },
        },
        "batches": {
            "created": len(batches),
            "by_status": dict(Counter(b.status for b in batches)),
            "items": [_batch_stats(b) for b in batches],
        },
        "batches_per_input_file": dict(Counter(b.input_file_id for b in batches)),
        "usage": {model: u.model_dump() for model, u in usage.items()},
        "api_calls": dict(api_calls),
    }


def _batch_stats(batch: BatchRecord) -> dict[str, Any]:
    return {
        "id": batch.id,
        "seq": batch.seq,
        "status": batch.status,
        "input_file_id": batch.input_file_id,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "metadata": batch.metadata,
        "endpoint": batch.endpoint,
        "model": batch.model,
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "input_tokens": batch.input_tokens,
        "usage": batch.usage.model_dump(),
        "errors": batch.errors,
    }
