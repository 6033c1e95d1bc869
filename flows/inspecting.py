"""The operator commands that read a storage root: status, costs, cache."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.job import JobSpec
    from schemas.manifest import RunManifest, Shard

BATCH_ERRORS_SHOWN = 5  # a failed batch's validation errors printed under its shard


def _is_job_file(target: str) -> bool:
    return target.endswith((".yaml", ".yml"))


def _scope(args: argparse.Namespace) -> tuple[str, JobSpec | None]:
    """The storage root, and the job to show: None (every job under the root) for a storage root or
    with --all."""
    from tasks.preflight import read_job

    if not _is_job_file(args.target):
        return args.target, None
    job = read_job(args.target)
    return job.storage_root, None if getattr(args, "all", False) else job


def _print_scope(root: str, job: JobSpec | None, job_names: list[str]) -> None:
    if job is not None:
        print(f"job {job.name} under {root} (--all: every job there)")
    else:
        print(f"all jobs under {root}: {', '.join(sorted(set(job_names))) or 'none'}")


def _of_job(manifests: list[RunManifest], job: JobSpec | None) -> list[RunManifest]:
    return [m for m in manifests if job is None or m.job_name == job.name]


def _print_batch_errors(shard: Shard) -> None:
    """A failed batch's validation errors (the first few), as the poll recorded them on the shard."""
    if shard.batch_status != "failed":
        return
    if not shard.batch_errors:
        print("      batch failed (no validation errors recorded)")
        return
    print("      batch failed validation:")
    for e in shard.batch_errors[:BATCH_ERRORS_SHOWN]:
        where = f"line {e.get('line')}: " if e.get("line") else ""
        print(f"        {e.get('code') or 'batch_failed'}: {where}{e.get('message')}")
    if len(shard.batch_errors) > BATCH_ERRORS_SHOWN:
        print(f"        ... and {len(shard.batch_errors) - BATCH_ERRORS_SHOWN} more")


def cmd_status(args: argparse.Namespace) -> int:
    from collections import Counter

    from flows.context import build_store
    from schemas.settings import Settings
    from tasks.providerfiles import held_files
    from tasks.runs import list_manifests

    root, job = _scope(args)
    store = build_store(Settings.from_env())
    everything = list_manifests(store, root)
    _print_scope(root, job, [m.job_name for m in everything])
    manifests = [
        m for m in _of_job(everything, job) if not args.run_date or m.run_date == args.run_date
    ]
    if not manifests:
        print(f"no runs of job {job.name} under {root}" if job else f"no runs under {root}")
        return 0
    for m in sorted(manifests, key=lambda m: (m.job_name, m.run_date)):
        attempts = max((s.attempt for s in m.shards), default=0)
        print(
            f"{m.run_id}: {m.status} — {m.rows_selected} rows, {len(m.shards)} shards, {attempts} attempt(s), updated {m.updated_at}"
        )
        if m.estimate:
            print(
                f"  estimate ${m.estimate.batch_usd:.4f} at batch prices, {m.estimate.input_tokens} input tokens"
            )
        reasons: Counter[str] = Counter()
        for s in m.shards:
            c = s.counts
            status = s.batch_status if s.state in ("submitted", "terminal") else s.state
            print(
                f"  {s.shard_id}  attempt {s.attempt}  {status:<11} lines={s.lines:<6} ok={c.succeeded:<6} "
                f"failed={c.failed:<5} retryable={c.retryable:<5} missing={c.missing:<4} batch={s.batch_id or '-'}"
            )
            _print_batch_errors(s)
            if s.errors_uri and c.failed:
                codes = store.read_table(s.errors_uri, columns=["code"]).column(0).to_pylist()
                reasons.update(str(code) for code in codes)
        if reasons:
            print(
                "  errors by reason: "
                + ", ".join(f"{code}={n}" for code, n in reasons.most_common())
            )
        if m.status == "loaded":
            print(
                f"  output: {m.output_file_uri}  dead-lettered: {m.dead_lettered}  cost record: {m.cost_record_uri}"
            )
        if m.dead_letter_uri:
            print(f"  dead letter: {m.dead_letter_uri}")
        held = held_files(m)
        if held:
            kept = " (provider_files: keep)" if m.job.provider_files == "keep" else ""
            print(
                f"  files at the provider{kept}: {len(held)} ({', '.join(held[:4])}{' ...' if len(held) > 4 else ''})"
            )
        for note in m.notes:
            print(f"  note: {note}")
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    from flows.context import build_store
    from schemas.settings import Settings
    from tasks.costreport import cost_totals, read_cost_records

    root, job = _scope(args)
    records = read_cost_records(build_store(Settings.from_env()), root)
    _print_scope(root, job, [str(name) for name in records["job"].unique()])
    if job is not None:
        records = records[records["job"] == job.name]
    if records.empty:
        print(f"no cost records of job {job.name} under {root}/costs" if job else
              f"no cost records under {root}/costs")  # fmt: skip
        return 0
    for by in ("job", "run_date", "tag"):
        print(f"\nby {by}:")
        print(cost_totals(records, by).to_string(index=False))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from flows.context import build_store
    from schemas.settings import Settings
    from tasks.cache import ResultCache, cache_report, namespace
    from tasks.preflight import read_job
    from tasks.runs import list_manifests

    root, job = _scope(args)
    settings = Settings.from_env()
    store = build_store(settings)
    if args.prune_older_than is not None or args.compact:
        if not _is_job_file(args.target):
            print("--prune-older-than and --compact need a job spec (its cache namespace)",
                  file=sys.stderr)  # fmt: skip
            return 2
        cache = ResultCache(store, root, read_job(args.target), settings.api_identity)
        if args.prune_older_than is not None:
            removed = cache.prune(args.prune_older_than, datetime.now(UTC))
            print(
                f"removed entries older than {args.prune_older_than} days from {removed} segment(s)"
            )
        if args.compact:
            before, after = cache.compact(datetime.now(UTC))
            print(f"compacted {before} segment(s) into {after}")
    everything = list_manifests(store, root)
    _print_scope(root, job, [m.job_name for m in everything])
    users: dict[str, set[str]] = {}  # namespace: the jobs whose runs used it (they are shared)
    for m in everything:
        users.setdefault(namespace(m.job, m.api), set()).add(m.job_name)
    report = cache_report(store, root)
    if job is not None:
        mine = {ns for ns, names in users.items() if job.name in names}
        mine.add(namespace(job, settings.api_identity))  # the one its next run (and upkeep) uses
        report = [row for row in report if row["namespace"] in mine]
    if not report:
        print(
            f"the cache of job {job.name} under {root}/cache is empty"
            if job
            else f"the cache under {root}/cache is empty"
        )
    for row in report:
        used_by = ", ".join(sorted(users.get(row["namespace"], ()))) or "no run under the root"
        print(
            f"{row['namespace']}: {row['entries']} entries in {row['segments']} segments, "
            f"{row['bytes'] / 1e6:.2f} MB (used by: {used_by})"
        )
    print("hit rates:")
    for m in sorted(_of_job(everything, job), key=lambda m: (m.job_name, m.run_date)):
        rate = 100.0 * m.cache_hits / m.rows_selected if m.rows_selected else 0.0
        print(
            f"  {m.run_id}: {m.cache_hits} of {m.rows_selected} rows from the cache ({rate:.1f}%)"
        )
    return 0
