"""Two storage roots (staging and production, or two people) may run the same job name on the same
date against one API account: neither takes the other's batches for its own strays, cancels them,
or counts their usage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from flows.stages import pipeline
from tasks.runs import layout_for, load_manifest
from tasks.samples import support_tickets
from tasks.storage import ObjectStore
from tests.integration.helpers import assert_every_row_exactly_once, chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
RUN_DATE = "2026-11-24"


def test_runs_of_one_job_and_date_in_two_roots_stay_apart(tmp_path: Path, emulator: Any) -> None:
    jobs = []
    for name, rows in (("a", 30), ("b", 20)):
        base = tmp_path / name
        base.mkdir()
        pq.write_table(support_tickets(rows), base / "tickets.parquet")
        jobs.append((chat_job(base / "tickets.parquet", base), rows))
    for job, _ in jobs:
        pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.1)
    stats = emulator.stats()
    assert stats["batches"]["created"] == 2
    assert stats["batches"]["by_status"] == {"completed": 2}  # neither cancelled the other's
    for job, rows in jobs:
        ids = [f"T-{i:06d}" for i in range(1, rows + 1)]
        assert_every_row_exactly_once(job, RUN_DATE, ids)
        manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
        assert manifest.stray_batches == []
        assert manifest.cost_record_uri is not None
        record = pq.read_table(manifest.cost_record_uri).to_pylist()
        assert sum(r["billed_lines"] for r in record) == rows  # only its own usage
