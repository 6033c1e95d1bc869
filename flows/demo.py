"""`nightbatch demo`: sample data, the two sample jobs, the bundled emulator, the whole pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write_sample_data(data_dir: Path, rows: int) -> None:
    import pyarrow.parquet as pq

    from tasks.samples import product_descriptions, support_tickets

    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(support_tickets(rows), data_dir / "tickets.parquet")
    pq.write_table(product_descriptions(max(rows // 2, 1)), data_dir / "products.parquet")


def demo_job(name: str, workdir: Path):  # type: ignore[no-untyped-def]
    from schemas.job import JobSpec

    job = JobSpec.from_yaml(EXAMPLES / f"{name}.yaml")
    return job.model_copy(
        update={
            "source": job.source.model_copy(
                update={"uri": str(workdir / "data" / Path(job.source.uri).name)}
            ),
            "output_uri": str(workdir / "output" / job.name),
            "storage_root": str(workdir / "state"),
        }
    )


def run_demo(workdir: Path, rows: int = 1000) -> int:
    import pandas as pd

    from flows.emulated import emulator_env
    from flows.stages import pipeline

    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    print(
        f"nightbatch demo: writing sample data ({rows} tickets, {max(rows // 2, 1)} products) to {workdir / 'data'}"
    )
    write_sample_data(workdir / "data", rows)
    with emulator_env(workdir / "emulator") as url:
        print(f"bundled Batch API emulator listening at {url} (no API key, no network, no cost)")
        results = [
            pipeline(demo_job(name, workdir), poll_interval_seconds=0.5)
            for name in ("ticket-triage", "product-embeddings")
        ]
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 12)
    pd.set_option("display.max_colwidth", 40)
    for result in results:
        print(
            f"\n=== {result['run_id']}: {result['status']}, {result['rows']} rows -> {result['output']}"
        )
        frame = pd.read_parquet(result["output"])
        if "embedding" in frame.columns:
            frame["embedding"] = frame["embedding"].map(
                lambda v: f"[{len(v)} floats: {v[0]:.4f}, {v[1]:.4f}, ...]"
            )
        shown = [c for c in frame.columns if not c.startswith("nb_")][:6] + [
            "nb_status",
            "nb_attempt",
        ]
        print(frame[shown].head(5).to_string(index=False))
        costs = pd.read_parquet(result["cost_record"])
        print("cost record:")
        print(
            costs[["model", "requests", "requests_succeeded", "input_tokens", "output_tokens",
                   "cost_batch_usd", "cost_standard_usd", "savings_usd"]].to_string(index=False)
        )  # fmt: skip
    print(
        f"\nEverything is under {workdir}. Query it with pandas or DuckDB; see the README's 'What it writes'."
    )
    return 0
