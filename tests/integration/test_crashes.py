"""The pipeline process killed with SIGKILL at each stage boundary, then rerun: every row ends exactly
once in the output or the dead letter, and the emulator saw exactly one batch per shard attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tasks.crashpoints import POINTS
from tasks.samples import support_tickets
from tests.integration.helpers import (
    assert_every_row_exactly_once,
    assert_no_orphan_uploads,
    assert_one_batch_per_shard_attempt,
    chat_job,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")
RUN_DATE = "2026-11-24"
ROWS = 60
REPO = Path(__file__).resolve().parents[2]


def run_cli(job_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(job_file), "--run-date", RUN_DATE, "--poll-interval", "0.1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_boundary_then_rerun(point: str, tmp_path: Path, emulator: Any) -> None:
    from prefect.settings import PREFECT_API_URL

    pq.write_table(support_tickets(ROWS), tmp_path / "tickets.parquet")
    job = chat_job(tmp_path / "tickets.parquet", tmp_path, limits={"max_lines_per_shard": 25})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    # one row fails once, so that there is a retry round to crash in
    emulator.configure(
        faults={"forced_line_failures": {"r-T-000005": {"kind": "server_error", "times": 1}}}
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "NIGHTBATCH_CRASH_AT": point,
    }

    crashed = run_cli(job_file, env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]

    env.pop("NIGHTBATCH_CRASH_AT")
    rerun = run_cli(job_file, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "loaded" in rerun.stdout

    ids = [f"T-{i:06d}" for i in range(1, ROWS + 1)]
    output, dead = assert_every_row_exactly_once(job, RUN_DATE, ids)
    assert dead.num_rows == 0 and output.num_rows == ROWS
    stats = emulator.stats()
    assert_one_batch_per_shard_attempt(stats)
    assert_no_orphan_uploads(stats)
    assert stats["batches"]["created"] == 4  # three shards, plus one retry shard
    assert stats["usage"]["gpt-4o-mini"]["requests"] == ROWS  # nothing billed twice
    # a crash between collect and the clean-up is finished by the rerun: nothing left at the provider
    assert not [i for i, f in stats["files"]["items"].items() if not f["deleted"]]
