"""The stage flows. Each is runnable alone on an existing run; `pipeline` runs them in order with
inline polling (for local use and small jobs — scheduled deployments use the poller instead)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, pause_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import observe
from flows.context import build_batch_api, build_store, resolve_job, resolve_run_date
from schemas.job import JobSpec
from schemas.manifest import RunManifest
from schemas.settings import Settings
from tasks import transitions as tr
from tasks.admission import admit, queue_state
from tasks.batch_api import BatchApi
from tasks.cache import CacheWrite, ResultCache
from tasks.costrecord import check_budget, cost_records, estimate_cost
from tasks.costreport import past_output_mean
from tasks.crashpoints import crash_point
from tasks.errors import BudgetExceededError, TerminalError
from tasks.load import (
    cost_table,
    run_billing,
    succeeded_ids_and_errors,
    write_output,
)
from tasks.retry import plan_retries, write_retry_shards
from tasks.runs import (
    find_manifest,
    layout_for,
    list_manifests,
    load_manifest,
    manifest_layout,
    new_manifest,
    refresh_job,
    save_manifest,
    utc_now,
)
from tasks.steps import collect_shard_task, poll_batches_task, submit_shard_task, write_shards_task
from tasks.storage import ObjectStore

TASK_RUNNER: Any = ThreadPoolTaskRunner(max_workers=4)


def _job_name() -> str | None:
    """The job's name, from the flow run's `job` parameter (a spec, its dict or its file)."""
    job = flow_run.parameters.get("job")
    job_name = getattr(job, "name", None) or (job.get("name") if isinstance(job, dict) else None)
    if job_name is None and isinstance(job, str):
        job_name = job.rsplit("/", 1)[-1].removesuffix(".yaml")
    return job_name


def _run_name(stage: str) -> Any:
    def name() -> str:
        run_date = resolve_run_date(flow_run.parameters.get("run_date"))
        return f"{stage}-{_job_name()}-{run_date}"

    return name


def open_run(job: JobSpec | str, run_date: str | None) -> tuple[Settings, ObjectStore, RunManifest]:
    """Settings, storage and the manifest of an existing run, with the current job spec applied."""
    spec, date = resolve_job(job), resolve_run_date(run_date)
    settings = Settings.from_env()
    store = build_store(settings)
    return settings, store, refresh_job(load_manifest(store, layout_for(spec, date)), spec)


def summary(manifest: RunManifest) -> dict[str, Any]:
    states: dict[str, int] = {}
    for shard in manifest.shards:
        key = shard.batch_status if shard.state in ("submitted", "terminal") else shard.state
        states[str(key)] = states.get(str(key), 0) + 1
    return {
        "run_id": manifest.run_id,
        "status": manifest.status,
        "rows": manifest.rows_selected,
        "shards": states,
        "output": manifest.output_file_uri,
        "cost_record": manifest.cost_record_uri,
    }


# ---- prepare -------------------------------------------------------------------------------------


def prepare_stage(job: JobSpec, run_date: str, store: ObjectStore) -> RunManifest:
    logger = get_run_logger()
    layout = layout_for(job, run_date)
    existing = find_manifest(store, layout)
    if existing is not None:
        logger.info("run %s already prepared (%s); resuming", existing.run_id, existing.status)
        return refresh_job(existing, job)
    index = None
    if job.cache.enabled and not job.cache.refresh:
        index = ResultCache(store, job.storage_root, job).index(
            job.cache.max_age_days, datetime.now(UTC)
        )
    result = write_shards_task(job, store, layout, index)
    manifest = new_manifest(job, run_date, utc_now())
    past_mean = past_output_mean(store, job.storage_root, job.name, job.request.model, run_date)
    sent = result.rows - result.cache_hits
    estimate = estimate_cost(job, sent, sum(s.input_tokens for s in result.shards), past_mean)
    manifest = manifest.model_copy(
        update={
            "shards": result.shards,
            "rows_selected": result.rows,
            "estimate": estimate,
            "cache_hits": result.cache_hits,
            "cache_hits_uri": layout.cache_hits if result.cache_hits else None,
        }
    )
    save_manifest(store, manifest)
    crash_point("after-prepare")
    logger.info(
        "prepared %s: %d rows, %d served from the cache, %d to send in %d shards, %d input tokens, "
        "estimated $%.4f at batch prices ($%.4f at standard prices)",
        manifest.run_id, result.rows, result.cache_hits, sent, len(result.shards),
        estimate.input_tokens, estimate.batch_usd, estimate.standard_usd,
    )  # fmt: skip
    return manifest


@flow(name="prepare", flow_run_name=_run_name("prepare"), task_runner=TASK_RUNNER)
def prepare(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Stream the source, render requests, pack shards, estimate cost; write the run manifest."""
    spec, date = resolve_job(job), resolve_run_date(run_date)
    return summary(prepare_stage(spec, date, build_store(Settings.from_env())))


