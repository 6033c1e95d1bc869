"""What a run needs next, when the poller starts a stage run again, and how stray batches are
counted: the pure decisions behind the deployed path."""

from __future__ import annotations

from pathlib import Path

import orjson

from schemas.manifest import Approval, RunManifest, Shard, StrayBatch
from tasks.advance import StageAttempt, decide_launch, key_prefix, next_step, step_key
from tasks.batch_api import BatchInfo
from tasks.reconcile import billed_usage_of_lines, strays_of
from tasks.runs import new_manifest
from tests.integration.helpers import chat_job

NOW = 2_000_000_000.0


def _manifest(*states: str, **update: object) -> RunManifest:
    shards = [
        Shard(
            shard_id=f"a1-s{i:05d}",
            attempt=1,
            index=i,
            request_uri="x",
            lines=1,
            bytes=1,
            input_tokens=1,
            sha256="h",
            state=state,
            batch_id=f"batch_{i}",  # type: ignore[arg-type]
        )  # fmt: skip
        for i, state in enumerate(states)
    ]
    job = chat_job(Path("t.parquet"), Path("/tmp"))
    return new_manifest(job, "2026-11-26", "t").model_copy(update={"shards": shards, **update})


def _stray(status: str, counted: bool = False) -> StrayBatch:
    return StrayBatch(
        batch_id="batch_x", shard_id="a1-s00000", attempt=1, status=status, found_at="t",
        usage_counted=counted,
    )  # fmt: skip


def test_next_step_follows_the_shards_strays_and_the_operator() -> None:
    assert next_step(_manifest("prepared", "submitted"), NOW) == "submit"
    assert next_step(_manifest("submitted", "terminal"), NOW) == "collect"
    assert next_step(_manifest("submitted", "collected"), NOW) == "wait"
    assert next_step(_manifest("collected"), NOW) == "finish"
    assert next_step(_manifest("collected", stray_batches=[_stray("cancelling")]), NOW) == "wait"
    assert next_step(_manifest("collected", stray_batches=[_stray("cancelled")]), NOW) == "collect"
    counted = [_stray("cancelled", counted=True)]
    assert next_step(_manifest("collected", stray_batches=counted), NOW) == "finish"
    pending = Approval(requested_at="t", requested_by="run-1", expires_at=NOW + 60)
    assert next_step(_manifest("prepared", approval=pending), NOW) == "approval"
    assert next_step(_manifest("prepared", approval=pending), NOW + 61) == "submit"  # expired
    rejected = pending.model_copy(update={"decision": "rejected"})
    assert next_step(_manifest("prepared", approval=rejected), NOW) == "blocked"
    assert next_step(_manifest("collected", status="loaded"), NOW) == "done"


def test_stage_keys_change_with_the_run_and_count_attempts() -> None:
    manifest = _manifest("terminal", "submitted")
    first, second = step_key(manifest, "collect"), step_key(manifest, "collect", 2)
    assert first.endswith(":1") and second.endswith(":2")
    assert key_prefix(first) == key_prefix(second)
    moved = _manifest("collected", "submitted")
    assert key_prefix(step_key(moved, "collect")) != key_prefix(first)


def test_the_poller_starts_leaves_restarts_and_gives_up() -> None:
    def decide(*attempts: StageAttempt) -> tuple[str, int]:
        launch = decide_launch(
            attempts, NOW, timeout_seconds=600, max_attempts=3, backoff_seconds=60
        )
        return launch.action, launch.attempt

    assert decide() == ("start", 1)
    running = StageAttempt(1, "RUNNING", "fr-1", started_at=NOW - 30)
    assert decide(running) == ("leave", 1)
    assert decide(StageAttempt(1, "SCHEDULED", "fr-1")) == ("leave", 1)
    assert decide(StageAttempt(1, "PAUSED", "fr-1")) == ("leave", 1)  # waiting for approval
    stuck = StageAttempt(1, "RUNNING", "fr-1", started_at=NOW - 601)
    launch = decide_launch([stuck], NOW, 600, 3, 60)
    assert (launch.action, launch.attempt, launch.stuck) == ("start", 2, stuck)
    crashed = StageAttempt(1, "CRASHED", "fr-1", started_at=NOW - 100, ended_at=NOW - 30)
    assert decide(crashed) == ("leave", 1)  # backing off 60 s
    crashed_long_ago = StageAttempt(1, "CRASHED", "fr-1", ended_at=NOW - 61)
    launch = decide_launch([crashed_long_ago], NOW, 600, 3, 60)
    assert (launch.action, launch.attempt, launch.failed) == ("start", 2, crashed_long_ago)
    failed_twice = [crashed_long_ago, StageAttempt(2, "FAILED", "fr-2", ended_at=NOW - 119)]
    assert decide(*failed_twice) == ("leave", 2)  # the backoff doubles: 120 s
    failed_thrice = [*failed_twice, StageAttempt(3, "FAILED", "fr-3", ended_at=NOW - 9999)]
    assert decide(*failed_thrice) == ("give_up", 3)
    completed = StageAttempt(1, "COMPLETED", "fr-1", ended_at=NOW - 1)
    assert decide(completed) == ("start", 2)  # e.g. shards still waiting for queue room


def test_batches_of_the_run_that_no_shard_records_are_strays() -> None:
    manifest = _manifest("submitted", stray_batches=[_stray("cancelled")])

    def batch(batch_id: str) -> BatchInfo:
        return BatchInfo(
            id=batch_id, status="in_progress", input_file_id="f", endpoint="/v1/chat/completions",
            metadata={"nightbatch_run": manifest.run_id, "nightbatch_shard": "a1-s00000",
                      "nightbatch_attempt": "1"},
        )  # fmt: skip

    found = strays_of(manifest, [batch("batch_0"), batch("batch_x"), batch("batch_dup")], "t")
    assert [(s.batch_id, s.shard_id, s.attempt) for s in found] == [("batch_dup", "a1-s00000", 1)]


def test_a_stray_batchs_billed_usage_is_summed_from_its_lines() -> None:
    def line(usage: dict[str, object] | None, status: int = 200) -> bytes:
        body = {"model": "gpt-4o-mini-2024-07-18", "usage": usage} if usage else {"error": {}}
        return orjson.dumps({"custom_id": "r", "response": {"status_code": status, "body": body}})

    lines = [
        line({"prompt_tokens": 100, "completion_tokens": 7,
              "prompt_tokens_details": {"cached_tokens": 64}}),
        line({"prompt_tokens": 50, "completion_tokens": 3}),
        line(None, 500),
        b"",
    ]  # fmt: skip
    totals = billed_usage_of_lines(lines, "/v1/chat/completions", "gpt-4o-mini")
    assert totals == {
        "gpt-4o-mini-2024-07-18": {
            "lines": 2, "input_tokens": 150, "cached_tokens": 64, "cache_write_tokens": 0,
            "output_tokens": 10, "reasoning_tokens": 0,
        }
    }  # fmt: skip
