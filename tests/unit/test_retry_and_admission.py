from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pyarrow as pa

from schemas.job import JobSpec
from schemas.manifest import RunManifest, Shard
from schemas.tables import ERRORS_SCHEMA
from tasks.admission import QueueState, admit, queue_state
from tasks.retry import plan_retries
from tasks.transitions import is_overdue


def errors(*rows: tuple[str, int, str, str, bool]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "custom_id": c,
                "attempt": a,
                "batch_id": b,
                "code": code,
                "retryable": r,
                "kind": "http",
            }
            for c, a, b, code, r in rows
        ],
        schema=ERRORS_SCHEMA,
    )


def test_retryable_rows_get_another_attempt_until_exhausted() -> None:
    table = errors(
        ("a", 1, "b1", "rate_limit_exceeded", True),  # 1 attempt used -> retry
        ("b", 1, "b1", "context_length_exceeded", False),  # permanent
        ("c", 1, "b1", "server_error", True),
        ("c", 2, "b2", "batch_expired", True),  # 2 attempts used, max 2 -> exhausted
        ("d", 1, "b1", "server_error", True),  # succeeded later: ignored
    )
    plan = plan_retries(table, succeeded={"d"}, max_attempts=2)
    assert plan.by_source_shard == {"b1": {"a"}}
    assert (plan.permanent, plan.exhausted, plan.rows) == (1, 1, 1)


def test_token_limit_refusals_do_not_use_up_attempts() -> None:
    table = errors(
        ("a", 1, "b1", "token_limit_exceeded", True),
        ("a", 2, "b2", "token_limit_exceeded", True),
        ("a", 3, "b3", "token_limit_exceeded", True),
    )
    plan = plan_retries(table, succeeded=set(), max_attempts=1)
    assert plan.by_source_shard == {"b3": {"a"}}


def test_free_requeues_are_bounded() -> None:
    """Ten refusals for the queue limit are free; from the eleventh on each uses an attempt."""
    refusals = [("a", n, f"b{n}", "token_limit_exceeded", True) for n in range(1, 12)]
    assert plan_retries(errors(*refusals[:10]), set(), max_attempts=1).rows == 1
    plan = plan_retries(errors(*refusals), set(), max_attempts=1)
    assert plan.rows == 0 and plan.exhausted == 1


def _shard(
    i: int,
    tokens: int,
    state: str = "prepared",
    status: str | None = None,
    submitted: str | None = None,
) -> Shard:
    return Shard(
        shard_id=f"a1-s{i:05d}", attempt=1, index=i, request_uri="x", lines=1, bytes=1,
        input_tokens=tokens, sha256="0", state=state, batch_status=status, submitted_at=submitted,
    )  # fmt: skip


def test_admission_keeps_queued_tokens_under_the_limit_and_respects_the_hourly_cap() -> None:
    pending = [_shard(i, 400) for i in range(5)]
    assert [
        s.index for s in admit(pending, QueueState(queued_tokens=300, created_last_hour=0), 1500)
    ] == [0, 1, 2]
    assert admit(pending, QueueState(0, 0), None) == pending
    assert [s.index for s in admit(pending, QueueState(0, created_last_hour=1998), None)] == [0, 1]
    assert admit(pending, QueueState(1400, 0), 1500) == []


def test_queue_state_counts_only_open_batches_of_the_model() -> None:
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    recent = (now - timedelta(minutes=5)).isoformat()
    old = (now - timedelta(hours=3)).isoformat()
    job = JobSpec.model_validate(
        {"name": "j", "source": {"uri": "x", "id_column": "id"}, "request": {"model": "gpt-4o-mini", "template": "{t}"},
         "output_uri": "o", "storage_root": "r"}
    )  # fmt: skip
    manifest = RunManifest(
        run_id="j-1", job_name="j", run_date="2026-11-24", job=job, created_at=old, updated_at=old,
        shards=[
            _shard(0, 100, "submitted", "in_progress", recent),
            _shard(1, 200, "submitted", "completed", old),
            _shard(2, 400, "submitting"),
            _shard(3, 800, "prepared"),
        ],
    )  # fmt: skip
    assert queue_state([manifest], "gpt-4o-mini", now) == QueueState(
        queued_tokens=500, created_last_hour=1
    )
    assert queue_state([manifest], "gpt-4o", now).queued_tokens == 0


def test_overdue_batches() -> None:
    assert is_overdue("in_progress", 1000, 1000 + 3601, 3600)
    assert not is_overdue("in_progress", 1000, 1000 + 3599, 3600)
    assert not is_overdue("completed", 1000, 99999, 0)
    assert not is_overdue("finalizing", None, 99999, 0)


def test_retry_shards_copy_exactly_the_planned_lines_with_exact_tokens(tmp_path: Path) -> None:
    """The next attempt's shards hold the planned lines, byte for byte, in shard order, packed under
    the limits, with input_tokens equal to the exact count of their lines."""
    from tasks.layout import RunLayout
    from tasks.prepare import write_shards
    from tasks.retry import RetryPlan, write_retry_shards
    from tasks.runs import new_manifest
    from tasks.storage import ObjectStore
    from tasks.tokens import count_request_tokens
    from tests.unit.helpers import assert_sidecar_keys_match_lines, products_job

    job = products_job(
        tmp_path, 3000, system_prompt="Sum up.", template="{title}\n{description}", max_lines=1000,
        mean_chars=200.0, name="retry", seed=2,
    )  # fmt: skip
    store = ObjectStore()
    layout = RunLayout(job.storage_root, job.name, "2026-01-01")
    prepared = write_shards(job, store, layout)
    shards = [s.model_copy(update={"batch_id": f"batch_{s.index}"}) for s in prepared.shards]
    manifest = new_manifest(job, "2026-01-01", "2026-01-01T00:00:00+00:00").model_copy(
        update={"shards": shards}
    )
    lines = {s.batch_id: Path(s.request_uri).read_bytes().splitlines(keepends=True) for s in shards}
    wanted = {  # every third line of the first shard, every line but one of the last
        "batch_0": {orjson.loads(line)["custom_id"] for line in lines["batch_0"][::3]},
        "batch_2": {orjson.loads(line)["custom_id"] for line in lines["batch_2"][1:]},
    }
    retried = write_retry_shards(manifest, RetryPlan(by_source_shard=wanted), store, layout)
    expected = [
        line
        for batch_id in ("batch_0", "batch_2")
        for line in lines[batch_id]
        if orjson.loads(line)["custom_id"] in wanted[batch_id]
    ]
    got = [line for s in retried for line in Path(s.request_uri).read_bytes().splitlines(True)]
    assert got == expected and len(got) == 334 + 999
    assert [s.attempt for s in retried] == [2, 2] and [s.lines for s in retried] == [1000, 333]
    for shard in retried:
        body_tokens = [
            count_request_tokens(job.request.endpoint, orjson.loads(line)["body"])
            for line in Path(shard.request_uri).read_bytes().splitlines()
        ]
        assert shard.input_tokens == sum(body_tokens)
        assert_sidecar_keys_match_lines(layout.ids_file(2, shard.index), shard.request_uri)
