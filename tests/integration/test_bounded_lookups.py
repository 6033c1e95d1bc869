"""Look-ups at the provider do not grow with the organisation's history: a submit's look-up for its
own batch and uploads, and a run's for stray batches, stop a page past what is older than the submit
(or the run) began, minus a day."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

from flows.context import build_batch_api
from schemas.manifest import Shard
from schemas.settings import Settings
from tasks.submit import delete_orphan_uploads, find_existing_batch, shard_metadata

OLD = 250  # batches of earlier nights: 3 pages of batches


def _shard(started_at: str) -> Shard:
    return Shard(shard_id="a1-s00000", attempt=1, index=0, request_uri="x", lines=1, bytes=10,
                 input_tokens=5, sha256="f" * 64, state="submitting",
                 submit_started_at=started_at)  # fmt: skip


def test_a_submits_look_ups_read_a_bounded_number_of_pages(emulator: Any) -> None:
    api = build_batch_api(Settings.from_env())
    old_input = api.upload(io.BytesIO(b'{"custom_id": "r-1"}\n'), "old.jsonl")
    for i in range(OLD):
        api.create_batch(old_input, "/v1/chat/completions", {"nightbatch_run": f"old-{i}"})
    emulator.advance_clock(3 * 86400)  # three days later, tonight's submit begins
    started = datetime.fromtimestamp(emulator.stats()["now"], UTC).isoformat()
    shard = _shard(started)
    tonight = api.upload(io.BytesIO(b'{"custom_id": "r-1"}\n'), "tonight.jsonl")
    mine = api.create_batch(tonight, "/v1/chat/completions", shard_metadata("run-1", shard))
    calls = emulator.stats()["api_calls"]
    batches_before, files_before = calls.get("GET /batches", 0), calls.get("GET /files", 0)

    found = find_existing_batch(api, "run-1", shard)
    delete_orphan_uploads(api, "run-1", shard, keep=tonight)

    assert found is not None and found.id == mine.id
    calls = emulator.stats()["api_calls"]
    assert calls["GET /batches"] - batches_before == 2  # the newest page, and one page of margin
    assert calls["GET /files"] - files_before == 1
    # without a start (an older manifest), the whole history is scanned, as before
    unbounded = _shard(started).model_copy(update={"submit_started_at": None})
    api.find_batches(shard_metadata("run-1", unbounded))
    assert emulator.stats()["api_calls"]["GET /batches"] - calls["GET /batches"] == 3
