"""The `nightbatch` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.emulated import maybe_emulator
from flows.signals import Terminated, stopped_by_signals
from tasks.errors import BadInputError, NightbatchError

if TYPE_CHECKING:
    from tasks.preflight import PreflightResult

from flows.inspecting import cmd_cache, cmd_costs, cmd_status


def _embedded_prefect_defaults() -> None:
    """Quiet, self-contained defaults for the embedded Prefect (only where the user set nothing)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    if not os.environ.get("PREFECT_API_URL"):  # the temporary server, on this machine
        # Ctrl-C reaches the temporary server too (one process group) and it stops at once:
        # without this the client retried the gone server for minutes before exiting
        os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "1")


def _print_summary(result: dict[str, Any], cost_uri: str | None) -> None:
    from flows.context import build_store
    from schemas.settings import Settings

    print(f"\nrun {result['run_id']}: {result['status']}")
    print(f"  rows selected : {result['rows']}")
    if cost_uri:
        store = build_store(Settings.from_env())
        record = store.read_table(cost_uri).to_pylist()
        succeeded = sum(r["requests_succeeded"] for r in record)
        cached = sum(r["requests_cached"] or 0 for r in record)
        dead = record[0]["requests_dead_lettered"] if record else 0
        print(f"  enriched      : {succeeded + cached} ({cached} served from the result cache)")
        print(f"  dead-lettered : {dead}")
        if result.get("not_sent"):
            print(f"    of which not sent: {result['not_sent']} (they could not succeed)")
        batch = sum(r["cost_batch_usd"] for r in record)
        standard = sum(r["cost_standard_usd"] for r in record)
        print(
            f"  cost          : ${batch:.6f} at batch prices (standard ${standard:.6f}, saved ${standard - batch:.6f})"
        )
    print(f"  output        : {result['output']}")
    print(f"  dead letter   : {result.get('dead_letter')}")
    print(f"  cost record   : {cost_uri}")


def _checked_job(
    args: argparse.Namespace, need_run: bool = False, source: bool = True
) -> PreflightResult:
    """The pre-flight of a run command: the spec, its source, its storage root and the run it would
    resume, checked before Prefect or the emulator start (a typo answers in about a second)."""
    from flows.context import build_store
    from schemas.rundate import run_date_at
    from schemas.settings import Settings
    from tasks.preflight import preflight, read_job

    job = read_job(args.job)
    settings = Settings.from_env()
    if not getattr(args, "emulator", False) and settings.openai_api_key is None:
        raise BadInputError(
            "OPENAI_API_KEY is not set. Set it to use OpenAI, or add --emulator for a free dry run "
            "against the bundled emulator."
        )
    date = args.run_date or run_date_at(datetime.now(UTC), settings.run_date_timezone)
    api = "emulator" if getattr(args, "emulator", False) else settings.api_identity
    checked = preflight(job, date, build_store(settings), api, source=source)
    if need_run and checked.existing is None:
        raise BadInputError(
            f"no run {job.name}-{date} under {job.storage_root}: nothing to {args.command}. "
            f"`nightbatch run {args.job} --run-date {date}` starts it (check the --run-date)."
        )
    return checked


def _poll_interval(args: argparse.Namespace) -> float | None:
    """--poll-interval, else 1 s against the bundled emulator (it answers in seconds), else the
    setting (NIGHTBATCH_POLL_INTERVAL_SECONDS, 60 s)."""
    if args.poll_interval is not None:
        return float(args.poll_interval)
    return 1.0 if getattr(args, "emulator", False) else None


