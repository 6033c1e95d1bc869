"""The emulator's per-line work, timed: validation, line processing, output file, on one input file.

    .venv/bin/python benchmarks/emulator_throughput.py [--input FILE.jsonl] [--lines N] [--profile]

Without `--input` it makes a synthetic chat shard like the benchmark's (benchmarks/bench.py: products
table, system prompt, template, JSON-schema response format). Prints seconds per phase and lines/s; with
`--profile`, the top of a cProfile of the whole run.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENDPOINT = "/v1/chat/completions"


def synthetic_shard(rows: int) -> bytes:
    """`rows` chat request lines as the benchmark's prepare writes them (its job, its renderer)."""
    import pyarrow as pa

    from benchmarks.bench import job_spec
    from benchmarks.synth import iter_product_chunks
    from tasks.render import RequestRenderer

    renderer = RequestRenderer(job_spec(Path(tempfile.gettempdir()), rows).request)
    table = pa.concat_tables(iter_product_chunks(rows))
    rendered = [renderer.render_batch(batch, "sku") for batch in table.to_batches()]
    return b"".join(bytes(r.chunk(0, len(r))) for r in rendered)


def run(data: bytes, helpers: bool = False) -> dict[str, Any]:
    """Validation (prompt tokens on 2 threads here, or with `helpers` in the server's helper
    processes, started before timing), line processing, persistence and the output file."""
    from emulator.config import EmulatorConfig
    from emulator.faults import FaultCounters
    from emulator.lines import file_content, process_line
    from emulator.models import BatchRecord
    from emulator.validation import validate_input
    from tasks.tokens import encoding_for_model

    config = EmulatorConfig(clock_scale=1e6, lines_per_second=1e9)
    encoding_for_model("gpt-4o-mini")  # loaded once per server, not per batch: not timed
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock = [time.perf_counter(), time.process_time()]

    def lap(phase: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        timings[phase], cpu[phase] = now[0] - clock[0], now[1] - clock[1]
        clock[:] = now

    tokens = None
    if helpers:
        from emulator.tokens import PromptTokenCounter

        tokens = PromptTokenCounter()
        warm = tokens.start_file(ENDPOINT, data[: 8 << 20])
        assert warm is not None and warm() is not None, "helper processes did not start"
        lap("setup")
    if tokens is None:  # (the call of earlier versions, which had no token helpers)
        validation = validate_input(data, ENDPOINT, config)
    else:
        validation = validate_input(data, ENDPOINT, config, tokens)
    lap("validate")
    if tokens is not None:
        tokens.close()
    assert not validation.errors, validation.errors[:3]
    batch = BatchRecord(
        id="batch_bench",
        seq=1,
        input_file_id="file-bench",
        endpoint=ENDPOINT,
        created_t=1.8e9,
        expires_t=1.8e9 + 86400,
        validation_due_t=1.8e9,
        status="in_progress",
        in_progress_t=1.8e9,
        total=len(validation.lines),
        lines_per_second=config.lines_per_second,
        pace_t=1.8e9,
    )
    counters = FaultCounters()
    lap("setup")
    records = [
        process_line(batch, k, line, tokens, config, counters)
        for k, (line, tokens) in enumerate(
            zip(validation.lines, validation.prompt_tokens, strict=True)
        )
    ]
    lap("process")
    with tempfile.TemporaryDirectory() as tmp:
        from emulator.store import StateStore

        store = StateStore(Path(tmp))
        (store.batches_dir / batch.id).mkdir(parents=True)
        for start in range(0, len(records), 256):
            store.append_results(batch.id, records[start : start + 256])
        lap("persist")
        stored = store.read_results(batch.id)
        items = [(r["custom_id"], r["line"]) for r in stored if r["ok"]]
        content = file_content(items, batch, shuffle=True)
        lap("output")
    del timings["setup"], cpu["setup"]
    timings["total"], cpu["total"] = sum(timings.values()), sum(cpu.values())
    return {"lines": len(records), "output_bytes": len(content), "seconds": timings, "cpu": cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="a chat request JSONL file (default: synthetic)")
    parser.add_argument("--lines", type=int, default=20_000, help="at most this many lines")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--helpers",
        action="store_true",
        help="count prompt tokens in helper processes, as the server does for large files "
        "(their CPU is not in the CPU column)",
    )
    args = parser.parse_args(argv)
    if args.input is not None:
        data = b"".join(args.input.read_bytes().splitlines(keepends=True)[: args.lines])
    else:
        data = synthetic_shard(args.lines)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    result = run(data, helpers=args.helpers)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    lines = result["lines"]
    for phase, seconds in result["seconds"].items():
        cpu = result["cpu"][phase]
        print(
            f"{phase:>9}: {seconds:6.2f} s {lines / seconds:9,.0f} lines/s"
            f"   CPU {cpu:6.2f} s {cpu / lines * 1e6:6.1f} µs/line"
        )
    print(
        f"{lines:,} lines, {len(data) / 1e6:.1f} MB in, {result['output_bytes'] / 1e6:.1f} MB out"
    )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
