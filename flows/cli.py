"""The `nightbatch` command."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _embedded_prefect_defaults() -> None:
    """Quiet, self-contained defaults for the embedded Prefect (only where the user set nothing)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL", "WARNING")


@contextlib.contextmanager
def emulator_env(state_dir: Path, clock_scale: float | None = None) -> Iterator[str]:
    """Start the bundled Batch API emulator in-process and point the OpenAI settings at it."""
    from emulator.server import EmulatorServer

    from emulator.config import EmulatorConfig

    config = EmulatorConfig() if clock_scale is None else EmulatorConfig(clock_scale=clock_scale)
    saved = {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    with EmulatorServer(state_dir, config=config) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        os.environ["OPENAI_API_KEY"] = "emulator-key"
        try:
            yield server.base_url
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _print_summary(result: dict[str, Any], cost_uri: str | None) -> None:
    import pyarrow.parquet as pq

    from flows.context import build_store
    from schemas.settings import Settings

    print(f"\nrun {result['run_id']}: {result['status']}")
    print(f"  rows selected : {result['rows']}")
    if cost_uri:
        store = build_store(Settings.from_env())
        record = store.read_table(cost_uri).to_pylist()
        succeeded = record[0]["requests_succeeded"] if record else 0
        dead = record[0]["requests_dead_lettered"] if record else 0
        print(f"  enriched      : {succeeded}")
        print(f"  dead-lettered : {dead}")
        batch = sum(r["cost_batch_usd"] for r in record)
        standard = sum(r["cost_standard_usd"] for r in record)
        print(
            f"  cost          : ${batch:.6f} at batch prices (standard ${standard:.6f}, saved ${standard - batch:.6f})"
        )
        del pq
    print(f"  output        : {result['output']}")
    print(f"  cost record   : {cost_uri}")


def cmd_run(args: argparse.Namespace) -> int:
    _embedded_prefect_defaults()
    from flows.stages import pipeline
    from schemas.job import JobSpec

    job = JobSpec.from_yaml(args.job)
    with contextlib.ExitStack() as stack:
        if args.emulator:
            state = Path(args.emulator_state or Path(tempfile.gettempdir()) / "nightbatch-emulator")
            url = stack.enter_context(emulator_env(state))
            print(f"using the bundled Batch API emulator at {url}")
        result = pipeline(job, run_date=args.run_date, poll_interval_seconds=args.poll_interval)
    _print_summary(result, result.get("cost_record"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows.context import build_store
    from schemas.job import JobSpec
    from schemas.settings import Settings
    from tasks.runs import list_manifests

    root = (
        JobSpec.from_yaml(args.target).storage_root
        if args.target.endswith((".yaml", ".yml"))
        else args.target
    )
    manifests = list_manifests(build_store(Settings.from_env()), root)
    if not manifests:
        print(f"no runs under {root}")
        return 0
    for m in sorted(manifests, key=lambda m: (m.job_name, m.run_date)):
        if args.run_date and m.run_date != args.run_date:
            continue
        print(
            f"{m.run_id}: {m.status}, {m.rows_selected} rows, {len(m.shards)} shards, updated {m.updated_at}"
        )
        for s in m.shards:
            c = s.counts
            print(
                f"  {s.shard_id}  {s.state:<10} batch={s.batch_id or '-'} status={s.batch_status or '-'} "
                f"lines={s.lines} ok={c.succeeded} failed={c.failed} missing={c.missing}"
            )
    return 0


def cmd_emulator(args: argparse.Namespace, rest: list[str]) -> int:
    from emulator.cli import main as emulator_main

    return emulator_main(rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    _embedded_prefect_defaults()
    return run_demo(Path(args.dir), rows=args.rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nightbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job end to end (resumes an existing run)")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("--run-date", help="logical date YYYY-MM-DD (default: today, UTC)")
    run.add_argument("--emulator", action="store_true", help="use the bundled Batch API emulator")
    run.add_argument("--emulator-state", help="state directory of the emulator")
    run.add_argument("--poll-interval", type=float, default=None, help="seconds between polls")
    status = sub.add_parser("status", help="list runs and their shard states")
    status.add_argument("target", help="a job spec YAML or a storage root")
    status.add_argument("--run-date")
    demo = sub.add_parser(
        "demo", help="generate sample data and run the sample jobs on the emulator"
    )
    demo.add_argument(
        "--dir", default=".nightbatch/demo", help="where the demo writes (default .nightbatch/demo)"
    )
    demo.add_argument("--rows", type=int, default=1000)
    sub.add_parser(
        "emulator",
        help="start the bundled Batch API emulator (see `nightbatch emulator --help`)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["emulator"]:
        return cmd_emulator(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    from tasks.errors import NightbatchError

    try:
        return {"run": cmd_run, "status": cmd_status, "demo": cmd_demo}[args.command](args)
    except NightbatchError as exc:
        print(f"nightbatch: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
