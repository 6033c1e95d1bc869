"""Rows that cannot succeed are never sent: they go to the dead letter at prepare with their reason
(empty_input, context_length_exceeded, too_large), and the rest of the run goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.stages import pipeline
from schemas.job import JobSpec
from tasks.runs import layout_for, load_manifest
from tasks.storage import ObjectStore
from tests.integration.helpers import assert_every_row_exactly_once, chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
NIGHT_1, NIGHT_2 = "2026-11-24", "2026-11-25"
ROWS = 40
IDS = [f"P-{i:03d}" for i in range(ROWS)]
EMPTY = {"P-003": "", "P-017": None, "P-029": ""}
# ~9,000 tokens: over text-embedding-3-small's 8,191 ("word " is one token in cl100k_base)
LONG = {"P-011": "word " * 9000}


def _products(path: Path) -> Path:
    texts = [LONG.get(i, EMPTY.get(i, f"a product called {i}")) for i in IDS]
    pq.write_table(pa.table({"product_id": IDS, "description": texts}), path)
    return path


def _embeddings_job(source: Path, base: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "embed",
            "source": {"uri": str(source), "id_column": "product_id"},
            "request": {
                "endpoint": "/v1/embeddings",
                "model": "text-embedding-3-small",
                "template": "{description}",
            },
            "output_uri": str(base / "out" / "embed.parquet"),
            "storage_root": str(base / "state"),
            "limits": {"max_dead_letter_fraction": 0.2},
        }
    )


def test_empty_and_overlong_embedding_inputs_are_dead_lettered_at_prepare_and_never_sent(
    tmp_path: Path, emulator: Any
) -> None:
    job = _embeddings_job(_products(tmp_path / "products.parquet"), tmp_path)
    result = pipeline(job, run_date=NIGHT_1, poll_interval_seconds=0.1)

    output, dead = assert_every_row_exactly_once(job, NIGHT_1, IDS)
    refused = {r["row_id"]: r for r in dead.to_pylist()}
    assert set(refused) == set(EMPTY) | set(LONG)
    assert {refused[i]["code"] for i in EMPTY} == {"empty_input"}
    assert refused["P-011"]["code"] == "context_length_exceeded"
    assert "8,191" in refused["P-011"]["message"]
    assert {r["reason"] for r in refused.values()} == {"not_sent"}
    assert {r["attempts"] for r in refused.values()} == {0}
    assert output.num_rows == ROWS - 4
    # the emulator received only the rows that can succeed; the estimate counted only those
    stats = emulator.stats()
    assert stats["usage"]["text-embedding-3-small"]["requests"] == ROWS - 4
    manifest = load_manifest(ObjectStore(), layout_for(job, NIGHT_1))
    assert manifest.rows_refused == 4 and manifest.estimate is not None
    assert manifest.estimate.requests == ROWS - 4
    assert result["dead_lettered"] == 4 and not result.get("went_badly")  # 10% <= 20%
    # night 2: the same rows are served from the cache, the refused ones refused again, none sent
    pipeline(job, run_date=NIGHT_2, poll_interval_seconds=0.1)
    assert_every_row_exactly_once(job, NIGHT_2, IDS)
    assert emulator.stats()["usage"]["text-embedding-3-small"]["requests"] == ROWS - 4


def test_a_chat_row_over_the_context_window_with_its_max_tokens_is_not_sent(
    tmp_path: Path, emulator: Any
) -> None:
    """gpt-4o-mini's window is 128,000 tokens for input and output together: a row of ~127,950
    input tokens asking for 100 output tokens cannot succeed; the other rows go on."""
    ids = [f"T-{i:03d}" for i in range(10)]
    subjects = ["word " * 127_950 if i == "T-004" else f"ticket {i}" for i in ids]
    source = tmp_path / "tickets.parquet"
    pq.write_table(pa.table({"ticket_id": ids, "subject": subjects, "body": ["b"] * 10}), source)
    job = chat_job(source, tmp_path, limits={"max_dead_letter_fraction": 0.5})
    pipeline(job, run_date=NIGHT_1, poll_interval_seconds=0.1)
    _, dead = assert_every_row_exactly_once(job, NIGHT_1, ids)
    assert dead.column("row_id").to_pylist() == ["T-004"]
    assert dead.column("code").to_pylist() == ["context_length_exceeded"]
    assert "100 requested output tokens" in dead.column("message")[0].as_py()
    assert emulator.stats()["usage"]["gpt-4o-mini"]["requests"] == 9
