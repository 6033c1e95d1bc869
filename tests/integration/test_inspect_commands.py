"""status, costs and cache given a job spec show that job's runs, cost records and cache (`--all`, or
a storage root, every job's); status shows a failed batch's validation errors and the dead letter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from flows.stages import pipeline
from schemas.job import JobSpec
from tasks.samples import support_tickets
from tests.integration.helpers import chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
DAY_A, DAY_B = "2026-11-23", "2026-11-24"
RUN_A, RUN_B = f"triage-{DAY_A}", f"digest-{DAY_B}"


def _write(job: JobSpec, path: Path) -> Path:
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    return path


@pytest.fixture
def two_jobs(tmp_path: Path, emulator: Any) -> dict[str, Any]:
    """Two jobs with one storage root, each run once: `triage` on DAY_A, `digest` (another template
    and output schema, so its own requests and cache namespace) on DAY_B."""
    pq.write_table(support_tickets(20), tmp_path / "tickets.parquet")
    source = tmp_path / "tickets.parquet"
    a = chat_job(source, tmp_path, output_uri=str(tmp_path / "out-a"), tags={"team": "support"})
    b = chat_job(
        source,
        tmp_path,
        name="digest",
        output_uri=str(tmp_path / "out-b"),
        tags={"team": "insights"},
        request={
            "template": "Summarise: {subject}",
            "output_schema": {"type": "object", "properties": {"gist": {"type": "string"}}},
        },
    )
    assert a.storage_root == b.storage_root
    results = {
        "a": pipeline(a, run_date=DAY_A, poll_interval_seconds=0.1),
        "b": pipeline(b, run_date=DAY_B, poll_interval_seconds=0.1),
    }
    assert results["a"]["status"] == results["b"]["status"] == "loaded"
    return {
        "root": a.storage_root,
        "a": _write(a, tmp_path / "a.yaml"),
        "b": _write(b, tmp_path / "b.yaml"),
        "cost_a": pq.read_table(results["a"]["cost_record"]).column("cost_batch_usd")[0].as_py(),
        "cost_b": pq.read_table(results["b"]["cost_record"]).column("cost_batch_usd")[0].as_py(),
    }


def _out(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_status_shows_the_given_job_and_all_jobs_with_all(
    two_jobs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root = two_jobs["root"]
    only_a = _out(capsys, "status", str(two_jobs["a"]))
    assert f"job triage under {root}" in only_a
    assert f"{RUN_A}: loaded" in only_a and RUN_B not in only_a
    only_b = _out(capsys, "status", str(two_jobs["b"]))
    assert f"job digest under {root}" in only_b
    assert f"{RUN_B}: loaded" in only_b and RUN_A not in only_b
    for argv in (["status", str(two_jobs["a"]), "--all"], ["status", root]):
        both = _out(capsys, *argv)
        assert f"all jobs under {root}: digest, triage" in both
        assert f"{RUN_A}: loaded" in both and f"{RUN_B}: loaded" in both
    # each loaded run names its dead letter
    dead_letter = Path(root, "runs", "triage", DAY_A, "dead_letter.parquet")
    assert dead_letter.is_file() and f"dead letter: {dead_letter}" in only_a


def test_costs_show_the_given_job_and_all_jobs_with_all(
    two_jobs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root = two_jobs["root"]
    cost_a, cost_b = two_jobs["cost_a"], two_jobs["cost_b"]
    assert f"{cost_a:.6f}" != f"{cost_b:.6f}"  # the templates differ: so do the costs
    only_a = _out(capsys, "costs", str(two_jobs["a"]))
    assert f"job triage under {root}" in only_a
    assert "team=support" in only_a and "team=insights" not in only_a and "digest" not in only_a
    assert DAY_A in only_a and DAY_B not in only_a
    assert f"{round(cost_a, 6):.6f}" in only_a and f"{round(cost_b, 6):.6f}" not in only_a
    both = _out(capsys, "costs", str(two_jobs["a"]), "--all")
    assert f"all jobs under {root}: digest, triage" in both
    assert "team=support" in both and "team=insights" in both
    assert DAY_A in both and DAY_B in both
    assert f"{round(cost_a, 6):.6f}" in both and f"{round(cost_b, 6):.6f}" in both
    assert _out(capsys, "costs", root) == both


def test_cache_shows_the_given_jobs_namespace_and_hit_rates(
    two_jobs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root = two_jobs["root"]
    namespaces = {  # from the segments on disk: each is named after the run that wrote it
        run: {p.parent.name for p in Path(root, "cache").rglob(f"segment-{run}-*.parquet")}
        for run in (RUN_A, RUN_B)
    }
    (ns_a,), (ns_b,) = namespaces[RUN_A], namespaces[RUN_B]
    assert ns_a != ns_b
    only_a = _out(capsys, "cache", str(two_jobs["a"]))
    assert f"job triage under {root}" in only_a
    assert f"{ns_a}: 20 entries in 1 segments" in only_a and ns_b not in only_a
    assert f"{RUN_A}: 0 of 20 rows from the cache (0.0%)" in only_a and RUN_B not in only_a
    both = _out(capsys, "cache", str(two_jobs["a"]), "--all")
    assert f"{ns_a}: 20 entries" in both and f"{ns_b}: 20 entries" in both
    assert f"{RUN_A}: 0 of 20" in both and f"{RUN_B}: 0 of 20" in both


def test_status_shows_a_failed_batchs_validation_errors_and_the_dead_letter(
    tmp_path: Path, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator.configure(models=["gpt-5"])  # the job's model is "not supported by the Batch API"
    pq.write_table(support_tickets(12), tmp_path / "tickets.parquet")
    job = chat_job(tmp_path / "tickets.parquet", tmp_path)
    path = _write(job, tmp_path / "job.yaml")
    assert main(["run", str(path), "--run-date", DAY_A, "--poll-interval", "0.1"]) == 3
    out = _out(capsys, "status", str(path))
    message = "The provided model 'gpt-4o-mini' is not supported by the Batch API."
    assert "batch failed validation:" in out
    for line in range(1, 6):  # the first five of the batch's twelve errors, one per line
        assert f"model_not_found: line {line}: {message}" in out
    assert "line 6:" not in out and "... and 7 more" in out
    dead_letter = tmp_path / "state" / "runs" / "triage" / DAY_A / "dead_letter.parquet"
    assert pq.read_table(dead_letter).num_rows == 12
    assert f"dead letter: {dead_letter}" in out
