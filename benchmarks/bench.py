"""Throughput and memory of nightbatch's data stages on a synthetic table, in one run, on local
disk and on S3 (a moto server over HTTP, started by the benchmark), with the S3/disk ratio per stage.

    .venv/bin/python benchmarks/bench.py --rows 1000000              # prepare, naive, collect, load
    .venv/bin/python benchmarks/bench.py --rows 5000000 --memory-only  # no naive baseline
    .venv/bin/python benchmarks/bench.py --rows 200000 --storage s3  # S3 only

Makes (and keeps, under --workdir) a products table with realistic text lengths (a title, a
category and a ~1,800-character description a row: ~500-token chat prompts), then runs each stage
in its own subprocess so that its peak RSS is its own:

- prepare: `tasks.prepare.write_shards` of a chat job with a JSON-schema output (tokens counted as
  `limits.token_counting: auto` decides: sampled above 100,000 rows);
- floor: the least work prepare does, on one thread (read, put values in a fixed frame, write): what
  this machine allows, for the prepare/floor ratio;
- naive: the same request lines made the obvious way (pandas, iterrows, str.format, json.dumps);
- collect: `tasks.collect.collect_shard` on Batch API output files synthesised for every shard (1%
  429/500 error lines), one shard at a time, then all shards on 4 threads as the flow runs them;
- load: `tasks.load.write_output` of the collected run.

It is a benchmark, not a timed test: tests/unit/test_bench_smoke.py runs it at a tiny size."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUN_DATE = "2026-01-01"
CHAT_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "audience": {"type": "string"},
        "score": {"type": "integer"},
    },
}
SYSTEM_PROMPT = (
    "You write short, factual product summaries for an online catalogue. Read the product's "
    "title, category and description, then answer with a one-sentence summary, the audience it "
    "suits best and a quality score from 1 to 10."
)
TEMPLATE = "Product: {title}\nCategory: {category}\n\n{description}"


BUCKET = "nb-bench"


def storage_root(workdir: Path, rows: int, storage: str) -> str:
    """Where a run's state and output go: local disk, or the bench bucket on S3."""
    return str(workdir / f"run-{rows}") if storage == "local" else f"s3://{BUCKET}/run-{rows}"


def source_uri(workdir: Path, rows: int, storage: str) -> str:
    if storage == "local":
        return str(source_path(workdir, rows))
    return f"s3://{BUCKET}/products-{rows}.parquet"


def job_spec(workdir: Path, rows: int, storage: str = "local") -> Any:
    from schemas.job import JobSpec

    root = storage_root(workdir, rows, storage)
    return JobSpec.model_validate(
        {
            "name": "bench",
            "source": {
                "uri": source_uri(workdir, rows, storage),
                "id_column": "sku",
                "columns": ["sku", "title", "price"],
            },
            "request": {
                "model": "gpt-4o-mini",
                "system_prompt": SYSTEM_PROMPT,
                "template": TEMPLATE,
                "params": {"max_tokens": 120, "temperature": 0},
                "output_schema": CHAT_SCHEMA,
            },
            "output_uri": f"{root}/output",
            "storage_root": f"{root}/state",
        }
    )


def source_path(workdir: Path, rows: int) -> Path:
    return workdir / f"products-{rows}.parquet"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the stages, each run in a child process -------------------------------------------------------


def stage_generate(workdir: Path, rows: int, storage: str) -> dict[str, Any]:
    from benchmarks.synth import write_products

    path = source_path(workdir, rows)
    if not path.exists():
        write_products(path, rows)
    if storage == "s3":  # the same table, in the bucket
        from tasks.storage import ObjectStore

        ObjectStore().write_bytes(source_uri(workdir, rows, storage), path.read_bytes())
    return {"bytes": path.stat().st_size}


def _fresh(workdir: Path, rows: int, storage: str) -> None:
    from tasks.storage import ObjectStore

    root = storage_root(workdir, rows, storage)
    if storage == "local":
        shutil.rmtree(root, ignore_errors=True)
    elif ObjectStore().exists(root):
        ObjectStore().remove(root, recursive=True)


