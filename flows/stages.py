"""The stage flows. Each is runnable alone on an existing run and, once its own step is done, goes
on with whatever the run needs next that can be done now (`advance_run`): a collect that finds
every batch done goes on to retry-failures or load in the same flow run, a submit whose batches
finish within `NIGHTBATCH_CHAIN_WAIT_SECONDS` collects them. Only a wait on the provider ends a
stage run; the scheduled poller picks the run up again. `pipeline` does the same with inline
polling until the run is loaded (local use and small jobs)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import observe
from flows.advancing import advance_run, outcome, summary
from flows.context import build_batch_api, build_store, resolve_job, resolve_run_date
from flows.runstages import collect_stage, load_stage, poll_stage, prepare_stage, retry_stage
from flows.submitting import submit_stage
from schemas.job import JobSpec
from schemas.manifest import RunManifest
from schemas.settings import Settings
from tasks import transitions as tr
from tasks.advance import next_step
from tasks.cache import ResultCache
from tasks.errors import NightbatchError, TerminalError
from tasks.runs import (
    check_api,
    find_manifest,
    layout_for,
    load_manifest,
    refresh_job,
    update_manifest,
    utc_now,
)
from tasks.storage import ObjectStore

# The stages' tasks wait on the Batch API and object storage; prepare's CPU work runs on its own
# pools (tasks/prepare.py). Four threads per flow run are plenty for both.
TASK_RUNNER: Any = ThreadPoolTaskRunner(max_workers=4)


def _job_name() -> str | None:
    """The job's name, from the flow run's `job` parameter (a spec, its dict or its file)."""
    job = flow_run.parameters.get("job")
    job_name = getattr(job, "name", None) or (job.get("name") if isinstance(job, dict) else None)
    if job_name is None and isinstance(job, str):
        job_name = job.rsplit("/", 1)[-1].removesuffix(".yaml")
    return job_name


def _run_name(stage: str, attempt: bool = False) -> Any:
    """`{stage}-{job}-{run_date}`, and `-a{attempt}` for stages that work on an existing run (read
    from its manifest: the name is right from the flow run's first log line)."""

    def name() -> str:
        given = flow_run.parameters.get("run_date")
        try:
            run_date = resolve_run_date(given)
        except NightbatchError:  # the flow itself says what is wrong with it
            return f"{stage}-{_job_name()}-{given}"
        base = f"{stage}-{_job_name()}-{run_date}"
        if not attempt:
            return base
        try:
            spec = resolve_job(flow_run.parameters["job"])
            store = build_store(Settings.from_env())
            manifest = find_manifest(store, layout_for(spec, run_date))
        except Exception:  # noqa: BLE001 - a name is not worth failing the run for
            return base
        return f"{base}-a{manifest.current_attempt if manifest else 1}"

    return name


def open_run(job: JobSpec | str, run_date: str | None) -> tuple[Settings, ObjectStore, RunManifest]:
    """Settings, storage and the manifest of an existing run, with the current job spec applied."""
    spec, date = resolve_job(job), resolve_run_date(run_date)
    settings = Settings.from_env()
    store = build_store(settings)
    manifest = check_api(
        refresh_job(load_manifest(store, layout_for(spec, date)), spec), settings.api_identity
    )
    return settings, store, manifest


def _chained(
    stage: str, job: JobSpec | str, run_date: str | None, continue_run: bool
) -> dict[str, Any]:
    """A stage flow's body: open the run, do the stage's own step, then (with `continue_run`)
    advance the run as far as it goes now."""
    settings, store, manifest = open_run(job, run_date)
    api = build_batch_api(settings)
    if continue_run:
        manifest = advance_run(manifest, store, api, settings, settings.chain_wait_seconds)
        return outcome(manifest)
    elif stage == "submit":
        manifest = submit_stage(manifest, store, api, settings)
    elif stage == "collect":
        manifest = collect_stage(manifest, store, api)
    else:
        manifest, resent = retry_stage(manifest, store)
        if resent:
            manifest = submit_stage(manifest, store, api, settings)
    return summary(manifest)


@flow(name="prepare", flow_run_name=_run_name("prepare"), task_runner=TASK_RUNNER)
def prepare(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Stream the source, render requests, pack shards, estimate cost; write the run manifest.
    Submitting is left to the submit stage (its schedule, or the poller).

    Args:
        job: The job: the path of its YAML file (relative to the project directory) or the
            spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the flow run's scheduled date).
    """
    spec, date = resolve_job(job), resolve_run_date(run_date)
    settings = Settings.from_env()
    return summary(prepare_stage(spec, date, build_store(settings), settings.api_identity))


@flow(name="submit", flow_run_name=_run_name("submit", attempt=True), task_runner=TASK_RUNNER)
def submit(
    job: JobSpec | str, run_date: str | None = None, continue_run: bool = True
) -> dict[str, Any]:
    """Upload shard files and create batches, exactly once per shard attempt (budget gate first);
    then go on with the run while its batches finish quickly.

    Args:
        job: The job: the path of its YAML file (relative to the project directory) or the
            spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the flow run's scheduled date).
        continue_run: After this stage, go on with whatever the run needs next that can be done
            now (polling its batches for up to NIGHTBATCH_CHAIN_WAIT_SECONDS); false runs this
            stage only.
    """
    return _chained("submit", job, run_date, continue_run)


@flow(name="wait", flow_run_name=_run_name("wait", attempt=True), task_runner=TASK_RUNNER)
def wait(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Check each open batch once and record its status (no sleeping loop).

    Args:
        job: The job: the path of its YAML file (relative to the project directory) or the
            spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the flow run's scheduled date).
    """
    settings, store, manifest = open_run(job, run_date)
    api = build_batch_api(settings)
    manifest = poll_stage(manifest, store, api, settings.expiry_grace_seconds)
    observe.publish_progress(manifest)
    return summary(manifest)


@flow(name="collect", flow_run_name=_run_name("collect", attempt=True), task_runner=TASK_RUNNER)
def collect(
    job: JobSpec | str, run_date: str | None = None, continue_run: bool = True
) -> dict[str, Any]:
    """Download and parse the output and error files of every terminal batch, then go on:
    retry-failures or load when everything is collected.

    Args:
        job: The job: the path of its YAML file (relative to the project directory) or the
            spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the flow run's scheduled date).
        continue_run: After this stage, go on with whatever the run needs next that can be done
            now (polling its batches for up to NIGHTBATCH_CHAIN_WAIT_SECONDS); false runs this
            stage only.
    """
    return _chained("collect", job, run_date, continue_run)


@flow(
    name="retry-failures",
    flow_run_name=_run_name("retry-failures", attempt=True),
    task_runner=TASK_RUNNER,
)
def retry_failures(
    job: JobSpec | str, run_date: str | None = None, continue_run: bool = True
) -> dict[str, Any]:
    """Resubmit the retryable failures of a collected run as its next attempt (through submit's
    leases: never a second batch for a shard attempt), then go on with the run.

    Args:
        job: The job: the path of its YAML file (relative to the project directory) or the
            spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the flow run's scheduled date).
        continue_run: After this stage, go on with whatever the run needs next that can be done
            now (polling its batches for up to NIGHTBATCH_CHAIN_WAIT_SECONDS); false runs this
            stage only.
    """
    return _chained("retry-failures", job, run_date, continue_run)


@flow(name="load", flow_run_name=_run_name("load", attempt=True), task_runner=TASK_RUNNER)
def load(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Write the enriched rows and the dead letter atomically, then the cost record (last).

    Args:
        job: The job: the path of its YAML file (relative to the project directory) or the
            spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the flow run's scheduled date).
    """
    _, store, manifest = open_run(job, run_date)
    return outcome(load_stage(manifest, store))


# ---- operator actions ----------------------------------------------------------------------------


@flow(name="cache-maintenance", flow_run_name=lambda: f"cache-maintenance-{_job_name()}")
def cache_maintenance(
    job: JobSpec | str, prune_older_than_days: float | None = None
) -> dict[str, Any]:
    """Upkeep of a job's result cache: delete segments older than `prune_older_than_days` (if set),
    then merge its small segments (`ResultCache.compact`). Safe while the job's runs go on.

    Args:
        job: The job: the path of its YAML file or the spec itself as a mapping.
        prune_older_than_days: Remove cache entries older than this many days (none if unset).
    """
    spec = resolve_job(job)
    settings = Settings.from_env()
    cache = ResultCache(build_store(settings), spec.storage_root, spec, settings.api_identity)
    now = datetime.now(UTC)
    pruned = 0 if prune_older_than_days is None else cache.prune(prune_older_than_days, now)
    before, after = cache.compact(now)
    get_run_logger().info(
        "cache of %s: old entries removed from %d segment(s), %d segment(s) compacted into %d",
        spec.name,
        pruned,
        before,
        after,
    )
    return {"pruned": pruned, "segments_before": before, "segments_after": after}


@flow(name="abandon", flow_run_name=_run_name("abandon"))
def abandon(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Cancel a run's open batches and mark it abandoned (their finished lines are still billed).

    Args:
        job: The job: the path of its YAML file (relative to the project directory) or the
            spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the flow run's scheduled date).
    """
    settings, store, manifest = open_run(job, run_date)
    api = build_batch_api(settings)
    cancelled = []
    for shard in manifest.shards:
        if shard.state == "submitted" and shard.batch_id:
            api.cancel(shard.batch_id)
            cancelled.append(shard.batch_id)
    note = f"abandoned at {utc_now()}; cancelled batches: {', '.join(cancelled) or 'none'}"
    manifest = update_manifest(store, manifest, lambda m: tr.mark_abandoned(m, utc_now(), note))
    observe.publish_run(manifest, store)
    get_run_logger().warning("run %s abandoned: %s", manifest.run_id, note)
    return summary(manifest) | {"cancelled": cancelled}


@flow(name="retry-run", flow_run_name=_run_name("retry-run"), task_runner=TASK_RUNNER)
def retry_run(
    job: JobSpec | str,
    run_date: str | None = None,
    extra_attempts: int = 1,
    poll_interval_seconds: float | None = None,
) -> dict[str, Any]:
    """Give a finished run's failed rows more attempts, then finish it again like `pipeline`.

    Args:
        job: The job: the path of its YAML file (relative to the project directory) or the
            spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the flow run's scheduled date).
        extra_attempts: How many more attempts the failed rows get.
        poll_interval_seconds: Seconds between polls of open batches (default 60).
    """
    _, store, manifest = open_run(job, run_date)
    reopened = update_manifest(
        store, manifest, lambda m: tr.reopen_for_retry(m, extra_attempts, utc_now())
    )
    return pipeline.fn(reopened.job, reopened.run_date, poll_interval_seconds=poll_interval_seconds)


# ---- pipeline ------------------------------------------------------------------------------------


@flow(name="pipeline", flow_run_name=_run_name("pipeline"), task_runner=TASK_RUNNER)
def pipeline(
    job: JobSpec | str,
    run_date: str | None = None,
    poll_interval_seconds: float | None = None,
    max_wait_seconds: float | None = None,
) -> dict[str, Any]:
    """prepare → submit → wait (inline polling) → collect → retry-failures (until nothing retryable is
    left) → load, resuming whatever the run has done.

    Args:
        job: The job: the path of its YAML file or the spec itself as a mapping.
        run_date: The run's logical date, YYYY-MM-DD (default: the scheduled date, else today).
        poll_interval_seconds: Seconds between polls of open batches (default 60).
        max_wait_seconds: Give up waiting after this long (default 26 hours); rerun to resume.
    """
    spec, date = resolve_job(job), resolve_run_date(run_date)
    settings = Settings.from_env()
    interval = (
        poll_interval_seconds
        if poll_interval_seconds is not None
        else settings.poll_interval_seconds
    )
    store = build_store(settings)
    existing = find_manifest(store, layout_for(spec, date))
    if existing is None or existing.status not in ("loaded", "abandoned"):
        build_batch_api(settings)  # no key: stop before anything is written, not after prepare
    manifest = prepare_stage(spec, date, store, settings.api_identity)
    if manifest.status == "loaded":
        get_run_logger().info("run %s is already loaded; nothing to do", manifest.run_id)
        return outcome(manifest)
    if manifest.status == "abandoned":
        raise TerminalError(
            f"run {manifest.run_id} was abandoned ({'; '.join(manifest.notes[-1:])}); "
            "run it again under a new --run-date"
        )
    api = build_batch_api(settings)
    max_wait = max_wait_seconds or settings.max_wait_seconds
    manifest = advance_run(manifest, store, api, settings, max_wait, poll_seconds=interval)
    if manifest.status != "loaded":
        raise TerminalError(
            f"run {manifest.run_id} is not finished ({next_step(manifest, time.time())}: "
            f"{observe.shard_states(manifest)}); rerun to resume"
        )
    return outcome(manifest)
