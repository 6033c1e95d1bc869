"""The whole path against the emulator over HTTP and a real Prefect API: local disk and moto S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from flows.stages import collect, load, pipeline, prepare, submit, wait
from schemas.job import JobSpec
from tasks.samples import product_descriptions, support_tickets
from tasks.storage import ObjectStore

pytestmark = pytest.mark.usefixtures("prefect_harness")

RUN_DATE = "2026-11-24"
TRIAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "category": {
            "type": "string",
            "enum": ["billing", "shipping", "technical", "account", "other"],
        },
        "priority": {"type": "integer"},
        "summary": {"type": "string"},
        "needs_human": {"type": "boolean"},
    },
}


def triage_job(source: str, base: str, **limits: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "ticket-triage",
            "source": {
                "uri": source,
                "id_column": "ticket_id",
                "columns": ["ticket_id", "subject", "customer_tier"],
            },
            "request": {
                "model": "gpt-4o-mini",
                "system_prompt": "Triage the ticket.",
                "template": "Subject: {subject}\n\n{body}",
                "params": {"max_tokens": 200},
                "output_schema": TRIAGE_SCHEMA,
            },
            "output_uri": f"{base}/output",
            "storage_root": f"{base}/state",
            "limits": {"max_lines_per_shard": 50, **limits},
            "tags": {"feature": "ticket-triage"},
        }
    )


def read_output(uri: str) -> pa.Table:
    store = ObjectStore()
    fs, path = store.fs(uri)
    return pq.read_table(path, filesystem=fs)


def test_chat_with_schema_end_to_end_on_local_disk(tmp_path: Path, emulator: Any) -> None:
    pq.write_table(support_tickets(120), tmp_path / "tickets.parquet")
    job = triage_job(str(tmp_path / "tickets.parquet"), str(tmp_path))

    result = pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.2)

    assert result["status"] == "loaded" and result["rows"] == 120
    assert result["shards"] == {"collected": 3}
    out = read_output(result["output"])
    assert out.num_rows == 120
    assert sorted(out.column("ticket_id").to_pylist()) == [f"T-{i:06d}" for i in range(1, 121)]
    assert out.schema.field("category").type == pa.string()
    assert out.schema.field("priority").type == pa.int64()
    assert out.schema.field("needs_human").type == pa.bool_()
    assert set(out.column("category").to_pylist()) <= set(
        TRIAGE_SCHEMA["properties"]["category"]["enum"]
    )
    assert "body" not in out.column_names  # only the requested source columns
    assert set(out.column("nb_status").to_pylist()) == {"succeeded"}
    assert set(out.column("nb_run_id").to_pylist()) == {f"ticket-triage-{RUN_DATE}"}
    assert set(out.column("nb_attempt").to_pylist()) == {1}
    assert out.column("nb_custom_id").to_pylist()[:1] == ["r-" + out.column("ticket_id")[0].as_py()]

    cost = read_output(result["cost_record"]).to_pylist()
    assert len(cost) == 1
    record = cost[0]
    stats = emulator.stats()
    billed = stats["usage"]
    billed_input = sum(m["input_tokens"] for m in billed.values())
    assert record["input_tokens"] == billed_input == record["estimated_input_tokens"]
    assert record["requests_succeeded"] == 120 and record["requests_dead_lettered"] == 0
    assert record["cost_batch_usd"] > 0 and record["cost_standard_usd"] == pytest.approx(
        2 * record["cost_batch_usd"]
    )
    assert dict(record["tags"]) == {"feature": "ticket-triage"}


def test_rerun_of_a_finished_run_submits_nothing_and_changes_nothing(
    tmp_path: Path, emulator: Any
) -> None:
    pq.write_table(support_tickets(60), tmp_path / "tickets.parquet")
    job = triage_job(str(tmp_path / "tickets.parquet"), str(tmp_path))
    first = pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.2)
    before = Path(first["output"]).read_bytes()
    batches_before = emulator.stats()["batches"]["created"]

    second = pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.2)

    assert second["status"] == "loaded"
    assert emulator.stats()["batches"]["created"] == batches_before == 2
    assert Path(second["output"]).read_bytes() == before


def test_each_stage_runs_alone_on_an_existing_run(tmp_path: Path, emulator: Any) -> None:
    import time

    pq.write_table(support_tickets(30), tmp_path / "tickets.parquet")
    job = triage_job(str(tmp_path / "tickets.parquet"), str(tmp_path))
    assert prepare(job, RUN_DATE)["status"] == "prepared"
    assert submit(job, RUN_DATE, continue_run=False)["status"] == "waiting"
    assert submit(job, RUN_DATE, continue_run=False)["status"] == "waiting"  # idempotent
    assert emulator.stats()["batches"]["created"] == 1
    for _ in range(100):
        if wait(job, RUN_DATE)["shards"] == {"completed": 1}:
            break
        time.sleep(0.1)
    assert collect(job, RUN_DATE, continue_run=False)["status"] == "collected"
    loaded = load(job, RUN_DATE)
    assert loaded["status"] == "loaded"
    assert read_output(loaded["output"]).num_rows == 30


def test_embeddings_end_to_end_on_moto_s3(tmp_path: Path, emulator: Any, s3_env: str) -> None:
    store = ObjectStore()
    bucket = f"s3://{s3_env}"
    store.write_table(f"{bucket}/source/products.parquet", product_descriptions(40))
    job = JobSpec.model_validate(
        {
            "name": "product-embeddings",
            "source": {"uri": f"{bucket}/source/", "id_column": "sku", "columns": ["sku", "title"]},
            "request": {
                "endpoint": "/v1/embeddings",
                "model": "text-embedding-3-small",
                "template": "{title}: {description}",
                "params": {"dimensions": 64},
            },
            "output_uri": f"{bucket}/enriched/products",
            "storage_root": f"{bucket}/nightbatch",
            "limits": {"max_lines_per_shard": 15},
        }
    )

    result = pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.2)

    assert result["output"] == f"{bucket}/enriched/products/run_date={RUN_DATE}/part-0.parquet"
    assert result["shards"] == {"collected": 3}
    out = read_output(result["output"])
    assert out.num_rows == 40
    assert out.schema.field("embedding").type == pa.list_(pa.float32())
    record = read_output(result["cost_record"]).to_pylist()[0]
    billed = emulator.stats()["usage"]["text-embedding-3-small"]
    assert record["input_tokens"] == billed["input_tokens"] == record["estimated_input_tokens"]
    assert record["output_tokens"] == 0 and record["cost_batch_usd"] == pytest.approx(
        billed["input_tokens"] * 0.01 / 1e6
    )
    assert {len(v) for v in out.column("embedding").to_pylist()} == {64}
    assert store.exists(f"{bucket}/nightbatch/runs/product-embeddings/{RUN_DATE}/manifest.json")
    assert store.exists(f"{bucket}/nightbatch/costs/product-embeddings__{RUN_DATE}.parquet")
    # partitioned output reads as a dataset with run_date as a column
    fs, path = store.fs(f"{bucket}/enriched/products")
    dataset = ds.dataset(path, filesystem=fs, partitioning="hive")
    assert set(dataset.to_table(columns=["run_date"]).column(0).to_pylist()) == {RUN_DATE}