# ---- submit --------------------------------------------------------------------------------------


def submit_stage(manifest: RunManifest, store: ObjectStore, api: BatchApi) -> RunManifest:
    logger = get_run_logger()
    job = manifest.job
    try:
        check_budget(manifest)
    except BudgetExceededError as exc:
        observe.over_budget(manifest)
        if job.limits.over_budget != "wait_for_approval":
            raise
        manifest = wait_for_budget_approval(manifest, store, str(exc))
    now = utc_now()
    prepared = [s for s in manifest.shards if s.state == "prepared"]
    queue = queue_state(
        list_manifests(store, job.storage_root), job.request.model, datetime.now(UTC)
    )
    admitted = admit(prepared, queue, job.limits.max_enqueued_tokens)
    if len(admitted) < len(prepared):
        logger.info(
            "%d of %d shards wait for queue room (%d %s tokens queued, limit %s; %d creates in the last hour)",
            len(prepared) - len(admitted), len(prepared), queue.queued_tokens, job.request.model,
            job.limits.max_enqueued_tokens, queue.created_last_hour,
        )  # fmt: skip
    starting = [tr.start_submit(s, now) for s in admitted]
    if starting:  # the intent is on record before anything is uploaded
        manifest = tr.with_status(tr.replace_shards(manifest, starting, now), now)
        save_manifest(store, manifest)
        crash_point("after-intent")
    pending = [s for s in manifest.shards if s.state == "submitting"]
    futures = [
        submit_shard_task.submit(api, store, manifest.run_id, job.request.endpoint, shard)
        for shard in pending
    ]
    for shard, future in zip(pending, futures, strict=True):
        batch = future.result()
        manifest = tr.replace_shard(manifest, tr.record_batch(shard, batch, utc_now()), utc_now())
        save_manifest(store, manifest)
        logger.info("shard %s -> batch %s (%s)", shard.shard_id, batch.id, batch.status)
    manifest = tr.with_status(manifest, utc_now())
    save_manifest(store, manifest)
    crash_point("after-submit")
    return manifest


class BudgetApproval(RunInput):
    """The operator's answer to an over-budget run (Prefect UI: resume the paused flow run)."""

    approve: bool = False
    approved_by: str = "operator"


def wait_for_budget_approval(manifest: RunManifest, store: ObjectStore, reason: str) -> RunManifest:
    """Pause this flow run until an operator approves the estimate, or fail when they reject it."""
    logger = get_run_logger()
    logger.warning("%s Waiting for an operator's approval in the Prefect UI.", reason)
    create_markdown_artifact(
        markdown=f"# Budget approval needed: {manifest.run_id}\n\n{reason}\n\n"
        "Resume this flow run with `approve: true` to submit anyway, or `approve: false` to stop.",
        key=observe.artifact_key("budget", manifest.job_name),
    )
    answer = pause_flow_run(
        wait_for_input=BudgetApproval, timeout=manifest.job.limits.approval_timeout_seconds
    )
    if not answer.approve:
        raise BudgetExceededError(f"{reason} An operator ({answer.approved_by}) rejected it.")
    logger.info("budget approved by %s", answer.approved_by)
    manifest = manifest.model_copy(
        update={"budget_approved_by": answer.approved_by, "budget_approved_at": utc_now()}
    )
    save_manifest(store, manifest)
    return manifest


