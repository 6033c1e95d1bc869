"""Nothing left at the provider: once a shard's results are stored, its input, output and error files
are deleted there (unless the job keeps them); a file already gone makes its lines missing, resent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.stages import pipeline, prepare, submit, wait
from tasks.runs import layout_for, load_manifest
from tasks.samples import support_tickets
from tasks.storage import ObjectStore
from tests.integration.helpers import assert_every_row_exactly_once, chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
RUN_DATE = "2026-11-24"
ROWS = 40
IDS = [f"T-{i:06d}" for i in range(1, ROWS + 1)]


def _live_files(emulator: Any) -> list[str]:
    return [i for i, f in emulator.stats()["files"]["items"].items() if not f["deleted"]]


def _job(tmp_path: Path, **overrides: Any) -> Any:
    pq.write_table(support_tickets(ROWS), tmp_path / "tickets.parquet")
    overrides.setdefault("limits", {"max_lines_per_shard": 15})
    return chat_job(tmp_path / "tickets.parquet", tmp_path, **overrides)


def test_a_run_leaves_no_file_at_the_provider(tmp_path: Path, emulator: Any) -> None:
    # one line fails once: a retry round, so two attempts' files to clean up
    emulator.configure(
        faults={"forced_line_failures": {"r-T-000003": {"kind": "server_error", "times": 1}}}
    )
    job = _job(tmp_path)
    pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.1)
    assert_every_row_exactly_once(job, RUN_DATE, IDS)
    stats = emulator.stats()
    assert stats["batches"]["created"] == 4
    assert stats["files"]["by_purpose"]["batch"] == 4  # the inputs were uploaded, then deleted
    assert _live_files(emulator) == []
    manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
    assert all(s.provider_files_deleted for s in manifest.shards)


def test_keep_leaves_them_and_status_lists_them(
    tmp_path: Path, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    job = _job(tmp_path, provider_files="keep")
    pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.1)
    live = _live_files(emulator)
    assert len(live) == 6  # three shards: an input and an output file each
    for file_id in live:  # the provider's own retention, as a second line of defence
        held = openai.OpenAI().files.retrieve(file_id)
        assert held.expires_at is not None and held.expires_at - held.created_at == 7 * 86400
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["status", str(job_file)]) == 0
    out = capsys.readouterr().out
    assert "files at the provider (provider_files: keep): 6" in out
    assert sum(file_id in out for file_id in live) == 4  # the first four are named


def test_an_output_file_gone_before_collect_makes_its_lines_missing_and_resent(
    tmp_path: Path, emulator: Any
) -> None:
    job = _job(tmp_path, limits={"max_lines_per_shard": 100})
    prepare(job, RUN_DATE)
    submit(job, RUN_DATE, continue_run=False)
    for _ in range(200):
        if wait(job, RUN_DATE)["shards"] == {"completed": 1}:
            break
        time.sleep(0.1)
    shard = load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).shards[0]
    assert shard.output_file_id
    openai.OpenAI().files.delete(shard.output_file_id)  # its retention passed, or a hand

    result = pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.1)

    assert result["status"] == "loaded"
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, IDS)
    assert dead.num_rows == 0
    assert set(output.column("nb_attempt").to_pylist()) == {2}  # every line sent again
    assert emulator.stats()["batches"]["created"] == 2
    assert _live_files(emulator) == []
