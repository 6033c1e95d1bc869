"""Fault injection: per-line failures, forced failures, expiry, stuck finalizing, API flakiness and the
lost create response. Line faults are deterministic per (seed, batch sequence number, custom_id)."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

RATES = {
    "rate_limit_exceeded": 0.15,
    "server_error": 0.15,
    "context_length_exceeded": 0.15,
    "request_timeout": 0.15,
}


def _kind(line: dict) -> str:
    if line["error"] is not None:
        return line["error"]["code"]
    return line["response"]["body"]["error"]["code"]


def test_line_failure_rates_produce_real_error_lines(kit) -> None:
    client = kit.client(kit.server(seed=7, faults={"line_failure_rates": RATES}))
    lines = [kit.chat_line(f"id-{i}", f"text {i}") for i in range(200)]
    batch, output, errors = kit.run(client, lines)

    assert batch.status == "completed"
    counts = batch.request_counts
    assert counts is not None
    assert (counts.total, counts.completed, counts.failed) == (200, len(output), len(errors))
    assert all(line["response"]["status_code"] == 200 for line in output)
    kinds = {_kind(line) for line in errors}
    assert kinds == set(RATES)
    assert 60 <= len(errors) <= 180  # 60% of 200, give or take

    for line in errors:
        kind = _kind(line)
        if kind == "request_timeout":
            assert line["response"] is None
            assert line["error"] == {
                "code": "request_timeout",
                "message": "The underlying call to the model timed out.",
            }
            continue
        assert line["error"] is None
        status, body = line["response"]["status_code"], line["response"]["body"]
        assert set(body["error"]) == {"message", "type", "param", "code"}
        if kind == "rate_limit_exceeded":
            assert status == 429 and body["error"]["type"] == "requests"
            assert body["error"]["message"].startswith("Rate limit reached for gpt-4o-mini")
        elif kind == "server_error":
            assert status == 500 and body["error"]["type"] == "server_error"
        else:
            assert status == 400 and body["error"]["type"] == "invalid_request_error"
            assert body["error"]["param"] == "messages"


def _failures(kit, client: OpenAI, lines: list[dict]) -> dict[str, str]:
    _, _, errors = kit.run(client, lines)
    return {line["custom_id"]: _kind(line) for line in errors}


def test_line_faults_are_deterministic_per_seed_and_batch(kit) -> None:
    lines = [kit.chat_line(f"id-{i}") for i in range(100)]
    faults = {"line_failure_rates": {"server_error": 0.3}}
    first = _failures(kit, kit.client(kit.server(kit.tmp_path / "a", seed=1, faults=faults)), lines)
    same = _failures(kit, kit.client(kit.server(kit.tmp_path / "b", seed=1, faults=faults)), lines)
    other = _failures(kit, kit.client(kit.server(kit.tmp_path / "c", seed=2, faults=faults)), lines)
    assert first == same
    assert first != other
    assert 10 <= len(first) <= 50

    # retrying the failed ids in a new batch: each draws again, most succeed
    client = kit.client(kit.server(kit.tmp_path / "d", seed=1, faults=faults))
    assert _failures(kit, client, lines) == first
    retry = [line for line in lines if line["custom_id"] in first]
    again = _failures(kit, client, retry)
    assert len(again) < len(first)
    assert set(again) <= set(first)


def test_forced_failures_every_batch_or_a_number_of_times(kit) -> None:
    forced = {
        "always": "rate_limit_exceeded",
        "once": {"kind": "request_timeout", "times": 1},
        "ctx": {"kind": "context_length_exceeded"},
    }
    client = kit.client(kit.server(faults={"forced_line_failures": forced}))
    lines = [kit.chat_line(c) for c in ("always", "once", "ctx", "fine")]
    assert _failures(kit, client, lines) == {
        "always": "rate_limit_exceeded",
        "once": "request_timeout",
        "ctx": "context_length_exceeded",
    }
    assert _failures(kit, client, lines) == {
        "always": "rate_limit_exceeded",
        "ctx": "context_length_exceeded",
    }


def test_expire_after_fraction_gives_partial_results(kit) -> None:
    server = kit.server(faults={"expire_after_fraction": {"fraction": 0.5, "times": 1}})
    client = kit.client(server)
    lines = [kit.chat_line(f"id-{i}") for i in range(10)]
    batch, output, errors = kit.run(client, lines)

    assert batch.status == "expired"
    assert batch.expired_at is not None and batch.expired_at >= batch.in_progress_at
    assert (batch.finalizing_at, batch.completed_at) == (None, None)
    counts = batch.request_counts
    assert counts is not None
    assert (counts.total, counts.completed, counts.failed) == (10, 5, 0)
    assert len(output) == 5
    assert len(errors) == 5
    assert {line["custom_id"] for line in output + errors} == {f"id-{i}" for i in range(10)}
    for line in errors:
        assert line["response"] is None
        assert line["error"] == {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
    # completed lines of an expired batch are billed
    assert server.stats()["usage"]["gpt-4o-mini"]["requests"] == 5

    # `times: 1` - the next batch is not affected
    assert kit.run(client, lines)[0].status == "completed"


def test_expiry_when_emulated_time_passes_expires_at(kit) -> None:
    # one line per 1,000 emulated seconds: 86 of 200 lines fit in the 24 h window
    server = kit.server(lines_per_second=1 / 1000, validating_seconds=6)
    client = kit.client(server)
    batch = kit.submit(client, [kit.chat_line(f"id-{i}") for i in range(200)])
    kit.wait(client, batch.id, statuses=("in_progress",))
    server.advance_clock(2 * 86400)
    batch = kit.wait(client, batch.id)
    assert batch.status == "expired"
    assert batch.expired_at == batch.expires_at
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (86, 0)
    errors = kit.read(client, batch.error_file_id)
    assert len(errors) == 114
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    with pytest.raises(openai.ConflictError) as excinfo:
        client.batches.cancel(batch.id)
    assert excinfo.value.body["message"] == "Cannot cancel a batch with status 'expired'."  # type: ignore[index]


def test_fast_clock_expires_a_slow_batch(kit) -> None:
    # 1 real second is 2 emulated days; 4 of 10 lines finish within 24 h
    client = kit.client(kit.server(clock_scale=172800, lines_per_second=1 / 20000))
    batch, output, errors = kit.run(client, [kit.chat_line(f"id-{i}") for i in range(10)])
    assert batch.status == "expired"
    assert (len(output), len(errors)) == (4, 6)


def test_stuck_in_finalizing_until_the_fault_is_cleared(kit) -> None:
    server = kit.server(faults={"stuck_in_finalizing": {"times": 1}})
    client = kit.client(server)
    stuck = kit.submit(client, [kit.chat_line("a"), kit.chat_line("b")])
    kit.wait(client, stuck.id, statuses=("finalizing",))
    normal = kit.run(client, [kit.chat_line("c")])[0]
    assert normal.status == "completed"
    server.advance_clock(3600)
    still = client.batches.retrieve(stuck.id)
    assert still.status == "finalizing"
    assert still.request_counts is not None and still.request_counts.completed == 2

    server.configure(faults={"stuck_in_finalizing": None})
    done = kit.wait(client, stuck.id)
    assert done.status == "completed"
    assert done.completed_at is not None and done.finalizing_at is not None
    assert done.completed_at >= done.finalizing_at + 3600
    assert len(kit.read(client, done.output_file_id)) == 2


def test_cancel_a_stuck_batch(kit) -> None:
    client = kit.client(kit.server(faults={"stuck_in_finalizing": True}))
    batch = kit.submit(client, [kit.chat_line("a")])
    kit.wait(client, batch.id, statuses=("finalizing",))
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = kit.wait(client, batch.id)
    assert done.status == "cancelled"
    assert [line["custom_id"] for line in kit.read(client, done.output_file_id)] == ["a"]
    assert done.error_file_id is None


def test_route_faults_500_and_429_with_retry_after(kit) -> None:
    faults = {
        "route_faults": [
            {"route": "GET /batches/{id}", "status": 500, "times": 2},
            {"route": "GET /files/{id}/content", "status": 429, "retry_after": 2},
            {"route": "GET /batches", "status": 503, "skip": 1},
        ]
    }
    server = kit.server(faults=faults)
    client = kit.client(server)
    batch = kit.submit(client, [kit.chat_line("a")])
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as excinfo:
            client.batches.retrieve(batch.id)
        assert excinfo.value.status_code == 500
        assert excinfo.value.body["type"] == "server_error"  # type: ignore[index]
    batch = kit.wait(client, batch.id)

    with pytest.raises(openai.RateLimitError) as rate_limited:
        client.files.content(batch.output_file_id)
    assert rate_limited.value.response.headers["retry-after"] == "2"
    assert rate_limited.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert len(kit.read(client, batch.output_file_id)) == 1

    assert client.batches.list().data[0].id == batch.id  # skipped
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.batches.list()
    assert excinfo.value.status_code == 503
    assert client.batches.list().data[0].id == batch.id

    calls = server.stats()["api_calls"]
    assert calls["GET /batches"] == 3
    assert calls["GET /files/{id}/content"] == 2


def test_sdk_retries_recover_from_a_flaky_route(kit) -> None:
    server = kit.server(
        faults={"route_faults": [{"route": "GET /batches", "status": 429, "retry_after": 0}]}
    )
    client = kit.client(server, max_retries=1)
    assert client.batches.list().data == []
    assert server.stats()["api_calls"]["GET /batches"] == 2


def test_lost_create_response_still_creates_the_batch(kit) -> None:
    server = kit.server(
        faults={"route_faults": [{"route": "POST /batches", "status": 500, "execute": True}]}
    )
    client = kit.client(server)
    file_id = kit.upload(client, [kit.chat_line("a")])
    with pytest.raises(openai.InternalServerError):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"shard": "0001"},
        )
    [orphan] = client.batches.list().data
    assert orphan.input_file_id == file_id and orphan.metadata == {"shard": "0001"}
    assert kit.wait(client, orphan.id).status == "completed"
    # the fault was for one call: the next create answers normally
    second = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert second.id != orphan.id
    assert server.stats()["batches_per_input_file"] == {file_id: 2}


def test_faults_change_at_run_time_through_the_admin_endpoint(kit) -> None:
    server = kit.server()
    client = kit.client(server)
    lines = [kit.chat_line("a"), kit.chat_line("b")]
    assert _failures(kit, client, lines) == {}

    config = client.post(
        f"{server.url}/_emulator/config",
        body={"faults": {"forced_line_failures": {"a": "server_error"}}},
        cast_to=object,
    )
    assert config["faults"]["forced_line_failures"] == {
        "a": {"kind": "server_error", "times": None}
    }
    assert _failures(kit, client, lines) == {"a": "server_error"}

    # nested settings merge: adding a route fault keeps the forced failure
    client.post(
        f"{server.url}/_emulator/config",
        body={"faults": {"route_faults": [{"route": "POST /v1/batches", "status": 502}]}},
        cast_to=object,
    )
    current = client.get(f"{server.url}/_emulator/config", cast_to=object)
    assert current["faults"]["route_faults"][0]["route"] == "POST /batches"
    assert current["faults"]["forced_line_failures"] != {}
    with pytest.raises(openai.InternalServerError):
        kit.submit(client, lines)

    with pytest.raises(openai.BadRequestError) as excinfo:
        client.post(
            f"{server.url}/_emulator/config",
            body={"faults": {"line_failure_rates": {"server_error": 2}}},
            cast_to=object,
        )
    assert "add up to at most 1" in excinfo.value.body["message"]  # type: ignore[index]
