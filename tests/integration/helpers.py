"""Assertions shared by the integration tests: nothing lost, nothing duplicated, nothing paid twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.job import JobSpec
from tasks.runs import layout_for, load_manifest
from tasks.storage import ObjectStore


def chat_job(source: Path, base: Path, **overrides: Any) -> JobSpec:
    spec: dict[str, Any] = {
        "name": "triage",
        "source": {
            "uri": str(source),
            "id_column": "ticket_id",
            "columns": ["ticket_id", "subject"],
        },
        "request": {
            "model": "gpt-4o-mini",
            "template": "Subject: {subject}\n\n{body}",
            "params": {"max_tokens": 100},
            "output_schema": {
                "type": "object",
                "properties": {"category": {"type": "string", "enum": ["billing", "other"]}},
            },
        },
        "output_uri": str(base / "output"),
        "storage_root": str(base / "state"),
        "limits": {"max_lines_per_shard": 40},
        "retry": {"max_attempts": 4},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return JobSpec.model_validate(spec)


def outcome_tables(job: JobSpec, run_date: str) -> tuple[pa.Table, pa.Table]:
    manifest = load_manifest(ObjectStore(), layout_for(job, run_date))
    assert manifest.status == "loaded"
    assert manifest.output_file_uri and manifest.dead_letter_uri
    return pq.read_table(manifest.output_file_uri), pq.read_table(manifest.dead_letter_uri)


def assert_every_row_exactly_once(
    job: JobSpec, run_date: str, expected_ids: list[str]
) -> tuple[pa.Table, pa.Table]:
    output, dead = outcome_tables(job, run_date)
    out_ids = output.column(job.source.id_column).to_pylist()
    dead_ids = dead.column("row_id").to_pylist()
    assert len(out_ids) == len(set(out_ids)), "a row appears twice in the output"
    assert len(dead_ids) == len(set(dead_ids)), "a row appears twice in the dead letter"
    assert not set(out_ids) & set(dead_ids), "a row is both enriched and dead-lettered"
    assert sorted(out_ids + dead_ids) == sorted(expected_ids), "rows lost or invented"
    return output, dead


def assert_one_batch_per_shard_attempt(stats: dict[str, Any]) -> None:
    keys = Counter(
        (b["metadata"].get("nightbatch_run"), b["metadata"].get("nightbatch_shard"))
        for b in stats["batches"]["items"]
    )
    duplicated = {k: n for k, n in keys.items() if n > 1}
    assert not duplicated, f"shards submitted more than once: {duplicated}"


def assert_no_orphan_uploads(stats: dict[str, Any]) -> None:
    used = {b["input_file_id"] for b in stats["batches"]["items"]}
    live_inputs = {
        fid
        for fid, f in stats["files"]["items"].items()
        if f["purpose"] == "batch" and not f["deleted"]
    }
    assert live_inputs <= used, f"uploaded files no batch uses: {live_inputs - used}"
