"""Introspection and control: /_emulator/stats, /_emulator/config, /_emulator/clock and their Python twins."""

from __future__ import annotations

import pydantic
import pytest
from openai import OpenAI

from emulator.config import EmulatorConfig, FaultConfig
from tasks.tokens import count_request_tokens


def test_stats_count_files_batches_and_billed_usage(kit) -> None:
    server = kit.server(faults={"forced_line_failures": {"bad": "server_error"}})
    client = kit.client(server)
    lines = [
        kit.chat_line("good-1", "first"),
        kit.chat_line("good-2", "second"),
        kit.chat_line("bad"),
    ]
    batch, output, errors = kit.run(client, lines)
    embed = [kit.embedding_line("e", "some text")]
    embed_batch, _, _ = kit.run(client, embed, "/v1/embeddings")
    file_id = batch.input_file_id
    client.batches.create(input_file_id=file_id, endpoint="/v1/responses", completion_window="24h")
    failed = kit.wait(client, client.batches.list().data[0].id)  # url mismatch -> failed
    assert failed.status == "failed"

    anonymous = client.with_options(default_headers={"Authorization": ""})
    stats = anonymous.get(f"{server.url}/_emulator/stats", cast_to=object)  # no auth needed
    assert stats == {**server.stats(), "now": stats["now"]}

    files = stats["files"]
    # 2 inputs + output and error of the chat batch + output of the embeddings batch
    assert files["created"] == 5
    assert files["by_purpose"] == {"batch": 2, "batch_output": 3}
    assert files["items"][file_id] == {
        "filename": "input.jsonl",
        "purpose": "batch",
        "bytes": len(kit.jsonl(lines)),
        "created_at": client.files.retrieve(file_id).created_at,
        "deleted": False,
    }
    assert stats["batches"]["created"] == 3
    assert stats["batches"]["by_status"] == {"completed": 2, "failed": 1}
    assert stats["batches_per_input_file"] == {file_id: 2, embed_batch.input_file_id: 1}

    item = next(b for b in stats["batches"]["items"] if b["id"] == batch.id)
    assert item["status"] == "completed"
    assert item["input_file_id"] == file_id
    assert item["output_file_id"] == batch.output_file_id
    assert item["error_file_id"] == batch.error_file_id
    assert item["endpoint"] == "/v1/chat/completions"
    assert item["model"] == "gpt-4o-mini"
    assert item["metadata"] is None
    assert item["request_counts"] == {"total": 3, "completed": 2, "failed": 1}

    chat_usage = [line["response"]["body"]["usage"] for line in output]
    assert stats["usage"]["gpt-4o-mini"] == {
        "requests": 2,
        "input_tokens": sum(u["prompt_tokens"] for u in chat_usage),
        "cached_tokens": 0,
        "output_tokens": sum(u["completion_tokens"] for u in chat_usage),
        "reasoning_tokens": 0,
    }
    assert stats["usage"]["text-embedding-3-small"] == {
        "requests": 1,
        "input_tokens": count_request_tokens("/v1/embeddings", embed[0]["body"]),
        "cached_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
    }
    assert batch.usage is not None and batch.usage.input_tokens == sum(
        u["prompt_tokens"] for u in chat_usage
    )
    assert stats["api_calls"]["POST /batches"] == 3
    assert stats["api_calls"]["POST /files"] == 2


def test_deleted_files_stay_in_the_created_count(kit, client: OpenAI, emu) -> None:
    file_id = client.files.create(file=("a.jsonl", b"{}"), purpose="batch").id
    client.files.delete(file_id)
    stats = emu.stats()
    assert stats["files"]["created"] == 1
    assert stats["files"]["items"][file_id]["deleted"] is True


def test_clock_endpoint_and_python_controls(kit, client: OpenAI, emu) -> None:
    before = emu.now()
    moved = client.post(
        f"{emu.url}/_emulator/clock", body={"advance_seconds": 3600}, cast_to=object
    )
    assert moved["now"] >= before + 3600
    assert emu.advance_clock(60) >= before + 3660
    created = client.files.create(file=("a.jsonl", b"{}"), purpose="batch")
    assert created.created_at >= int(before) + 3660

    assert emu.configure(clock_scale=1200.0).clock_scale == 1200.0
    assert client.get(f"{emu.url}/_emulator/config", cast_to=object)["clock_scale"] == 1200.0
    assert emu.stats()["clock_scale"] == 1200.0


def test_configure_with_a_whole_config_or_fields(kit) -> None:
    server = kit.server()
    replaced = server.configure(
        EmulatorConfig(seed=9, faults=FaultConfig(expire_after_fraction=0.0))  # type: ignore[arg-type]
    )
    assert replaced.seed == 9 and replaced.clock_scale == 60.0
    assert replaced.faults.expire_after_fraction is not None
    client = kit.client(server)
    batch = kit.run(client, [kit.chat_line("a")])[0]
    assert batch.status == "expired"  # the default 60x clock still gets there quickly
    assert batch.request_counts is not None and batch.request_counts.completed == 0

    with pytest.raises(pydantic.ValidationError):
        server.configure(lines_per_second=0)
    with pytest.raises(pydantic.ValidationError):
        server.configure(faults={"route_faults": [{"route": "GET /files", "status": 200}]})
    assert server.config.seed == 9
