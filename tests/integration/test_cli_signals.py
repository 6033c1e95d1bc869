"""SIGTERM to `nightbatch run` stops it cleanly: what it started (Prefect's temporary server, its
threads) is stopped, not orphaned; it exits 143 with one line; the same command resumes the run
without submitting a shard twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tasks.runs import layout_for, load_manifest
from tasks.samples import support_tickets
from tasks.storage import ObjectStore
from tests.integration.helpers import (
    assert_every_row_exactly_once,
    assert_one_batch_per_shard_attempt,
    chat_job,
)

RUN_DATE = "2026-11-24"
ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    """Every descendant process of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cli(job_file: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "flows.cli", "run", str(job_file), "--run-date", RUN_DATE]
    return subprocess.Popen(
        [*command, "--poll-interval", "0.5"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


@pytest.mark.parametrize(
    ("how", "code", "said"),
    [("SIGTERM to the process", 143, "SIGTERM"), ("Ctrl-C to its process group", 130, "Ctrl-C")],
)
def test_a_stop_signal_stops_the_run_and_what_it_started_and_the_rerun_resumes(
    tmp_path: Path, emulator: Any, how: str, code: int, said: str
) -> None:
    source = tmp_path / "tickets.parquet"
    pq.write_table(support_tickets(60), source)
    job = chat_job(source, tmp_path, limits={"max_lines_per_shard": 20})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    emulator.configure(clock_scale=0.001)  # batches stay in progress while we stop the run
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_API") or k == "PREFECT_HOME"
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    store, layout = ObjectStore(), layout_for(job, RUN_DATE)

    process = _cli(job_file, env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if store.exists(layout.manifest):
            shards = load_manifest(store, layout).shards
            if shards and all(s.state == "submitted" for s in shards):
                break
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    else:
        raise AssertionError("the run never got to waiting")
    started = _children(process.pid)
    assert started, "the CLI started no temporary server"
    if code == 143:
        process.send_signal(signal.SIGTERM)
    else:  # a terminal's Ctrl-C reaches Prefect's temporary server too, which stops at once
        os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)

    assert process.returncode == code, err[-2000:]
    assert f"nightbatch: stopped ({said}); rerun the same command to resume" in err
    assert "Traceback" not in err
    time.sleep(1)
    assert not [pid for pid in started if _alive(pid)], "left running after SIGTERM"

    emulator.configure(clock_scale=600)  # now let the batches finish
    resumed = _cli(job_file, env)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "loaded" in out
    ids = support_tickets(60).column("ticket_id").to_pylist()
    assert_every_row_exactly_once(job, RUN_DATE, ids)
    stats = emulator.stats()
    assert_one_batch_per_shard_attempt(stats)
    assert stats["batches"]["created"] == 3
