"""Batch lifecycle: states, timestamps, request_counts, output/error files, ordering and cancel."""

from __future__ import annotations

import re
import time

import openai
import pytest
from openai import OpenAI

from tasks.tokens import count_request_tokens

# 20 lines at 1/15 lines per emulated second and 600x: one line every 25 ms of real time
SLOW = {"lines_per_second": 1 / 15, "validating_seconds": 60.0, "finalizing_seconds": 60.0}


def test_lifecycle_observed_through_polling(kit) -> None:
    server = kit.server(**SLOW)
    client = kit.client(server)
    lines = [kit.chat_line(f"row-{i}", f"Describe item {i}") for i in range(20)]
    batch = kit.submit(client, lines)
    seen: list[tuple[str, int, int]] = []
    deadline = time.monotonic() + 15
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        assert counts is not None
        seen.append((batch.status, counts.total, counts.completed))
        time.sleep(0.005)

    assert batch.status == "completed"
    statuses = [s for s, _, _ in seen]
    assert statuses.index("validating") < statuses.index("in_progress")
    assert statuses.index("in_progress") < statuses.index("finalizing")
    assert statuses.index("finalizing") < statuses.index("completed")
    assert all(total == 0 for status, total, _ in seen if status == "validating")
    assert all(total == 20 for status, total, _ in seen if status != "validating")
    progress = [done for status, _, done in seen if status == "in_progress"]
    assert progress == sorted(progress)
    assert any(0 < done < 20 for done in progress), "request_counts should move while in_progress"

    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (20, 0)
    assert batch.in_progress_at == batch.created_at + 60
    assert batch.finalizing_at == batch.in_progress_at + 300
    assert batch.completed_at == batch.finalizing_at + 60
    assert batch.expires_at == batch.created_at + 86400
    assert (batch.failed_at, batch.expired_at, batch.cancelled_at) == (None, None, None)
    assert batch.model == "gpt-4o-mini"
    assert batch.errors is None
    assert batch.error_file_id is None


def test_chat_output_lines_match_the_real_format(kit, client: OpenAI) -> None:
    lines = [kit.chat_line(f"id-{i}", f"Summarise document number {i}") for i in range(30)]
    batch, output, errors = kit.run(client, lines)

    assert errors == [] and batch.error_file_id is None
    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output"
    assert output_file.filename == f"{batch.id}_output.jsonl"
    assert sorted(line["custom_id"] for line in output) == sorted(f"id-{i}" for i in range(30))
    assert [line["custom_id"] for line in output] != [f"id-{i}" for i in range(30)]

    by_id = {line["custom_id"]: line for line in output}
    line = by_id["id-7"]
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert re.fullmatch(r"batch_req_[0-9a-f]{32}", line["id"])
    assert line["error"] is None
    response = line["response"]
    assert response["status_code"] == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response["request_id"])
    body = response["body"]
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o-mini"
    assert body["system_fingerprint"].startswith("fp_")
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    message = choice["message"]
    assert message["role"] == "assistant" and message["refusal"] is None
    assert isinstance(message["content"], str) and message["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == count_request_tokens("/v1/chat/completions", lines[7]["body"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert usage["completion_tokens_details"] == {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }
    assert len({line["id"] for line in output}) == 30


def test_output_order_is_input_order_without_shuffle(kit) -> None:
    client = kit.client(kit.server(shuffle_output=False))
    lines = [kit.chat_line(f"id-{i}") for i in range(10)]
    _, output, _ = kit.run(client, lines)
    assert [line["custom_id"] for line in output] == [f"id-{i}" for i in range(10)]


def test_batch_where_every_line_fails_is_completed_without_output_file(kit) -> None:
    forced = {f"id-{i}": "server_error" for i in range(3)}
    client = kit.client(kit.server(faults={"forced_line_failures": forced}))
    batch, output, errors = kit.run(client, [kit.chat_line(f"id-{i}") for i in range(3)])
    assert batch.status == "completed"
    assert batch.output_file_id is None and output == []
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 3)
    assert len(errors) == 3
    assert client.files.retrieve(batch.error_file_id).filename == f"{batch.id}_error.jsonl"


