"""Does a night cost the same on the 365th night as on the first? Builds a storage root with a
history of closed runs (N nights x J jobs: manifests and cost records) and a Batch API account with
K old batches, then times what every night does against that history, beside the same with a short
history (30 nights) and an empty account, on local disk and on S3 (a moto server over HTTP):

- the poller's and submit's read of the runs (`tasks.runs.list_open_manifests`);
- prepare's read of the output-token history (`tasks.costreport.past_output_mean`);
- submit's look-up of a shard's batch and uploads (`tasks.submit.find_existing_batch`,
  `delete_orphan_uploads`), on the emulator.

    .venv/bin/python benchmarks/history.py --nights 365 --jobs 10 --batches 1000

A benchmark, not a timed test: tests/unit/test_bench_smoke.py runs it at a tiny size."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TONIGHT = date(2026, 12, 31)


def _job(root: str, name: str) -> Any:
    from schemas.job import JobSpec

    return JobSpec.model_validate(
        {
            "name": name,
            "source": {"uri": f"{root}/src.parquet", "id_column": "id"},
            "request": {"model": "gpt-4o-mini", "template": "{text}"},
            "output_uri": f"{root}/out/{name}",
            "storage_root": root,
        }
    )


def build_history(root: str, nights: int, jobs: int) -> None:
    """Closed runs of every job for `nights` nights before tonight, each with its cost record."""
    import pyarrow as pa

    from schemas.tables import COST_RECORD_SCHEMA
    from tasks.runs import layout_for, new_manifest, save_manifest
    from tasks.storage import ObjectStore

    store = ObjectStore()
    for j in range(jobs):
        job = _job(root, f"job-{j:02d}")
        for n in range(1, nights + 1):
            day = (TONIGHT - timedelta(days=n)).isoformat()
            manifest = save_manifest(store, new_manifest(job, day, f"{day}T01:00:00+00:00"))
            save_manifest(store, manifest.model_copy(update={"status": "loaded"}))
            record = dict.fromkeys(COST_RECORD_SCHEMA.names)
            record.update(job=job.name, run_date=day, model="gpt-4o-mini", output_tokens=100,
                          billed_lines=10, tags=[])  # fmt: skip
            table = pa.Table.from_pylist([record], schema=COST_RECORD_SCHEMA)
            store.write_table(layout_for(job, day).cost_record, table)


def _best(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def time_storage(root: str) -> dict[str, float]:
    from tasks.costreport import past_output_mean
    from tasks.runs import list_open_manifests
    from tasks.storage import ObjectStore

    store = ObjectStore()
    now = datetime.combine(TONIGHT, datetime.min.time(), UTC)
    list_open_manifests(store, root, now)  # a root from before the index is indexed once
    return {
        "runs read (poller, submit)": _best(lambda: list_open_manifests(store, root, now)),
        "output-token history (prepare)": _best(
            lambda: past_output_mean(store, root, "job-00", "gpt-4o-mini", TONIGHT.isoformat())
        ),
    }


def time_lookups(batches: int) -> tuple[float, float]:
    """A shard's look-up on an account without and with `batches` older batches."""
    from emulator.server import EmulatorServer
    from flows.context import build_batch_api
    from schemas.manifest import Shard
    from schemas.settings import Settings
    from tasks.submit import delete_orphan_uploads, find_existing_batch

    with tempfile.TemporaryDirectory() as state, EmulatorServer(Path(state)) as server:
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "bench"}
        api = build_batch_api(Settings.from_env(env))  # this process's environment untouched

        def lookup() -> None:
            started = datetime.fromtimestamp(server.now(), UTC).isoformat()
            shard = Shard(shard_id="a1-s00000", attempt=1, index=0, request_uri="x", lines=1,
                          bytes=1, input_tokens=1, sha256="0" * 64, state="submitting",
                          submit_started_at=started)  # fmt: skip
            find_existing_batch(api, "tonight", shard, "root")
            delete_orphan_uploads(api, "tonight", shard, root="root")

        empty = _best(lookup)
        old = api.upload(io.BytesIO(b'{"custom_id": "r-1"}\n'), "old.jsonl")
        for i in range(batches):
            api.create_batch(old, "/v1/chat/completions", {"nightbatch_run": f"old-{i}"})
        server.advance_clock(3 * 86400)
        return empty, _best(lookup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument(
        "--baseline-nights", type=int, default=30, help="the short history to compare with"
    )
    parser.add_argument("--workdir", type=Path, default=Path(".nightbatch/bench-history"))
    args = parser.parse_args(argv)
    from benchmarks.bench import BUCKET, _table, moto_s3

    workdir = args.workdir.resolve()
    short = min(args.baseline_nights, args.nights)
    rows = [("what a night does", "storage", f"{short} nights (ms)",
             f"{args.nights} nights (ms)", "ratio")]  # fmt: skip
    with moto_s3():
        for storage in ("local", "s3"):
            base = str(workdir) if storage == "local" else f"s3://{BUCKET}/history"
            with contextlib.suppress(FileNotFoundError):
                from tasks.storage import ObjectStore

                ObjectStore().remove(base, recursive=True)
            build_history(f"{base}/short", short, args.jobs)
            empty = time_storage(f"{base}/short")
            build_history(f"{base}/full", args.nights, args.jobs)
            full = time_storage(f"{base}/full")
            for name in empty:
                rows.append((name, storage, f"{1000 * empty[name]:.1f}", f"{1000 * full[name]:.1f}",
                             f"{full[name] / max(empty[name], 1e-9):.2f}x"))  # fmt: skip
    empty_lookup, full_lookup = time_lookups(args.batches)
    rows.append(("a shard's batch and uploads (submit; no / old batches)", "emulator",
                 f"{1000 * empty_lookup:.1f}",
                 f"{1000 * full_lookup:.1f}", f"{full_lookup / max(empty_lookup, 1e-9):.2f}x"))  # fmt: skip
    print(f"\n{args.nights} nights x {args.jobs} jobs of closed runs; {args.batches} older batches "
          "at the Batch API; best of 5\n")  # fmt: skip
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