def stage_prepare(workdir: Path, rows: int, storage: str) -> dict[str, Any]:
    from tasks.layout import RunLayout
    from tasks.prepare import write_shards
    from tasks.runs import new_manifest, save_manifest
    from tasks.storage import ObjectStore

    job = job_spec(workdir, rows, storage)
    _fresh(workdir, rows, storage)
    store = ObjectStore()
    started = time.perf_counter()
    result = write_shards(job, store, RunLayout(job.storage_root, job.name, RUN_DATE))
    seconds = time.perf_counter() - started
    manifest = new_manifest(job, RUN_DATE, "2026-01-01T00:00:00+00:00")
    save_manifest(
        store, manifest.model_copy(update={"shards": result.shards, "rows_selected": rows})
    )
    return {
        "rows": result.rows,
        "seconds": seconds,
        "shards": len(result.shards),
        "bytes": sum(s.bytes for s in result.shards),
        "tokens_per_row": sum(s.input_tokens for s in result.shards) / max(result.rows, 1),
        "tokens": "exact" if result.tokens_exact else "sampled",
    }


def stage_floor(workdir: Path, rows: int, storage: str) -> dict[str, Any]:
    """The least work a prepare does, on one thread: read the columns, put each row's values in a
    fixed frame of about the size of a request line (one Arrow kernel; no JSON escaping, hashing
    or token counting) and write the lines to a file. What this machine's Parquet decoding, memory
    and page cache allow, measured in the same run as prepare."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tasks.render import RequestRenderer

    frame = RequestRenderer(job_spec(workdir, rows).request).frame
    assert frame is not None
    head, middle, tail = (pa.scalar(part, pa.large_binary()) for part in frame)
    out = workdir / f"floor-{rows}.jsonl"
    started = time.perf_counter()
    source = pq.ParquetFile(source_path(workdir, rows))
    columns = ["sku", "title", "category", "description"]
    with open(out, "wb") as handle:
        for batch in source.iter_batches(batch_size=4096, columns=columns, use_threads=False):
            text = [batch.column(name).cast(pa.large_binary()) for name in columns]
            lines = pc.binary_join_element_wise(
                head,
                text[0],
                middle,
                text[1],
                text[2],
                text[3],
                tail,
                pa.scalar(b"", pa.large_binary()),
            )
            offsets = np.frombuffer(lines.buffers()[1], np.int64, len(lines) + 1)
            handle.write(memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]])
    seconds = time.perf_counter() - started
    out.unlink()
    return {"rows": source.metadata.num_rows, "seconds": seconds}


def stage_naive(workdir: Path, rows: int, storage: str) -> dict[str, Any]:
    """The same request lines, made the obvious way: a DataFrame, iterrows, json.dumps."""
    import json as std_json

    import pandas as pd

    from tasks.render import custom_id_for, strict_schema

    out = workdir / f"naive-{rows}.jsonl"
    started = time.perf_counter()
    frame = pd.read_parquet(source_path(workdir, rows))
    schema = strict_schema(CHAT_SCHEMA)
    with open(out, "w") as handle:
        for _, row in frame.iterrows():
            body = {
                "model": "gpt-4o-mini",
                "max_tokens": 120,
                "temperature": 0,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema, "strict": True},
                },
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": TEMPLATE.format(**row.to_dict())},
                ],
            }
            line = {
                "custom_id": custom_id_for(row["sku"]),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            handle.write(std_json.dumps(line) + "\n")
    seconds = time.perf_counter() - started
    out.unlink()
    return {"rows": len(frame), "seconds": seconds}


class _LocalFiles:
    """A BatchApi stand-in whose downloads come from local files (no HTTP)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def download(self, file_id: str, sink: IO[bytes]) -> int:
        with open(self.files[file_id], "rb") as handle:
            shutil.copyfileobj(handle, sink, 8 << 20)
        return self.files[file_id].stat().st_size