@flow(name="submit", flow_run_name=_run_name("submit"), task_runner=TASK_RUNNER)
def submit(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Upload shard files and create batches, exactly once per shard attempt."""
    settings, store, manifest = open_run(job, run_date)
    return summary(submit_stage(manifest, store, build_batch_api(settings)))


# ---- wait ----------------------------------------------------------------------------------------


def poll_stage(
    manifest: RunManifest, store: ObjectStore, api: BatchApi, grace_seconds: float = 3600
) -> RunManifest:
    """Check every open batch once."""
    logger = get_run_logger()
    open_shards = [s for s in manifest.shards if s.state == "submitted"]
    batches = poll_batches_task(api, [str(s.batch_id) for s in open_shards]) if open_shards else []
    changed = []
    for shard, batch in zip(open_shards, batches, strict=True):
        if tr.is_overdue(batch.status, batch.expires_at, time.time(), grace_seconds):
            logger.warning(
                "batch %s of shard %s is past its expiry (+%ds grace) and still %s: cancelling it; "
                "its finished lines are kept and the rest retried", batch.id, shard.shard_id,
                grace_seconds, batch.status,
            )  # fmt: skip
            batch = api.cancel(batch.id)
        if batch.status != shard.batch_status:
            logger.info(
                "batch %s of shard %s: %s -> %s",
                batch.id,
                shard.shard_id,
                shard.batch_status,
                batch.status,
            )
        polled = tr.record_poll(shard, batch, utc_now())
        if polled.batch_status != shard.batch_status:
            observe.batch_changed(manifest, polled, shard.batch_status)
        changed.append(polled)
    if changed:
        manifest = tr.with_status(tr.replace_shards(manifest, changed, utc_now()), utc_now())
        save_manifest(store, manifest)
        crash_point("after-poll")
    return manifest


@flow(name="wait", flow_run_name=_run_name("wait"), task_runner=TASK_RUNNER)
def wait(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Check each open batch once and record its status (no sleeping loop)."""
    settings, store, manifest = open_run(job, run_date)
    return summary(
        poll_stage(manifest, store, build_batch_api(settings), settings.expiry_grace_seconds)
    )


# ---- collect -------------------------------------------------------------------------------------


def collect_stage(manifest: RunManifest, store: ObjectStore, api: BatchApi) -> RunManifest:
    logger = get_run_logger()
    layout = manifest_layout(manifest)
    ready = [s for s in manifest.shards if s.state == "terminal"]
    cache_write = CacheWrite(manifest.run_id, utc_now())
    futures = [
        collect_shard_task.submit(manifest.job, layout, s, store, api, cache_write) for s in ready
    ]
    for shard, future in zip(ready, futures, strict=True):
        results_uri, errors_uri, counts = future.result()
        collected = tr.record_collected(shard, results_uri, errors_uri, counts)
        manifest = tr.with_status(tr.replace_shard(manifest, collected, utc_now()), utc_now())
        save_manifest(store, manifest)
        crash_point("after-collect")
        logger.info(
            "collected shard %s (batch %s, %s): %d succeeded, %d failed (%d retryable, %d missing)",
            shard.shard_id, shard.batch_id, shard.batch_status, counts.succeeded, counts.failed,
            counts.retryable, counts.missing,
        )  # fmt: skip
    if ready:
        observe.publish_run(manifest, store)
    return manifest


@flow(name="collect", flow_run_name=_run_name("collect"), task_runner=TASK_RUNNER)
def collect(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Download and parse the output and error files of every terminal batch."""
    settings, store, manifest = open_run(job, run_date)
    return summary(collect_stage(manifest, store, build_batch_api(settings)))


# ---- retry-failures ------------------------------------------------------------------------------


def retryable_rows(manifest: RunManifest, store: ObjectStore) -> int:
    """How many rows retry-failures would resend now."""
    succeeded, errors = succeeded_ids_and_errors(manifest, store)
    return plan_retries(errors, succeeded, manifest.job.retry.max_attempts).rows


def retry_stage(manifest: RunManifest, store: ObjectStore) -> tuple[RunManifest, int]:
    """Add shards of the next attempt for retryable rows; returns the manifest and the rows resent."""
    logger = get_run_logger()
    if tr.run_status_from_shards(manifest) != "collected" or manifest.status == "loaded":
        return manifest, 0
    succeeded, errors = succeeded_ids_and_errors(manifest, store)
    plan = plan_retries(errors, succeeded, manifest.job.retry.max_attempts)
    if plan.rows == 0:
        logger.info(
            "run %s: nothing retryable left (%d permanent failures, %d out of attempts)",
            manifest.run_id, plan.permanent, plan.exhausted,
        )  # fmt: skip
        return manifest, 0
    shards = write_retry_shards(manifest, plan, store, manifest_layout(manifest))
    now = utc_now()
    manifest = tr.with_status(
        manifest.model_copy(update={"shards": [*manifest.shards, *shards]}), now
    )
    save_manifest(store, manifest)
    crash_point("after-retry")
    logger.info(
        "run %s: %d rows resent as attempt %d in %d shards (%d permanent failures, %d out of attempts)",
        manifest.run_id, plan.rows, shards[0].attempt, len(shards), plan.permanent, plan.exhausted,
    )  # fmt: skip
    return manifest, plan.rows


@flow(name="retry-failures", flow_run_name=_run_name("retry-failures"), task_runner=TASK_RUNNER)
def retry_failures(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Resubmit the retryable failures of a collected run as its next attempt."""
    settings, store, manifest = open_run(job, run_date)
    manifest, resent = retry_stage(manifest, store)
    if resent:
        manifest = submit_stage(manifest, store, build_batch_api(settings))
    return summary(manifest) | {"resent": resent}


# ---- operator actions ----------------------------------------------------------------------------


@flow(name="cache-maintenance", flow_run_name=lambda: f"cache-maintenance-{_job_name()}")
def cache_maintenance(
    job: JobSpec | str, prune_older_than_days: float | None = None
) -> dict[str, Any]:
    """Upkeep of a job's result cache: delete segments older than `prune_older_than_days` (if set),
    then merge its small segments (`ResultCache.compact`). Safe while the job's runs go on."""
    spec = resolve_job(job)
    cache = ResultCache(build_store(Settings.from_env()), spec.storage_root, spec)
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
    """Cancel a run's open batches and mark it abandoned (their finished lines are still billed)."""
    settings, store, manifest = open_run(job, run_date)
    api = build_batch_api(settings)
    cancelled = []
    for shard in manifest.shards:
        if shard.state == "submitted" and shard.batch_id:
            api.cancel(shard.batch_id)
            cancelled.append(shard.batch_id)
    note = f"abandoned at {utc_now()}; cancelled batches: {', '.join(cancelled) or 'none'}"
    manifest = tr.mark_abandoned(manifest, utc_now(), note)
    save_manifest(store, manifest)
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
    """Give a finished run's failed rows more attempts, then finish it again like `pipeline`."""
    _, store, manifest = open_run(job, run_date)
    reopened = tr.reopen_for_retry(manifest, extra_attempts, utc_now())
    save_manifest(store, reopened)
    return pipeline.fn(reopened.job, reopened.run_date, poll_interval_seconds=poll_interval_seconds)


# ---- load ----------------------------------------------------------------------------------------


def load_stage(manifest: RunManifest, store: ObjectStore) -> RunManifest:
    logger = get_run_logger()
    if tr.run_status_from_shards(manifest) != "collected":
        raise TerminalError(
            f"run {manifest.run_id} is not ready to load: status {manifest.status}, shards "
            f"{summary(manifest)['shards']}. Run wait and collect until every shard is collected."
        )
    loaded = write_output(manifest, store)
    crash_point("before-load-commit")
    billing = run_billing(manifest, store)
    now = utc_now()
    records = cost_records(
        manifest,
        billing.billed,
        succeeded=billing.result_rows,
        failed=billing.error_rows,
        dead_lettered=loaded.rows_dead_lettered,
        loaded_at=now,
        cached_usage_by_model=billing.cached,
    )
    layout = manifest_layout(manifest)
    store.write_table(layout.cost_record, cost_table(records))
    notes = list(manifest.notes)
    if loaded.rows_not_in_run:
        notes.append(
            f"{loaded.rows_not_in_run} source rows appeared after prepare and are not in this run"
        )
    manifest = tr.mark_loaded(
        manifest,
        now,
        output_file_uri=loaded.output_uri,
        dead_letter_uri=loaded.dead_letter_uri,
        cost_record_uri=layout.cost_record,
        dead_lettered=loaded.rows_dead_lettered,
        notes=notes,
    )
    save_manifest(store, manifest)
    observe.publish_run(manifest, store)
    observe.publish_loaded(manifest, records)
    logger.info(
        "loaded %s: %d rows enriched, %d dead-lettered -> %s; cost $%.4f (standard $%.4f, saved $%.4f)",
        manifest.run_id, loaded.rows_written, loaded.rows_dead_lettered, loaded.output_uri,
        sum(r["cost_batch_usd"] for r in records), sum(r["cost_standard_usd"] for r in records),
        sum(r["savings_usd"] for r in records),
    )  # fmt: skip
    return manifest


@flow(name="load", flow_run_name=_run_name("load"))
def load(job: JobSpec | str, run_date: str | None = None) -> dict[str, Any]:
    """Write the enriched rows and the dead letter atomically, then the cost record (last)."""
    _, store, manifest = open_run(job, run_date)
    return summary(load_stage(manifest, store))


# ---- pipeline ------------------------------------------------------------------------------------


@flow(name="pipeline", flow_run_name=_run_name("pipeline"), task_runner=TASK_RUNNER)
def pipeline(
    job: JobSpec | str,
    run_date: str | None = None,
    poll_interval_seconds: float | None = None,
    max_wait_seconds: float | None = None,
) -> dict[str, Any]:
    """prepare → submit → wait (inline polling) → collect → retry-failures (until nothing retryable is
    left) → load, resuming whatever the run has done."""
    spec, date = resolve_job(job), resolve_run_date(run_date)
    settings = Settings.from_env()
    interval = (
        poll_interval_seconds
        if poll_interval_seconds is not None
        else settings.poll_interval_seconds
    )
    deadline = time.monotonic() + (max_wait_seconds or settings.max_wait_seconds)
    store = build_store(settings)
    manifest = prepare_stage(spec, date, store)
    if manifest.status == "loaded":
        get_run_logger().info("run %s is already loaded; nothing to do", manifest.run_id)
        return summary(manifest)
    api = build_batch_api(settings)
    progress: observe.Progress | None = None
    while True:
        if any(s.state in ("prepared", "submitting") for s in manifest.shards):
            manifest = submit_stage(manifest, store, api)
        manifest = poll_stage(manifest, store, api, settings.expiry_grace_seconds)
        progress = progress or observe.Progress(manifest)
        progress.update(manifest)
        manifest = collect_stage(manifest, store, api)
        if tr.run_status_from_shards(manifest) == "collected":
            manifest, resent = retry_stage(manifest, store)
            if not resent:
                break
            continue
        if time.monotonic() > deadline:
            raise TerminalError(
                f"run {manifest.run_id} still has open batches after waiting; rerun to resume"
            )
        time.sleep(interval)
    return summary(load_stage(manifest, store))
