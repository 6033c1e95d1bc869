"""Keeps benchmarks/incremental.py working (at a tiny size; the real run is 1M rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.incremental import main


def test_incremental_benchmark_prepares_exactly_the_changed_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--rows", "1500", "--changed", "0.05", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "changed for night 2: 75" in out
    assert "| 75 | 1,425 |" in out
    assert "exactly the changed rows were prepared" in out
    assert "load's reads of the cache for night 2: 1,425 results" in out
