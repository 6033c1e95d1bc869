"""Failures without loss or double billing, driven by the emulator's fault injection over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pyarrow.parquet as pq
import pytest

from flows.stages import pipeline, prepare, submit
from tasks.errors import RunWentBadlyError
from tasks.runs import layout_for, load_manifest
from tasks.samples import support_tickets
from tasks.storage import ObjectStore
from tests.integration.helpers import (
    assert_every_row_exactly_once,
    assert_no_orphan_uploads,
    assert_one_batch_per_shard_attempt,
    chat_job,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")
RUN_DATE = "2026-11-24"
ROWS = 100
IDS = [f"T-{i:06d}" for i in range(1, ROWS + 1)]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "tickets.parquet"
    pq.write_table(support_tickets(ROWS), path)
    return path


def run(job: Any) -> dict[str, Any]:
    """The run's summary, and whether the flow run ended Failed (a loaded run that went badly)."""
    state = pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.1, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, RunWentBadlyError):
        result = result.summary
    assert isinstance(result, dict), result
    return {**result, "failed": state.is_failed()}


def test_random_429_and_500_lines_are_retried_until_they_succeed(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    emulator.configure(
        faults={"line_failure_rates": {"rate_limit_exceeded": 0.2, "server_error": 0.1}}
    )
    job = chat_job(source, tmp_path, retry={"max_attempts": 8})
    run(job)
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.num_rows == 0
    assert max(output.column("nb_attempt").to_pylist()) > 1  # some rows needed a retry
    stats = emulator.stats()
    assert_one_batch_per_shard_attempt(stats)
    # billed once: the emulator billed exactly the succeeded lines, and so does the cost record
    record = pq.read_table(
        load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).cost_record_uri
    ).to_pylist()[0]
    assert record["billed_lines"] == stats["usage"]["gpt-4o-mini"]["requests"] == ROWS
    assert record["input_tokens"] == stats["usage"]["gpt-4o-mini"]["input_tokens"]


