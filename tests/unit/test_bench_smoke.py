"""The benchmark keeps working: it runs end to end at a tiny size (it is not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench


def test_benchmark_runs_at_a_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    assert bench.main(["--rows", "1500", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for stage in ("prepare", "floor", "naive", "collect", "collect (4 threads)", "load"):
        assert f"| {stage} " in table
    for stage in ("prepare", "collect", "load"):  # each also on S3 (a moto server), with the ratio
        assert results_have(table, stage, "s3")
    assert "| S3 / local |" in table
    results = json.loads(out.read_text())
    assert results["prepare"]["rows"] == 1500 and results["prepare"]["tokens"] == "exact"
    assert results["collect"]["rows"] == 1500
    assert results["load"]["written"] + results["load"]["dead_lettered"] == 1500
    assert all(r["peak_rss_mb"] > 0 for r in results.values())
    assert results["prepare@s3"]["rows"] == 1500 and results["collect@s3"]["rows"] == 1500
    assert results["load@s3"]["written"] + results["load@s3"]["dead_lettered"] == 1500


def results_have(table: str, stage: str, storage: str) -> bool:
    return any(
        line.startswith(f"| {stage} ") and f"| {storage} " in line for line in table.splitlines()
    )


def test_history_benchmark_runs_at_a_tiny_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import history

    args = ["--nights", "3", "--jobs", "2", "--batches", "3", "--baseline-nights", "1"]
    assert history.main([*args, "--workdir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for what in ("runs read (poller, submit)", "output-token history (prepare)"):
        assert table.count(f"| {what} ") == 2  # local and s3
    assert "| a shard's batch and uploads (submit; no / old batches) " in table
