"""The incremental case: a night where a share of the rows changed sends exactly those rows.

    .venv/bin/python benchmarks/incremental.py --rows 1000000 --changed 0.05

Night 1 prepares the whole synthetic products table (as benchmarks/bench.py) and fills the result
cache with a result for every request (results are synthesised: no API involved); then `--changed` of
the rows get a new description; night 2 — timed — loads the cache index and prepares again. It
prints both prepares' rows/s (night 2 includes the cache lookup) and how many requests night 2
prepared, which must equal the changed rows exactly."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench import (  # noqa: E402
    RUN_DATE,
    job_spec,
    source_path,
    stage_generate,
)


def fill_cache(job: object, shards: list, store: object) -> int:  # type: ignore[type-arg]
    """A result for every request line of night 1, written as the collect stage would."""
    import pyarrow as pa

    from schemas.tables import results_schema
    from tasks.cache import ResultCache, cache_key_from_line, custom_id_of_line

    cache = ResultCache(store, job.storage_root, job, "test-api")  # type: ignore[attr-defined, arg-type]
    schema = results_schema(job.request)  # type: ignore[attr-defined]
    now = datetime.now(UTC).isoformat()
    total = 0
    for shard in shards:
        ids, keys = [], []
        with store.open_read(shard.request_uri) as handle:  # type: ignore[attr-defined]
            for line in handle:
                ids.append(custom_id_of_line(line))
                keys.append(cache_key_from_line(line))
        n = len(ids)
        columns = {f.name: pa.nulls(n, f.type) for f in schema}
        columns.update(
            custom_id=pa.array(ids),
            attempt=pa.array([1] * n, pa.int32()),
            model=pa.array(["gpt-4o-mini"] * n),
            summary=pa.array(["a summary"] * n),
            input_tokens=pa.array([500] * n, pa.int64()),
            output_tokens=pa.array([40] * n, pa.int64()),
        )
        results = pa.table(columns, schema=schema)
        cache.write_segment(f"night1-{shard.shard_id}", keys, results, "night-1", now)
        total += n
    return total


def served_from_cache(job: Any, store: Any, run_date: str) -> tuple[float, int, float]:
    """Time load's two reads of the cache for a night's hits: the served results (streamed, a
    segment at a time) and their usage for the cost record. (seconds, rows, seconds)"""
    from tasks.cache import ResultCache, served_results, served_usage
    from tasks.layout import RunLayout

    cache = ResultCache(store, job.storage_root, job, "test-api")
    hits_uri = RunLayout(job.storage_root, job.name, run_date).cache_hits
    started = time.perf_counter()
    rows = sum(t.num_rows for t in served_results(cache, store, hits_uri, datetime.now(UTC)))
    served = time.perf_counter() - started
    started = time.perf_counter()
    sum(t.num_rows for t in served_usage(cache, store, hits_uri, datetime.now(UTC)))
    return served, rows, time.perf_counter() - started


def change_rows(source: Path, target: Path, every: int) -> int:
    """Copy the table (zstd, as the original), appending to the description of every `every`-th
    row (streamed)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    changed = 0
    reader = pq.ParquetFile(source)
    with pq.ParquetWriter(target, reader.schema_arrow, compression="zstd") as writer:
        offset = 0
        for batch in reader.iter_batches(batch_size=65536):
            mask = pa.array(np.arange(offset, offset + batch.num_rows) % every == 0)
            index = batch.schema.get_field_index("description")
            updated = pc.if_else(
                mask,
                pc.binary_join_element_wise(batch.column(index), " (revised)", ""),
                batch.column(index),
            )
            writer.write_batch(batch.set_column(index, "description", updated))
            changed += pc.sum(pc.cast(mask, pa.int64())).as_py() or 0
            offset += batch.num_rows
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changed", type=float, default=0.05, help="share of rows changed (1/N)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".nightbatch" / "bench")
    args = parser.parse_args(argv)

    from tasks.cache import ResultCache
    from tasks.layout import RunLayout
    from tasks.prepare import write_shards
    from tasks.storage import ObjectStore

    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    stage_generate(workdir, args.rows, "local")
    store = ObjectStore()
    job = job_spec(workdir, args.rows).model_copy(update={"name": "bench-incremental"})
    shutil.rmtree(Path(job.storage_root) / "runs" / job.name, ignore_errors=True)
    shutil.rmtree(Path(job.storage_root) / "cache", ignore_errors=True)

    started = time.perf_counter()
    night1 = write_shards(job, store, RunLayout(job.storage_root, job.name, RUN_DATE))
    full_seconds = time.perf_counter() - started
    cached = fill_cache(job, night1.shards, store)

    every = round(1 / args.changed)
    changed_source = workdir / f"products-{args.rows}-changed.parquet"
    changed = change_rows(source_path(workdir, args.rows), changed_source, every)
    job2 = job.model_copy(
        update={"source": job.source.model_copy(update={"uri": str(changed_source)})}
    )

    started = time.perf_counter()
    index = ResultCache(store, job2.storage_root, job2, "test-api").index(None, datetime.now(UTC))
    index_seconds = time.perf_counter() - started
    night2 = write_shards(
        job2, store, RunLayout(job2.storage_root, job2.name, "2026-01-02"), cache_index=index
    )
    incremental_seconds = time.perf_counter() - started
    prepared = sum(s.lines for s in night2.shards)

    print(
        f"rows: {args.rows:,}, cached after night 1: {cached:,}, changed for night 2: {changed:,}"
    )
    print("| prepare | rows | seconds | rows/s | requests prepared | served from cache |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| night 1, full | {night1.rows:,} | {full_seconds:.2f} | {night1.rows / full_seconds:,.0f} | {sum(s.lines for s in night1.shards):,} | 0 |"
    )
    print(
        f"| night 2, incremental (index load {index_seconds:.2f} s included) | {night2.rows:,} | "
        f"{incremental_seconds:.2f} | {night2.rows / incremental_seconds:,.0f} | {prepared:,} | {night2.cache_hits:,} |"
    )
    served_seconds, served_rows, usage_seconds = served_from_cache(job2, store, "2026-01-02")
    print(
        f"load's reads of the cache for night 2: {served_rows:,} results in {served_seconds:.2f} s "
        f"({served_rows / max(served_seconds, 1e-9):,.0f} rows/s), the cost record's usage of "
        f"them in {usage_seconds:.2f} s"
    )
    ok = prepared == changed and night2.cache_hits == args.rows - changed
    print(
        "exactly the changed rows were prepared"
        if ok
        else "MISMATCH: prepared rows differ from changed rows"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