def stage_collect(workdir: Path, rows: int, storage: str) -> dict[str, Any]:
    from benchmarks.synth import chat_output_lines
    from tasks.collect import collect_shard
    from tasks.runs import layout_for, load_manifest, save_manifest
    from tasks.storage import ObjectStore

    job = job_spec(workdir, rows, storage)
    store = ObjectStore()
    layout = layout_for(job, RUN_DATE)
    manifest = load_manifest(store, layout)
    outputs = workdir / f"outputs-{rows}-{storage}"  # the provider's files: local, as a download
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)
    files: dict[str, Path] = {}
    shards = []
    for shard in manifest.shards:  # what the Batch API would have written (not timed)
        ids = store.read_table(layout.ids_file(1, shard.index)).column(0).to_pylist()
        path = outputs / f"output-{shard.index}.jsonl"
        with open(path, "wb") as handle:
            for line in chat_output_lines(ids, seed=shard.index):
                handle.write(line)
        files[f"file-{shard.index}"] = path
        shards.append(
            shard.model_copy(
                update={
                    "state": "terminal",
                    "batch_id": f"batch_{shard.index}",
                    "batch_status": "completed",
                    "output_file_id": f"file-{shard.index}",
                }
            )
        )
    api = _LocalFiles(files)
    lines = sum(s.lines for s in shards)
    started = time.perf_counter()
    for shard in shards:
        collect_shard(job, layout, shard, store, api)  # type: ignore[arg-type]
    one_thread = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda s: collect_shard(job, layout, s, store, api), shards))  # type: ignore[arg-type]
    four_threads = time.perf_counter() - started
    collected = [
        s.model_copy(update={"state": "collected", "results_uri": r, "errors_uri": e})
        for s, (r, e, _) in zip(shards, done, strict=True)
    ]
    save_manifest(store, manifest.model_copy(update={"shards": collected}))
    return {
        "rows": lines,
        "seconds": one_thread,
        "seconds_4_threads": four_threads,
        "bytes": sum(p.stat().st_size for p in files.values()),
    }


def stage_load(workdir: Path, rows: int, storage: str) -> dict[str, Any]:
    from tasks.load import write_output
    from tasks.runs import layout_for, load_manifest
    from tasks.storage import ObjectStore

    job = job_spec(workdir, rows, storage)
    store = ObjectStore()
    manifest = load_manifest(store, layout_for(job, RUN_DATE))
    started = time.perf_counter()
    summary = write_output(manifest, store)
    seconds = time.perf_counter() - started
    return {
        "rows": summary.rows_written + summary.rows_dead_lettered,
        "seconds": seconds,
        "written": summary.rows_written,
        "dead_lettered": summary.rows_dead_lettered,
    }


def stage_write_floor(workdir: Path, rows: int, storage: str) -> dict[str, Any]:
    """The least a prepare on this storage must spend writing: as many bytes as its shards hold,
    written in 8 MB pieces through the same atomic writer, nothing else (on moto, the server's own
    intake of the bytes, on the same cores)."""
    from tasks.runs import layout_for, load_manifest
    from tasks.storage import ObjectStore

    job = job_spec(workdir, rows, storage)
    store = ObjectStore()
    total = sum(s.bytes for s in load_manifest(store, layout_for(job, RUN_DATE)).shards)
    piece = (b'{"custom_id": "r-0", "body": "' + b"x" * 1000 + b'"}\n') * (8 << 10)
    uri = f"{storage_root(workdir, rows, storage)}/write-floor.bin"
    started = time.perf_counter()
    with store.open_atomic(uri) as handle:
        left = total
        while left > 0:
            handle.write(piece[: min(left, len(piece))])
            left -= len(piece)
    seconds = time.perf_counter() - started
    store.remove(uri)
    return {"rows": rows, "seconds": seconds, "bytes": total}


STAGES = {
    "write_floor": stage_write_floor,
    "generate": stage_generate,
    "prepare": stage_prepare,
    "naive": stage_naive,
    "floor": stage_floor,
    "collect": stage_collect,
    "load": stage_load,
}