def cmd_run(args: argparse.Namespace) -> int:
    checked = _checked_job(args, need_run=args.command == "resume")
    _embedded_prefect_defaults()
    from flows.stages import pipeline

    with maybe_emulator(args, checked.job.storage_root):
        state = pipeline(
            checked.job,
            run_date=checked.run_date,
            poll_interval_seconds=_poll_interval(args),
            return_state=True,
        )
    from tasks.errors import RunWentBadlyError

    result = state.result(raise_on_failure=False)
    if isinstance(result, RunWentBadlyError):
        result = result.summary
    if not isinstance(result, dict):  # failed before loading: raise what stopped it
        state.result()
        raise AssertionError("unreachable")
    _print_summary(result, result.get("cost_record"))
    if result.get("went_badly"):
        print(f"\nnightbatch: the run went badly: {result['went_badly']}", file=sys.stderr)
        print(f"  dead letter   : {result['dead_letter']}", file=sys.stderr)
        return 3
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What a run would do and cost, without Prefect, a run or an upload (tasks.plan)."""
    from flows.context import build_store
    from schemas.settings import Settings
    from tasks.plan import make_plan, plan_lines

    settings = Settings.from_env()
    args.emulator = args.emulator or settings.openai_api_key is None  # plan needs no key
    checked = _checked_job(args)
    plan = make_plan(checked, build_store(settings))
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print("\n".join(plan_lines(plan)))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    checked = _checked_job(args, need_run=True)
    _embedded_prefect_defaults()
    from flows.stages import retry_run

    with maybe_emulator(args, checked.job.storage_root):
        result = retry_run(checked.job, run_date=checked.run_date,
                           extra_attempts=args.extra_attempts,
                           poll_interval_seconds=_poll_interval(args))  # fmt: skip
    _print_summary(result, result.get("cost_record"))
    return 0


def cmd_abandon(args: argparse.Namespace) -> int:
    checked = _checked_job(args, need_run=True, source=False)
    _embedded_prefect_defaults()
    from flows.stages import abandon

    with maybe_emulator(args, checked.job.storage_root):
        result = abandon(checked.job, run_date=checked.run_date)
    print(
        f"run {result['run_id']} abandoned; cancelled batches: {', '.join(result['cancelled']) or 'none'}"
    )
    return 0


def cmd_emulator(args: argparse.Namespace, rest: list[str]) -> int:
    from emulator.cli import main as emulator_main

    return emulator_main(rest)


def cmd_samples(args: argparse.Namespace) -> int:
    from flows.demo import EXAMPLES, write_sample_data

    write_sample_data(EXAMPLES / "data", args.rows)
    print(f"wrote sample data for the jobs in {EXAMPLES} to {EXAMPLES / 'data'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    _embedded_prefect_defaults()
    return run_demo(Path(args.dir), rows=args.rows)


def _job_command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument("job", help="job spec YAML")
    cmd.add_argument("--run-date", help="logical date YYYY-MM-DD (default: today, UTC)")
    cmd.add_argument("--emulator", action="store_true", help="use the bundled Batch API emulator")
    cmd.add_argument("--emulator-state", help="state directory of the emulator (keep it to resume)")
    cmd.add_argument("--poll-interval", type=float, default=None, help="seconds between polls")
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightbatch", description="Nightly LLM enrichment through the OpenAI Batch API."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not just its message"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _job_command(sub, "run", "run a job end to end, resuming the run if it exists")
    _job_command(sub, "resume", "the same as run: carry an existing run on from where it stopped")
    retry = _job_command(
        sub, "retry", "give a finished run's failed rows more attempts, then reload it"
    )
    retry.add_argument("--extra-attempts", type=int, default=1)
    _job_command(sub, "abandon", "cancel a run's open batches and mark it abandoned")
    plan = sub.add_parser(
        "plan",
        help="what a run would select, send and cost; nothing is written, uploaded or sent",
    )
    plan.add_argument("job", help="job spec YAML")
    plan.add_argument("--run-date", help="logical date YYYY-MM-DD (default: today)")
    plan.add_argument(
        "--emulator", action="store_true", help="plan against the emulator's cache namespace"
    )
    plan.add_argument("--json", action="store_true", help="the plan as JSON, for scripts")
    status = sub.add_parser("status", help="runs, shard states, attempts and errors by reason")
    status.add_argument("target", help="a job spec YAML or a storage root")
    status.add_argument("--all", action="store_true", help="every job under the storage root")
    status.add_argument("--run-date")
    costs = sub.add_parser("costs", help="cost totals by job, day and tag, with savings")
    costs.add_argument("target", help="a job spec YAML or a storage root")
    costs.add_argument("--all", action="store_true", help="every job under the storage root")
    cache = sub.add_parser(
        "cache", help="result cache size and hit rates; prune old entries, compact segments"
    )
    cache.add_argument("target", help="a job spec YAML or a storage root")
    cache.add_argument("--all", action="store_true", help="every job under the storage root")
    cache.add_argument(
        "--prune-older-than",
        type=float,
        metavar="DAYS",
        help="delete entries older than DAYS (needs a job spec)",
    )
    cache.add_argument(
        "--compact",
        action="store_true",
        help="merge the job's cache segments into a few large ones (needs a job spec)",
    )
    demo = sub.add_parser(
        "demo", help="generate sample data and run the sample jobs on the emulator"
    )
    demo.add_argument(
        "--dir", default=".nightbatch/demo", help="where the demo writes (default .nightbatch/demo)"
    )
    demo.add_argument("--rows", type=int, default=1000)
    samples = sub.add_parser("samples", help="write the sample jobs' data to examples/data")
    samples.add_argument("--rows", type=int, default=1000)
    sub.add_parser(
        "emulator",
        help="start the bundled Batch API emulator (see `nightbatch emulator --help`)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 an unexpected error (a bug: the traceback is shown); 2 bad input or an
    operational error, one message naming the fix; 3 loaded, but the run went badly; 130 / 143
    stopped by Ctrl-C / SIGTERM (after stopping what it started)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    if argv[:1] == ["emulator"]:
        return cmd_emulator(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    from schemas.rundate import RunDateError

    commands = {
        "run": cmd_run, "resume": cmd_run, "retry": cmd_retry, "abandon": cmd_abandon,
        "plan": cmd_plan, "status": cmd_status, "costs": cmd_costs, "cache": cmd_cache,
        "demo": cmd_demo, "samples": cmd_samples,
    }  # fmt: skip
    from tasks.storage import NoCredentialsError, access_refused

    try:
        with stopped_by_signals():
            if getattr(args, "run_date", None):  # one spelling per day, before anything starts
                from schemas.rundate import parse_run_date

                args.run_date = parse_run_date(args.run_date)
            return commands[args.command](args)
    except (NightbatchError, RunDateError, PermissionError, NoCredentialsError) as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, PermissionError | NoCredentialsError):  # from object storage
            where = str(getattr(args, "target", None) or getattr(args, "job", None) or "storage")
            exc = access_refused(where, exc)
        print(f"nightbatch: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `nightbatch costs ... | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    except BaseException as exc:
        # stopped by a signal: whatever the way out raised (Ctrl-C also stops Prefect's temporary
        # server, so Prefect's last calls to it fail), say so in one line
        signum = exc.signum if isinstance(exc, Terminated) else Terminated.received
        if signum is None:
            raise
        if debug:
            traceback.print_exc()
        how = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"nightbatch: stopped ({how}); rerun the same command to resume", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    raise SystemExit(main())
