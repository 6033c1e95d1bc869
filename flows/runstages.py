"""The stages' work on a run: each reads the manifest it is given, does its part, and advances the
manifest by compare-and-swap (`update_manifest`): any number of stage runs, pollers and CLI commands
may work on one run at once; the loser of a race re-reads and adopts what the winner recorded.
The `@flow` wrappers are in flows/stages.py."""

from __future__ import annotations

import functools
import time
from collections import Counter
from datetime import UTC, datetime

from prefect import get_run_logger

from flows import observe
from flows.reconciling import count_stray_usage, delete_provider_files
from schemas.job import JobSpec
from schemas.manifest import RunManifest
from tasks import transitions as tr
from tasks.batch_api import BatchApi
from tasks.cache import CacheWrite, ResultCache
from tasks.costrecord import cost_records, estimate_cost
from tasks.costreport import past_output_mean
from tasks.crashpoints import crash_point
from tasks.errors import (
    TerminalError,
    WriteConflictError,
)
from tasks.load import cost_table, run_billing, succeeded_ids_and_errors, write_output
from tasks.reconcile import (
    open_strays,
    with_stray,
)
from tasks.retry import plan_retries, write_retry_shards
from tasks.runs import (
    check_api,
    find_manifest,
    layout_for,
    load_manifest,
    manifest_layout,
    new_manifest,
    refresh_job,
    save_manifest,
    update_manifest,
    utc_now,
)
from tasks.steps import collect_shard_task, poll_batches_task, write_shards_task
from tasks.storage import ObjectStore

# ---- prepare -------------------------------------------------------------------------------------


def prepare_stage(job: JobSpec, run_date: str, store: ObjectStore, api: str) -> RunManifest:
    """Prepare the run for `api` (its identity, schemas.lineage), or resume the one prepared."""
    logger = get_run_logger()
    layout = layout_for(job, run_date)
    existing = find_manifest(store, layout)
    if existing is not None:
        logger.info("run %s already prepared (%s); resuming", existing.run_id, existing.status)
        return check_api(refresh_job(existing, job), api)
    index = None
    if job.cache.enabled and not job.cache.refresh:
        index = ResultCache(store, job.storage_root, job, api).index(
            job.cache.max_age_days, datetime.now(UTC)
        )
    result = write_shards_task(job, store, layout, index)
    manifest = new_manifest(job, run_date, utc_now()).model_copy(update={"api": api})
    past_mean = past_output_mean(store, job.storage_root, job.name, job.request.model, run_date)
    sent = result.rows - result.cache_hits - result.refused
    estimate = estimate_cost(job, sent, sum(s.input_tokens for s in result.shards), past_mean)
    manifest = manifest.model_copy(
        update={
            "shards": result.shards,
            "rows_selected": result.rows,
            "estimate": estimate,
            "cache_hits": result.cache_hits,
            "cache_hits_uri": layout.cache_hits if result.cache_hits else None,
            "rows_refused": result.refused,
            "refused_uri": result.refused_uri,
        }
    )
    try:
        manifest = save_manifest(store, manifest)  # only if no other prepare got there first
    except WriteConflictError:
        logger.info("run %s was prepared by another process meanwhile; using it", manifest.run_id)
        return check_api(refresh_job(load_manifest(store, layout), job), api)
    crash_point("after-prepare")
    logger.info(
        "prepared %s: %d rows, %d served from the cache, %d to send in %d shards, %d input tokens, "
        "estimated $%.4f at batch prices ($%.4f at standard prices)",
        manifest.run_id, result.rows, result.cache_hits, sent, len(result.shards),
        estimate.input_tokens, estimate.batch_usd, estimate.standard_usd,
    )  # fmt: skip
    if result.refused:
        logger.warning(
            "%d row(s) of %s cannot succeed and were not sent (see %s); they go to the dead letter",
            result.refused, manifest.run_id, result.refused_uri,
        )  # fmt: skip
    if not result.rows:
        logger.warning(
            "run %s selected no rows from %s: check source.filter and source.uri",
            manifest.run_id, job.source.uri,
        )  # fmt: skip
    observe.publish_run(manifest, store)
    return manifest


# ---- wait ----------------------------------------------------------------------------------------


def poll_stage(
    manifest: RunManifest, store: ObjectStore, api: BatchApi, grace_seconds: float = 3600
) -> RunManifest:
    """Check every open batch once (and every open stray batch of the run)."""
    logger = get_run_logger()
    open_shards = [s for s in manifest.shards if s.state == "submitted"]
    strays = open_strays(manifest)
    ids = [str(s.batch_id) for s in open_shards] + [s.batch_id for s in strays]
    batches = poll_batches_task(api, ids) if ids else []
    by_id = {b.id: b for b in batches}
    now = utc_now()
    changes = {}
    for shard in open_shards:
        batch = by_id[str(shard.batch_id)]
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
                batch.id, shard.shard_id, shard.batch_status, batch.status,
            )  # fmt: skip
            observe.batch_changed(manifest, tr.record_poll(shard, batch, now), shard.batch_status)
        changes[shard.shard_id] = functools.partial(tr.record_poll, batch=batch, now=now)

    def record(m: RunManifest) -> RunManifest:
        m = tr.advance_shards(m, changes, now)
        for stray in strays:
            status = by_id[stray.batch_id]
            m = with_stray(m, stray.model_copy(update={
                "status": status.status, "output_file_id": status.output_file_id,
                "error_file_id": status.error_file_id}), now)  # fmt: skip
        return m

    if ids:
        manifest = update_manifest(store, manifest, record)
        crash_point("after-poll")
    return manifest