def test_400_lines_go_to_the_dead_letter_without_retry(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    emulator.configure(
        faults={
            "forced_line_failures": {
                "r-T-000007": "context_length_exceeded",
                "r-T-000042": "context_length_exceeded",
            }
        }
    )
    job = chat_job(source, tmp_path)
    run(job)
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert sorted(dead.column("row_id").to_pylist()) == ["T-000007", "T-000042"]
    assert set(dead.column("code").to_pylist()) == {"context_length_exceeded"}
    assert set(dead.column("reason").to_pylist()) == {"permanent_error"}
    assert set(dead.column("attempts").to_pylist()) == {1}
    assert output.num_rows == ROWS - 2
    assert_one_batch_per_shard_attempt(emulator.stats())


def test_exhausted_retries_are_dead_lettered_with_the_last_error(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    emulator.configure(faults={"forced_line_failures": {"r-T-000003": "server_error"}})
    job = chat_job(source, tmp_path, retry={"max_attempts": 2})
    run(job)
    _, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.to_pylist() == [
        {
            "custom_id": "r-T-000003", "row_id": "T-000003", "reason": "retries_exhausted",
            "code": "server_error", "message": dead.column("message")[0].as_py(), "attempts": 2,
        }
    ]  # fmt: skip


def test_expired_batch_keeps_its_partial_output_and_retries_the_rest(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    emulator.configure(faults={"expire_after_fraction": {"fraction": 0.5, "times": 1}})
    job = chat_job(source, tmp_path, limits={"max_lines_per_shard": 100})
    run(job)
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.num_rows == 0
    attempts = output.column("nb_attempt").to_pylist()
    assert attempts.count(1) >= 40 and attempts.count(2) >= 40  # half salvaged, half resent
    stats = emulator.stats()
    assert stats["batches"]["by_status"] == {"expired": 1, "completed": 1}
    assert_one_batch_per_shard_attempt(stats)
    # the expired batch's finished lines are billed once, with the resent ones: every row once
    manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
    record = pq.read_table(manifest.cost_record_uri).to_pylist()[0]
    assert record["billed_lines"] == stats["usage"]["gpt-4o-mini"]["requests"] == ROWS
    assert record["input_tokens"] == stats["usage"]["gpt-4o-mini"]["input_tokens"]


def test_cancelled_batch_keeps_its_partial_output_and_retries_the_rest(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    emulator.configure(lines_per_second=2.0)  # slow enough to cancel mid-batch
    job = chat_job(source, tmp_path, limits={"max_lines_per_shard": 100})
    prepare(job, RUN_DATE)
    submit(job, RUN_DATE, continue_run=False)
    batch_id = load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).shards[0].batch_id
    client = openai.OpenAI(max_retries=0)
    import time

    while client.batches.retrieve(batch_id).request_counts.completed < 5:  # type: ignore[union-attr]
        time.sleep(0.05)
    client.batches.cancel(batch_id)
    emulator.configure(lines_per_second=2000.0)
    run(job)
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.num_rows == 0
    assert (
        1 in output.column("nb_attempt").to_pylist()
        and 2 in output.column("nb_attempt").to_pylist()
    )
    assert emulator.stats()["batches"]["by_status"] == {"cancelled": 1, "completed": 1}


def test_a_batch_that_fails_validation_is_surfaced_and_dead_lettered(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    emulator.configure(models=["gpt-5"])  # the job's model is "not supported by the Batch API"
    job = chat_job(source, tmp_path, limits={"max_lines_per_shard": 100})
    result = run(job)
    _, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.num_rows == ROWS
    assert result["failed"] and result["status"] == "loaded"  # loaded, and it says it went badly
    assert f"{ROWS} of {ROWS} rows (100.0%) are in the dead letter" in result["went_badly"]
    assert "model_not_found" in result["went_badly"]
    assert set(dead.column("code").to_pylist()) == {"model_not_found"}
    assert "not supported by the Batch API" in dead.column("message")[0].as_py()
    assert set(dead.column("reason").to_pylist()) == {"permanent_error"}
    assert emulator.stats()["batches"]["created"] == 1  # a validation failure is not retried


def test_token_limit_exceeded_batches_are_requeued_not_failed(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    job = chat_job(source, tmp_path, limits={"max_lines_per_shard": 25})
    prepared = prepare(job, RUN_DATE)
    shard_tokens = [
        s.input_tokens for s in load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).shards
    ]
    assert prepared["shards"] == {"prepared": 4}
    # room for two shards at a time: the other two are refused with token_limit_exceeded
    emulator.configure(token_limits={"gpt-4o-mini": max(shard_tokens) * 2 + 1})
    run(job)
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.num_rows == 0
    stats = emulator.stats()
    assert stats["batches"]["by_status"].get("failed", 0) >= 1
    assert {e["code"] for b in stats["batches"]["items"] for e in (b["errors"] or [])} == {
        "token_limit_exceeded"
    }
    assert_one_batch_per_shard_attempt(stats)


def test_admission_control_keeps_the_queue_under_the_limit(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    job = chat_job(source, tmp_path, limits={"max_lines_per_shard": 25})
    prepare(job, RUN_DATE)
    limit = (
        max(s.input_tokens for s in load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).shards)
        * 2
        + 1
    )
    emulator.configure(token_limits={"gpt-4o-mini": limit})
    job = job.model_copy(
        update={"limits": job.limits.model_copy(update={"max_enqueued_tokens": limit})}
    )
    run(job)
    assert_every_row_exactly_once(job, RUN_DATE, IDS)
    stats = emulator.stats()
    assert stats["batches"]["by_status"] == {"completed": 4}  # nothing refused


def test_api_500s_on_create_retrieve_and_content_are_retried(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    emulator.configure(
        faults={
            "route_faults": [
                {"route": "POST /batches", "status": 500, "times": 2},
                {"route": "GET /batches/{id}", "status": 500, "times": 3},
                {"route": "GET /files/{id}/content", "status": 429, "times": 2, "retry_after": 0.1},
            ]
        }
    )
    job = chat_job(source, tmp_path)
    run(job)
    assert_every_row_exactly_once(job, RUN_DATE, IDS)
    stats = emulator.stats()
    assert stats["batches"]["created"] == 3
    assert_one_batch_per_shard_attempt(stats)
    assert_no_orphan_uploads(stats)


def test_batch_created_but_response_lost_creates_no_second_batch(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    emulator.configure(
        faults={
            "route_faults": [{"route": "POST /batches", "status": 500, "times": 3, "execute": True}]
        }
    )
    job = chat_job(source, tmp_path)
    run(job)
    assert_every_row_exactly_once(job, RUN_DATE, IDS)
    stats = emulator.stats()
    assert stats["batches"]["created"] == 3
    assert_one_batch_per_shard_attempt(stats)
    assert_no_orphan_uploads(stats)


def test_emulator_restart_mid_run_loses_nothing(
    tmp_path: Path, source: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emulator.server import EmulatorServer

    emulator.configure(lines_per_second=50.0)
    monkeypatch.setenv("NIGHTBATCH_API_IDENTITY", "test-emulator")  # the same API on a new port
    job = chat_job(source, tmp_path)
    prepare(job, RUN_DATE)
    submit(job, RUN_DATE, continue_run=False)
    state_dir = tmp_path / "emulator-state"
    emulator.stop()
    with EmulatorServer(state_dir) as restarted:
        monkeypatch.setenv("OPENAI_BASE_URL", restarted.base_url)
        restarted.configure(lines_per_second=2000.0)
        run(job)
        assert_every_row_exactly_once(job, RUN_DATE, IDS)
        stats = restarted.stats()
        assert stats["batches"]["created"] == 3
        assert_one_batch_per_shard_attempt(stats)


def test_a_run_that_went_badly_loads_what_succeeded_and_exits_3(
    tmp_path: Path, source: Path, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Above limits.max_dead_letter_fraction the succeeded rows are still loaded, but the CLI
    exits 3 with the dead letter's path and its top reasons (not 0 with a quiet `enriched: 0`)."""
    import yaml

    from flows.cli import main

    failing = {f"r-T-{i:06d}": "context_length_exceeded" for i in range(1, 13)}  # 12 of 100
    emulator.configure(faults={"forced_line_failures": failing})
    job = chat_job(source, tmp_path, limits={"max_dead_letter_fraction": 0.1})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))

    code = main(["run", str(job_file), "--run-date", RUN_DATE, "--poll-interval", "0.1"])

    err = capsys.readouterr().err
    assert code == 3
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.num_rows == 12 and output.num_rows == ROWS - 12
    assert "12 of 100 rows (12.0%) are in the dead letter" in err
    assert "context_length_exceeded 12" in err and "dead_letter.parquet" in err
