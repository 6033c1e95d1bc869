"""Operators' commands: status, retry, abandon, costs; estimates learn from past runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from flows.stages import pipeline, prepare, submit
from schemas.settings import Settings
from tasks.runs import layout_for, load_manifest
from tasks.samples import support_tickets
from tasks.storage import ObjectStore
from tests.integration.helpers import assert_every_row_exactly_once, chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
RUN_DATE = "2026-11-24"
IDS = [f"T-{i:06d}" for i in range(1, 41)]


@pytest.fixture
def job_file(tmp_path: Path) -> tuple[Any, Path]:
    pq.write_table(support_tickets(40), tmp_path / "tickets.parquet")
    job = chat_job(
        tmp_path / "tickets.parquet",
        tmp_path,
        retry={"max_attempts": 1},
        tags={"feature": "triage"},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    return job, path


def test_status_shows_attempts_and_errors_by_reason(
    job_file: tuple[Any, Path], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job, path = job_file
    emulator.configure(
        faults={
            "forced_line_failures": {
                "r-T-000001": "context_length_exceeded",
                "r-T-000002": "server_error",
            }
        }
    )
    assert main(["run", str(path), "--run-date", RUN_DATE, "--poll-interval", "0.1"]) == 0
    summary = capsys.readouterr().out
    assert "enriched      : 38 (0 served from the result cache)" in summary
    assert "dead-lettered : 2" in summary
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"triage-{RUN_DATE}: loaded" in out
    assert (
        "errors by reason: " in out
        and "context_length_exceeded=1" in out
        and "server_error=1" in out
    )
    assert "attempt 1" in out and "dead-lettered: 2" in out


def test_retry_gives_failed_rows_more_attempts(job_file: tuple[Any, Path], emulator: Any) -> None:
    job, path = job_file
    emulator.configure(
        faults={"forced_line_failures": {"r-T-000003": {"kind": "server_error", "times": 1}}}
    )
    assert main(["run", str(path), "--run-date", RUN_DATE, "--poll-interval", "0.1"]) == 0
    _, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.column("row_id").to_pylist() == ["T-000003"]  # max_attempts 1: out of attempts

    assert main(["retry", str(path), "--run-date", RUN_DATE, "--poll-interval", "0.1"]) == 0
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.num_rows == 0 and output.num_rows == 40
    cost = pq.read_table(load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).cost_record_uri)
    assert cost.num_rows == 1 and cost.column("requests_succeeded")[0].as_py() == 40


def test_abandon_cancels_open_batches(
    job_file: tuple[Any, Path], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job, path = job_file
    emulator.configure(lines_per_second=0.5)
    prepare(job, RUN_DATE)
    submit(job, RUN_DATE, continue_run=False)
    assert main(["abandon", str(path), "--run-date", RUN_DATE]) == 0
    assert "abandoned; cancelled batches: batch_" in capsys.readouterr().out
    manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
    assert manifest.status == "abandoned"
    statuses = {b["status"] for b in emulator.stats()["batches"]["items"]}
    assert statuses <= {"cancelling", "cancelled"}


def test_costs_by_job_day_and_tag_and_estimates_learn_from_past_runs(
    job_file: tuple[Any, Path], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job, path = job_file
    job = job.model_copy(update={"cache": job.cache.model_copy(update={"enabled": False})})
    first = pipeline(job, run_date="2026-11-23", poll_interval_seconds=0.1)
    second = pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.1)
    store = ObjectStore()
    past = pq.read_table(first["cost_record"]).to_pylist()[0]
    estimate = load_manifest(store, layout_for(job, RUN_DATE)).estimate
    assert estimate is not None
    mean = (
        past["output_tokens"] / past["billed_lines"]
    )  # the first run had no history: bounded by max_tokens
    assert load_manifest(store, layout_for(job, "2026-11-23")).estimate.output_tokens == 40 * 100  # type: ignore[union-attr]
    assert estimate.output_tokens == 40 * -(-mean // 1)
    capsys.readouterr()
    assert main(["costs", str(path)]) == 0
    out = capsys.readouterr().out
    total = (
        past["cost_batch_usd"]
        + pq.read_table(second["cost_record"]).column("cost_batch_usd")[0].as_py()
    )
    assert "by job:" in out and "by run_date:" in out and "feature=triage" in out
    assert f"{round(total, 6):.6f}" in out and "50.0" in out


def test_cache_maintenance_prunes_old_segments_and_merges_the_rest(
    job_file: tuple[Any, Path],
) -> None:
    """The weekly flow, on a real Prefect API: segments past the cutoff are deleted, the small ones
    left are merged into one, and the merged entries are still served."""
    from datetime import UTC, datetime, timedelta

    import pyarrow as pa

    from flows.stages import cache_maintenance
    from schemas.tables import results_schema
    from tasks.cache import ResultCache, cache_key, key_array

    job, path = job_file
    cache = ResultCache(ObjectStore(), job.storage_root, job, Settings.from_env().api_identity)
    now = datetime.now(UTC)
    keys = [cache_key(job.request.endpoint, str(i).encode()) for i in range(6)]
    for i, key in enumerate(keys):  # two segments 100 days old, four recent ones
        row = {"custom_id": f"r-{i}", "attempt": 1}
        table = pa.Table.from_pylist([row], schema=results_schema(job.request))
        when = (now - timedelta(days=100 if i < 2 else 1)).isoformat()
        cache.write_segment(f"s{i}", [key], table, f"run-{i}", when)
    result = cache_maintenance(job=str(path), prune_older_than_days=90)
    assert result == {"pruned": 2, "segments_before": 4, "segments_after": 1}
    hits = pa.table({"custom_id": [f"h{i}" for i in range(6)], "cache_key": key_array(keys)})
    served = [r for t in cache.served_entries(hits, None, now) for r in t.to_pylist()]
    assert sorted(r["run_id"] for r in served) == [f"run-{i}" for i in range(2, 6)]
