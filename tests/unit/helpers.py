"""Helpers shared by unit tests: a products job on synthetic data, and what a shard's sidecar holds."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from schemas.job import JobSpec
from tasks.cache import cache_key_from_line, custom_id_of_line


def products_job(
    tmp_path: Path, rows: int, *, system_prompt: str, template: str, max_lines: int,
    mean_chars: float, name: str = "products", seed: int = 4,
) -> JobSpec:  # fmt: skip
    """A chat job over `rows` synthetic products (benchmarks.synth) written to tmp_path, with exact
    token counting and shards of at most `max_lines`."""
    from benchmarks.synth import product_chunk

    pq.write_table(product_chunk(0, rows, seed, mean_chars=mean_chars), tmp_path / "p.parquet")
    return JobSpec.model_validate(
        {
            "name": name,
            "source": {"uri": str(tmp_path / "p.parquet"), "id_column": "sku"},
            "request": {
                "model": "gpt-4o-mini",
                "system_prompt": system_prompt,
                "template": template,
            },
            "output_uri": str(tmp_path / "out"),
            "storage_root": str(tmp_path / "state"),
            "limits": {"max_lines_per_shard": max_lines, "token_counting": "exact"},
        }
    )


def assert_sidecar_keys_match_lines(ids_uri: str, request_uri: str) -> None:
    """The id sidecar holds each line's custom_id and cache key, in line order."""
    sidecar = pq.read_table(ids_uri)
    lines = Path(request_uri).read_bytes().splitlines(keepends=True)
    assert sidecar.column_names == ["custom_id", "cache_key"]
    assert sidecar.column("custom_id").to_pylist() == [custom_id_of_line(x) for x in lines]
    assert sidecar.column("cache_key").to_pylist() == [cache_key_from_line(x) for x in lines]
