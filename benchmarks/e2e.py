"""`nightbatch run` end to end on the bundled emulator with a fast clock, timed.

    .venv/bin/python benchmarks/e2e.py --rows 1000000

Uses the benchmark's products table and chat job (benchmarks/bench.py), the emulator in-process
with a clock fast enough that batches finish as soon as the emulator has produced their lines, and
the `pipeline` flow (prepare, submit, wait, collect, retry-failures, load) on an embedded Prefect."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path(".nightbatch/bench"))
    parser.add_argument("--clock-scale", type=float, default=1e6)
    parser.add_argument("--lines-per-second", type=float, default=1e9)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="nightbatch-e2e-prefect-"))

    from benchmarks.bench import job_spec, run_child
    from emulator.config import EmulatorConfig
    from emulator.server import EmulatorServer

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_child("generate", workdir, args.rows)
    job = job_spec(workdir, args.rows)
    shutil.rmtree(workdir / f"run-{args.rows}", ignore_errors=True)
    config = EmulatorConfig(
        clock_scale=args.clock_scale,
        lines_per_second=args.lines_per_second,
        shuffle_output=True,
    )
    state = Path(tempfile.mkdtemp(prefix="nightbatch-e2e-emulator-"))
    with EmulatorServer(state, config=config) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        os.environ["OPENAI_API_KEY"] = "emulator-key"
        from flows.stages import pipeline

        started = time.perf_counter()
        result = pipeline(job, run_date="2026-01-01", poll_interval_seconds=args.poll_interval)
        seconds = time.perf_counter() - started
    shutil.rmtree(state, ignore_errors=True)
    print(f"\nnightbatch run of {args.rows:,} rows on the emulator: {seconds:.1f} s, {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
