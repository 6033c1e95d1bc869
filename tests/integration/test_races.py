"""Several processes racing on one run — submit flows, retry-failures, `nightbatch run` and one that
is killed holding leases — on local disk and on the moto S3 server, with a slow, flaky Batch API:
one batch per shard attempt, every row exactly once, and the cost record equal to what the API
billed. The promise rests on compare-and-swap and leases in the manifest, not on scheduling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from schemas.job import JobSpec
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
RUN_DATE = "2026-11-26"
ROWS = 90
REPO = Path(__file__).resolve().parents[2]
STAGE = (
    "import sys; from flows import stages; "
    "getattr(stages, sys.argv[1])(sys.argv[2], sys.argv[3], continue_run=False)"
)


def _env(**extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    # six racing processes on the test harness's SQLite: its API answers 503 while the database is
    # locked; let their clients retry longer than the default 5 times
    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_CLIENT_MAX_RETRIES": "12",
        **extra,
    }


def _start_stage(flow: str, job_file: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", STAGE, flow, str(job_file), RUN_DATE],
        cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _start_cli(job_file: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(job_file), "--run-date", RUN_DATE,
         "--poll-interval", "0.2"],
        cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _job(tmp_path: Path, root: str) -> tuple[JobSpec, Path]:
    store = ObjectStore()
    source = f"{root}/source/tickets.parquet"
    store.write_table(source, support_tickets(ROWS))
    job = chat_job(
        Path(source) if not root.startswith("s3://") else source,  # type: ignore[arg-type]
        tmp_path,
        limits={"max_lines_per_shard": 10},
        output_uri=f"{root}/output",
        storage_root=f"{root}/state",
    )
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    return job, job_file


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_racing_submitters_create_one_batch_per_shard_attempt(
    storage: str, tmp_path: Path, emulator: Any, request: pytest.FixtureRequest
) -> None:
    from flows.stages import prepare

    root = (
        str(tmp_path / "data")
        if storage == "local"
        else f"s3://{request.getfixturevalue('s3_env')}"
    )
    job, job_file = _job(tmp_path, root)
    emulator.configure(
        lines_per_second=400.0,
        faults={
            # a few rows fail once (a retry round to race in), creates and uploads answer 503
            "forced_line_failures": {
                f"r-T-{i:06d}": {"kind": "server_error", "times": 1} for i in (3, 17, 58)
            },
            "route_faults": [
                {
                    "route": "POST /batches",
                    "status": 503,
                    "times": 4,
                    "skip": 2,
                    "retry_after": 0.3,
                },
                {"route": "POST /files", "status": 503, "times": 3, "skip": 1, "retry_after": 0.2},
            ],
        },
    )
    prepare(job, RUN_DATE)
    shards = len(load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).shards)
    assert shards == 9

    racers = [_start_stage("submit", job_file) for _ in range(3)]
    racers.append(_start_stage("submit", job_file, NIGHTBATCH_CRASH_AT="after-intent"))
    racers.append(_start_cli(job_file))
    racers.append(_start_stage("retry_failures", job_file))
    outcomes = [(p.wait(timeout=240), p.stderr.read() if p.stderr else "") for p in racers]
    killed = outcomes[3][0]
    assert killed in (-9, 0), outcomes[3][1][-2000:]  # killed holding leases (or it won none)
    for code, err in outcomes[:3] + outcomes[4:]:
        assert code == 0, err[-3000:]

    finisher = _start_cli(job_file)  # whatever is left (the CLI racer may have loaded it already)
    code = finisher.wait(timeout=240)
    assert code == 0, finisher.stderr.read()[-3000:] if finisher.stderr else ""

    ids = [f"T-{i:06d}" for i in range(1, ROWS + 1)]
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, ids)
    assert dead.num_rows == 0 and output.num_rows == ROWS
    stats = emulator.stats()
    assert_one_batch_per_shard_attempt(stats)
    assert_no_orphan_uploads(stats)
    assert stats["batches"]["created"] == shards + 1  # the three failed rows share a retry shard
    manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
    assert manifest.stray_batches == []
    record = pq.read_table(
        manifest.cost_record_uri, filesystem=None if storage == "local" else _s3()
    ).to_pylist()[0]
    billed = stats["usage"]["gpt-4o-mini"]
    assert record["billed_lines"] == billed["requests"] == ROWS
    assert record["input_tokens"] == billed["input_tokens"]
    assert record["output_tokens"] == billed["output_tokens"]


def _s3() -> Any:
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(ObjectStore().fs("s3://x")[0]))


def test_a_stray_batch_of_the_run_is_cancelled_and_its_usage_counted(
    tmp_path: Path, emulator: Any
) -> None:
    """A batch left by an older version (or by hand) for a shard that has its own batch: its
    results are never served, and the cost record still equals what the API billed."""
    import openai

    from flows.stages import pipeline, prepare, submit

    job, _ = _job(tmp_path, str(tmp_path / "data"))
    prepare(job, RUN_DATE)
    submit(job, RUN_DATE, continue_run=False)
    shard = load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).shards[0]
    client = openai.OpenAI(max_retries=0)
    with open(shard.request_uri, "rb") as handle:
        upload = client.files.create(file=("old-version.jsonl", handle), purpose="batch")
    stray = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"nightbatch_run": f"triage-{RUN_DATE}", "nightbatch_shard": shard.shard_id,
                  "nightbatch_attempt": "1", "nightbatch_sha256": "written-by-an-old-version"},
    )  # fmt: skip

    result = pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.2)

    assert result["status"] == "loaded"
    ids = [f"T-{i:06d}" for i in range(1, ROWS + 1)]
    output, _ = assert_every_row_exactly_once(job, RUN_DATE, ids)
    assert set(output.column("nb_batch_id").to_pylist()) & {stray.id} == set()
    manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
    assert [s.batch_id for s in manifest.stray_batches] == [stray.id]
    assert manifest.stray_batches[0].usage_counted
    stats = emulator.stats()
    stray_stats = next(b for b in stats["batches"]["items"] if b["id"] == stray.id)
    assert stray_stats["usage"]["requests"] > 0  # it ran (at least partly), and was billed
    record = pq.read_table(manifest.cost_record_uri).to_pylist()[0]
    billed = stats["usage"]["gpt-4o-mini"]
    assert record["billed_lines"] == billed["requests"] == ROWS + stray_stats["usage"]["requests"]
    assert record["input_tokens"] == billed["input_tokens"]
    assert record["output_tokens"] == billed["output_tokens"]
