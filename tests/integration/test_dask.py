"""Shard-level tasks run on any Prefect task runner: a local Dask cluster (separate processes) gives
the same output as the default thread pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from prefect_dask import DaskTaskRunner

from flows.stages import pipeline
from tasks.samples import support_tickets
from tests.integration.helpers import chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
RUN_DATE = "2026-11-24"
COMPARED = [
    "ticket_id",
    "subject",
    "category",
    "nb_custom_id",
    "nb_status",
    "nb_attempt",
    "nb_model",
]


def test_a_job_on_a_local_dask_cluster_gives_the_same_output(tmp_path: Path, emulator: Any) -> None:
    pq.write_table(support_tickets(90), tmp_path / "tickets.parquet")
    threads_job = chat_job(
        tmp_path / "tickets.parquet", tmp_path / "threads", limits={"max_lines_per_shard": 30}
    )
    dask_job = chat_job(
        tmp_path / "tickets.parquet", tmp_path / "dask", limits={"max_lines_per_shard": 30}
    )

    on_threads = pipeline(threads_job, run_date=RUN_DATE, poll_interval_seconds=0.1)
    runner = DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "processes": True, "dashboard_address": None}
    )
    on_dask = pipeline.with_options(task_runner=runner)(
        dask_job, run_date=RUN_DATE, poll_interval_seconds=0.1
    )

    assert on_dask["status"] == on_threads["status"] == "loaded"
    assert on_dask["shards"] == {"collected": 3}
    threads_rows = pq.read_table(on_threads["output"]).select(COMPARED).sort_by("ticket_id")
    dask_rows = pq.read_table(on_dask["output"]).select(COMPARED).sort_by("ticket_id")
    assert threads_rows.num_rows == 90
    assert dask_rows.equals(threads_rows)