def test_cancel_in_progress_keeps_partial_results(kit) -> None:
    server = kit.server(lines_per_second=1 / 15, validating_seconds=0, cancelling_seconds=60)
    client = kit.client(server)
    lines = [kit.chat_line(f"id-{i}") for i in range(200)]
    batch = kit.submit(client, lines)
    kit.wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 3)

    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    done = kit.wait(client, batch.id)
    assert done.status == "cancelled"
    assert done.cancelled_at == done.cancelling_at + 60
    assert done.completed_at is None

    counts = done.request_counts
    assert counts is not None and counts.total == 200
    assert counts.completed == cancelling.request_counts.completed >= 3
    assert counts.failed == 0
    output = kit.read(client, done.output_file_id)
    errors = kit.read(client, done.error_file_id)
    assert len(output) == counts.completed
    assert len(errors) == 200 - counts.completed
    assert {line["custom_id"] for line in output + errors} == {f"id-{i}" for i in range(200)}
    for line in errors:
        assert line["response"] is None
        assert line["error"] == {
            "code": "batch_cancelled",
            "message": "The batch was cancelled before this request executed.",
        }
        assert re.fullmatch(r"batch_req_[0-9a-f]{32}", line["id"])

    again = client.batches.cancel(batch.id)
    assert again.status == "cancelled" and again.cancelled_at == done.cancelled_at


def test_cancel_while_validating(kit) -> None:
    client = kit.client(kit.server(validating_seconds=3600))
    batch = kit.submit(client, [kit.chat_line("a")])
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = kit.wait(client, batch.id)
    assert done.status == "cancelled"
    assert done.in_progress_at is None
    assert (done.output_file_id, done.error_file_id) == (None, None)
    assert done.request_counts is not None and done.request_counts.total == 0


def test_cancel_finished_batches_is_409(kit, client: OpenAI) -> None:
    completed, _, _ = kit.run(client, [kit.chat_line("a")])
    with pytest.raises(openai.ConflictError) as excinfo:
        client.batches.cancel(completed.id)
    assert excinfo.value.status_code == 409
    assert excinfo.value.body == {
        "message": "Cannot cancel a batch with status 'completed'.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    failed, _, _ = kit.run(client, ["not json"])
    assert failed.status == "failed"
    with pytest.raises(openai.ConflictError) as excinfo:
        client.batches.cancel(failed.id)
    assert excinfo.value.body["message"] == "Cannot cancel a batch with status 'failed'."  # type: ignore[index]


def test_request_counts_are_live_in_list(kit, client: OpenAI) -> None:
    batch, _, _ = kit.run(client, [kit.chat_line(f"x{i}") for i in range(5)])
    listed = client.batches.list().data[0]
    assert listed.id == batch.id
    assert listed.status == "completed"
    assert listed.request_counts == batch.request_counts
    assert listed.usage == batch.usage
    assert batch.usage is not None and batch.usage.input_tokens == sum(
        count_request_tokens("/v1/chat/completions", kit.chat_line(f"x{i}")["body"])
        for i in range(5)
    )


def test_changing_the_line_rate_speeds_up_a_running_batch(kit) -> None:
    # one line per 10 emulated minutes (1 s real at 600x): 100 lines would take 100 s
    server = kit.server(lines_per_second=1 / 600)
    client = kit.client(server)
    batch = kit.submit(client, [kit.chat_line(f"r{i}") for i in range(100)])
    kit.wait(client, batch.id, statuses=("in_progress",))
    server.configure(lines_per_second=1000.0)
    done = kit.wait(client, batch.id, timeout=5)
    assert done.status == "completed"
    assert done.request_counts is not None and done.request_counts.completed == 100
    assert done.in_progress_at <= done.finalizing_at <= done.completed_at