def run_child(stage: str, workdir: Path, rows: int, storage: str = "local") -> dict[str, Any]:
    """Run one stage in a fresh interpreter; its result and its own peak RSS come back as JSON."""
    command = [sys.executable, __file__, "--stage", stage, "--rows", str(rows)]
    command += ["--workdir", str(workdir), "--storage", storage]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{done.stdout}\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---- the report ---------------------------------------------------------------------------------


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def report(results: dict[str, dict[str, Any]], storages: tuple[str, ...] = ("local",)) -> str:
    """One table of every stage (on each storage), then the S3/disk ratio per stage."""
    naive = results.get("naive")
    floor = results.get("floor")
    rows = [
        ("stage", "storage", "rows", "seconds", "rows/s", "peak RSS (MB)", "vs naive", "vs floor")
    ]

    def line(name: str, storage: str, result: dict[str, Any], seconds: float) -> None:
        rate = result["rows"] / seconds if seconds else float("inf")
        ratio = to_floor = ""
        if name == "prepare" and naive:
            ratio = f"{naive['seconds'] / naive['rows'] * rate:.1f}x"
        if name == "prepare" and floor:
            to_floor = f"{floor['seconds'] / floor['rows'] * rate:.0%}"
        rows.append(
            (name, storage, f"{result['rows']:,}", f"{seconds:.2f}", f"{rate:,.0f}",
             f"{result['peak_rss_mb']:,.0f}", ratio, to_floor)
        )  # fmt: skip

    for name in ("prepare", "write_floor", "collect", "load"):
        for storage in storages:
            result = results.get(_key(name, storage))
            if result is None:
                continue
            line(name, storage, result, result["seconds"])
            if name == "collect":
                line("collect (4 threads)", storage, result, result["seconds_4_threads"])
    for name in ("floor", "naive"):
        if name in results:
            line(name, "local", results[name], results[name]["seconds"])
    text = _table(rows)
    if set(storages) == {"local", "s3"}:
        ratios = [("stage", "local (s)", "S3 (s)", "S3 / local")]
        for name, field in (("prepare", "seconds"), ("collect", "seconds"),
                            ("collect (4 threads)", "seconds_4_threads"), ("load", "seconds")):  # fmt: skip
            base = name.split(" ")[0]
            local, s3 = results[_key(base, "local")][field], results[_key(base, "s3")][field]
            ratios.append((name, f"{local:.2f}", f"{s3:.2f}", f"{s3 / local:.2f}x"))
        floor_local = results[_key("write_floor", "local")]["seconds"]
        floor_s3 = results[_key("write_floor", "s3")]["seconds"]
        prepare_local = results[_key("prepare", "local")]["seconds"]
        prepare_s3 = results[_key("prepare", "s3")]["seconds"]
        ratios.append(
            ("prepare beyond writing its bytes", f"{prepare_local - floor_local:.2f}",
             f"{prepare_s3 - floor_s3:.2f}",
             f"{(prepare_s3 - floor_s3) / max(prepare_local - floor_local, 1e-9):.2f}x")
        )  # fmt: skip
        text += "\n\n" + _table(ratios)
    return text


def _key(stage: str, storage: str) -> str:
    return stage if storage == "local" else f"{stage}@{storage}"


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server over HTTP in its own process, the AWS variables pointing at it (children
    inherit them), and the bench bucket."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS}
    os.environ.update(
        AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        yield url
    finally:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # clients of this server must not outlive it
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path(".nightbatch/bench"))
    parser.add_argument("--memory-only", action="store_true", help="skip the naive baseline")
    parser.add_argument(
        "--storage", choices=["both", "local", "s3"], default="both",
        help="local disk, S3 (a moto server over HTTP), or both in the same run (the default)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.stage:  # a child: run one stage, print its result
        result = STAGES[args.stage](workdir, args.rows, args.storage)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return 0
    storages: tuple[str, ...] = ("local", "s3") if args.storage == "both" else (args.storage,)
    results: dict[str, dict[str, Any]] = {}
    with moto_s3() if "s3" in storages else contextlib.nullcontext():
        for storage in storages:
            run_child("generate", workdir, args.rows, storage)
            for stage in ("prepare", "write_floor", "collect", "load"):
                results[_key(stage, storage)] = run_child(stage, workdir, args.rows, storage)
                print(f"{stage} ({storage}): {json.dumps(results[_key(stage, storage)])}",
                      file=sys.stderr, flush=True)  # fmt: skip
    for stage in ["floor"] + ([] if args.memory_only else ["naive"]):  # CPU baselines, from disk
        results[stage] = run_child(stage, workdir, args.rows)
    first = results[_key("prepare", storages[0])]
    print(f"\n{args.rows:,} rows, {os.cpu_count()} CPUs, prompts of "
          f"~{first['tokens_per_row']:.0f} tokens ({first['tokens']})\n")  # fmt: skip
    print(report(results, storages))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
