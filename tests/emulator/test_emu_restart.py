"""Durability: a restart (new in-process server or new process on the same state dir) loses nothing, and
the batch continues to completion with exactly the results an uninterrupted run gives."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from openai import OpenAI

# 200 lines at 1/3 line per emulated second and 600x: about one real second in progress
SETTINGS = {
    "seed": 3,
    "lines_per_second": 1 / 3,
    "faults": {"line_failure_rates": {"server_error": 0.1, "request_timeout": 0.1}},
}


def _normalised(lines: list[dict]) -> list[dict]:
    """Lines without the emulated wall-clock `created` stamps (which depend on when the run started)."""
    for line in lines:
        body = (line.get("response") or {}).get("body") or {}
        body.pop("created", None)
    return lines


def _lines() -> list[dict]:
    return [
        {
            "custom_id": f"row-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}]},
        }
        for i in range(200)
    ]


def test_restart_mid_batch_continues_with_identical_results(kit, tmp_path: Path) -> None:
    lines = _lines()
    state = tmp_path / "restarted"
    first = kit.server(state, **SETTINGS)
    client = kit.client(first)
    batch = kit.submit(client, lines, metadata={"shard": "7"})
    kit.wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 20)
    first.stop()
    before = json.loads((state / "batches" / batch.id / "batch.json").read_text())

    second = kit.server(state, **SETTINGS)
    client = kit.client(second)
    resumed = client.batches.retrieve(batch.id)
    assert resumed.status in ("in_progress", "finalizing", "completed")
    assert resumed.created_at == batch.created_at and resumed.metadata == {"shard": "7"}
    assert resumed.request_counts.completed + resumed.request_counts.failed >= before["done"] > 0
    done = kit.wait(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == 200
    assert done.request_counts.completed + done.request_counts.failed == 200
    output = kit.read(client, done.output_file_id)
    errors = kit.read(client, done.error_file_id)
    ids = [line["custom_id"] for line in output + errors]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(200))  # each line exactly once
    assert len(errors) == done.request_counts.failed > 0

    # the same input on a fresh state dir, never interrupted, gives the same files
    reference = kit.server(tmp_path / "reference", **SETTINGS)
    ref_client = kit.client(reference)
    ref_batch, ref_output, ref_errors = kit.run(ref_client, lines)
    assert ref_batch.request_counts == done.request_counts
    assert _normalised(output) == _normalised(ref_output)
    assert _normalised(errors) == _normalised(ref_errors)
    assert second.stats()["usage"] == reference.stats()["usage"]


def test_restart_keeps_files_batches_and_the_emulated_clock(kit, tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = kit.server(state)
    client = kit.client(server)
    finished = kit.run(client, [kit.chat_line("b")])[0]
    server.configure(validating_seconds=3600)
    waiting = kit.submit(client, [kit.chat_line("a")], metadata={"k": "v"})
    before = server.stats()
    server.stop()

    server = kit.server(state, validating_seconds=0)
    client = kit.client(server)
    assert client.batches.retrieve(finished.id) == finished
    assert [b.id for b in client.batches.list()] == [waiting.id, finished.id]
    assert client.files.retrieve(waiting.input_file_id).filename == "input.jsonl"
    assert kit.read(client, finished.output_file_id)[0]["custom_id"] == "b"
    # validating_due was fixed at creation; it is still an hour of emulated time away
    assert client.batches.retrieve(waiting.id).status == "validating"
    server.advance_clock(3600)
    assert kit.wait(client, waiting.id).status == "completed"
    after = server.stats()
    assert after["now"] >= before["now"] + 3600
    assert after["files"]["created"] == before["files"]["created"] + 1  # + the new output file
    assert after["batches"]["created"] == 2


def test_torn_result_record_is_dropped_on_restart(kit, tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = kit.server(state, lines_per_second=1 / 30)
    client = kit.client(server)
    batch = kit.submit(client, [kit.chat_line(f"r{i}") for i in range(100)])
    kit.wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 5)
    server.stop()
    results = state / "batches" / batch.id / "results.jsonl"
    with results.open("ab") as fh:  # a crash in the middle of writing a record
        fh.write(b'{"k": 99999, "custom_id": "r')

    server = kit.server(state)
    client = kit.client(server)
    server.advance_clock(100 * 30)  # the batch keeps the pace it started with
    done = kit.wait(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 100
    assert sorted(line["custom_id"] for line in kit.read(client, done.output_file_id)) == sorted(
        f"r{i}" for i in range(100)
    )


def _start_cli(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line)
    assert match, f"unexpected emulator output: {line!r}"
    return proc, match.group(1)


def _stop_cli(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=15)


def test_cli_process_restart_mid_batch(tmp_path: Path, kit) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "lines_per_second": 0.5,
                "validating_seconds": 1,
                "faults": {"forced_line_failures": {"row-5": "server_error"}},
            }
        )
    )
    faults_only = tmp_path / "faults.yaml"
    faults_only.write_text("forced_line_failures:\n  row-40: request_timeout\n")
    state = str(tmp_path / "state")

    # first process: one line every 2 emulated seconds at 30x, about 3 s for the 50 lines
    proc, base_url = _start_cli(
        ["--state-dir", state, "--clock-scale", "30", "--config", str(settings)]
    )
    try:
        client = OpenAI(base_url=base_url, api_key="test-key", max_retries=0)
        file_id = kit.upload(client, _lines()[:50])
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        def progressed() -> bool:
            counts = client.batches.retrieve(batch.id).request_counts
            return counts.completed + counts.failed >= 8

        kit.wait_until(progressed)
        at_stop = client.batches.retrieve(batch.id)
        client.close()
    finally:
        assert _stop_cli(proc) == 0
    assert at_stop.status == "in_progress"  # stopped mid-batch
    assert at_stop.request_counts is not None and at_stop.request_counts.completed < 50

    # second process on the same state dir: a faults-only YAML file and a faster clock
    proc, base_url = _start_cli(
        ["--state-dir", state, "--clock-scale", "3000", "--config", str(faults_only)]
    )
    try:
        client = OpenAI(base_url=base_url, api_key="test-key", max_retries=0)
        resumed = client.batches.retrieve(batch.id)
        # at 3000x the rest may already be done when the new process answers: either is fine
        assert resumed.status in ("in_progress", "finalizing", "completed")
        assert resumed.request_counts.completed + resumed.request_counts.failed >= 8
        done = kit.wait(client, batch.id)
        errors = kit.read(client, done.error_file_id)
        output = kit.read(client, done.output_file_id)
        client.close()
    finally:
        assert _stop_cli(proc) == 0
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.failed) == (50, 2)
    assert len(output) == 48
    # row-5 ran under the first process's faults, row-40 under the second's
    assert {line["custom_id"]: line for line in errors}.keys() == {"row-5", "row-40"}
    by_id = {line["custom_id"]: line for line in errors}
    assert by_id["row-5"]["response"]["status_code"] == 500
    assert by_id["row-40"]["error"]["code"] == "request_timeout"