# ---- collect -------------------------------------------------------------------------------------


def collect_stage(manifest: RunManifest, store: ObjectStore, api: BatchApi) -> RunManifest:
    logger = get_run_logger()
    layout = manifest_layout(manifest)
    ready = [s for s in manifest.shards if s.state == "terminal"]
    cache_write = CacheWrite(manifest.run_id, utc_now(), manifest.api)
    futures = [
        collect_shard_task.submit(manifest.job, layout, s, store, api, cache_write) for s in ready
    ]
    for shard, future in zip(ready, futures, strict=True):
        results_uri, errors_uri, counts = future.result()
        crash_point("before-collect-record")
        collected = functools.partial(
            tr.record_collected, results_uri=results_uri, errors_uri=errors_uri, counts=counts
        )
        manifest = update_manifest(
            store, manifest, lambda m, s=shard.shard_id, c=collected: tr.advance_shards(m, {s: c}, utc_now())  # type: ignore[misc]
        )  # fmt: skip
        crash_point("after-collect")
        logger.info(
            "collected shard %s (batch %s, %s): %d succeeded, %d failed (%d retryable, %d missing)",
            shard.shard_id, shard.batch_id, shard.batch_status, counts.succeeded, counts.failed,
            counts.retryable, counts.missing,
        )  # fmt: skip
    manifest = count_stray_usage(manifest, store, api)
    manifest = delete_provider_files(manifest, store, api)
    if ready:
        observe.publish_run(manifest, store)
    return manifest


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
    attempt = shards[0].attempt
    ours = False

    def add(m: RunManifest) -> RunManifest:
        nonlocal ours
        ours = not any(s.attempt >= attempt for s in m.shards)  # else another process added it
        if not ours:
            return m
        return tr.with_status(m.model_copy(update={"shards": [*m.shards, *shards]}), utc_now())

    manifest = update_manifest(store, manifest, add)
    if not ours:
        return manifest, 0
    crash_point("after-retry")
    logger.info(
        "run %s: %d rows resent as attempt %d in %d shards (%d permanent failures, %d out of attempts)",
        manifest.run_id, plan.rows, attempt, len(shards), plan.permanent, plan.exhausted,
    )  # fmt: skip
    return manifest, plan.rows


# ---- load ----------------------------------------------------------------------------------------


def load_stage(manifest: RunManifest, store: ObjectStore) -> RunManifest:
    logger = get_run_logger()
    if manifest.status == "loaded":
        return manifest
    if tr.run_status_from_shards(manifest) != "collected":
        raise TerminalError(
            f"run {manifest.run_id} is not ready to load: status {manifest.status}, shards "
            f"{observe.shard_states(manifest)}. Run wait and collect until every shard is collected."
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
    reasons: dict[str, int] = {}
    if loaded.rows_dead_lettered:
        codes = store.read_table(loaded.dead_letter_uri, columns=["code"]).column(0).to_pylist()
        reasons = dict(Counter(str(c) for c in codes))
    loaded_fields = {
        "output_file_uri": loaded.output_uri,
        "dead_letter_uri": loaded.dead_letter_uri,
        "cost_record_uri": layout.cost_record,
        "dead_lettered": loaded.rows_dead_lettered,
        "notes": notes,
        "went_badly": tr.dead_letter_verdict(manifest, loaded.rows_dead_lettered, reasons),
    }

    def mark(m: RunManifest) -> RunManifest:
        return m if m.status == "loaded" else tr.mark_loaded(m, now, **loaded_fields)

    manifest = update_manifest(store, manifest, mark)
    observe.publish_run(manifest, store, records)
    observe.publish_loaded(manifest, records)
    logger.info(
        "loaded %s: %d rows enriched, %d dead-lettered -> %s; cost $%.4f (standard $%.4f, saved $%.4f)",
        manifest.run_id, loaded.rows_written, loaded.rows_dead_lettered, loaded.output_uri,
        sum(r["cost_batch_usd"] for r in records), sum(r["cost_standard_usd"] for r in records),
        sum(r["savings_usd"] for r in records),
    )  # fmt: skip
    if manifest.went_badly:
        logger.error("run %s went badly: %s (%s)", manifest.run_id, manifest.went_badly, manifest.dead_letter_uri)  # fmt: skip
    return manifest
