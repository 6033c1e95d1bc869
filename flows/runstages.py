"""The stages' work on a run: each reads the manifest it is given, does its part, and advances the
manifest by compare-and-swap (`update_manifest`): any number of stage runs, pollers and CLI commands
may work on one run at once; the loser of a race re-reads and adopts what the winner recorded.
The `@flow` wrappers are in flows/stages.py."""

from __future__ import annotations

import functools
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime

from prefect import get_run_logger

from flows import observe
from flows.approval import request_approval
from schemas.job import JobSpec
from schemas.manifest import TERMINAL_BATCH_STATUSES, RunManifest
from schemas.settings import Settings
from tasks import transitions as tr
from tasks.admission import admit, queue_state
from tasks.batch_api import BatchApi
from tasks.cache import CacheWrite, ResultCache
from tasks.costrecord import check_budget, cost_records, estimate_cost
from tasks.costreport import past_output_mean
from tasks.crashpoints import crash_point
from tasks.errors import (
    BadInputError,
    BudgetExceededError,
    LeaseLostError,
    TerminalError,
    WriteConflictError,
)
from tasks.leases import new_owner, owner_is_gone
from tasks.load import cost_table, run_billing, succeeded_ids_and_errors, write_output
from tasks.reconcile import (
    add_usage,
    billed_usage_of_lines,
    open_strays,
    run_metadata_filter,
    strays_of,
    uncounted_strays,
    with_stray,
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
    update_manifest,
    utc_now,
)
from tasks.steps import collect_shard_task, poll_batches_task, submit_shard_task, write_shards_task
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
    observe.publish_run(manifest, store)
    return manifest


def check_api(manifest: RunManifest, api: str) -> RunManifest:
    """A run is sent to, and collects from, the API it was prepared for; never a mix."""
    if manifest.api is not None and manifest.api != api:
        raise BadInputError(
            f"run {manifest.run_id} was prepared for the API {manifest.api!r}, but this process is "
            f"pointed at {api!r}. Point it at {manifest.api!r} again (OPENAI_BASE_URL, or "
            "`--emulator` for the bundled emulator) to finish that run, or start a new run under "
            "another --run-date (`nightbatch abandon` ends the old one)."
        )
    return manifest


# ---- submit --------------------------------------------------------------------------------------


def submit_stage(
    manifest: RunManifest, store: ObjectStore, api: BatchApi, settings: Settings
) -> RunManifest:
    """Take the submit lease of every shard that may be submitted now (prepared and admitted to the
    queue, or `submitting` with a free lease), then submit those, and only those."""
    logger = get_run_logger()
    job = manifest.job
    try:
        check_budget(manifest)
    except BudgetExceededError as exc:
        observe.over_budget(manifest)
        if job.limits.over_budget != "wait_for_approval":
            raise
        approved = request_approval(manifest, store, str(exc))
        if approved is None:
            return manifest
        manifest = approved
    owner, lease = new_owner(), settings.submit_lease_seconds
    queue = queue_state(
        list_manifests(store, job.storage_root), job.request.model, datetime.now(UTC)
    )

    def claim(m: RunManifest) -> RunManifest:
        now, now_epoch = utc_now(), time.time()
        prepared = [s for s in m.shards if s.state == "prepared"]
        admitted = admit(prepared, queue, job.limits.max_enqueued_tokens)
        gone = {
            s.shard_id: owner_is_gone(s.submit_owner) for s in m.shards if s.state == "submitting"
        }
        free = [s for s in m.shards if s.shard_id in gone and tr.lease_is_free(s, now_epoch, gone[s.shard_id])]  # fmt: skip
        take = functools.partial(tr.start_submit, now=now, owner=owner, now_epoch=now_epoch, lease_seconds=lease)  # fmt: skip
        changes = {s.shard_id: functools.partial(take, holder_gone=gone.get(s.shard_id, False)) for s in [*admitted, *free]}  # fmt: skip
        return tr.advance_shards(m, changes, now)

    manifest = update_manifest(store, manifest, claim)
    mine = [s for s in manifest.shards if s.state == "submitting" and s.submit_owner == owner]
    waiting = [s for s in manifest.shards if s.state == "prepared"]
    if waiting:
        logger.info(
            "%d shards wait for queue room (%d %s tokens queued, limit %s; %d creates in the last hour)",
            len(waiting), queue.queued_tokens, job.request.model, job.limits.max_enqueued_tokens,
            queue.created_last_hour,
        )  # fmt: skip
    others = [s for s in manifest.shards if s.state == "submitting" and s.submit_owner != owner]
    if others:
        logger.info("%d shards are being submitted by another process; leaving them", len(others))
    if not mine:
        return manifest
    crash_point("after-intent")
    renew = functools.partial(_renew_lease, store, manifest, owner=owner, lease_seconds=lease)
    futures = [
        submit_shard_task.submit(
            api,
            store,
            manifest.run_id,
            job.request.endpoint,
            shard,
            keep_lease=functools.partial(renew, shard.shard_id),
        )  # fmt: skip
        for shard in mine
    ]
    for shard, future in zip(mine, futures, strict=True):
        try:
            batch = future.result()
        except LeaseLostError as exc:
            logger.warning("shard %s: %s; the new holder submits it", shard.shard_id, exc)
            continue
        record = functools.partial(tr.record_batch, batch=batch, now=utc_now())
        manifest = update_manifest(
            store, manifest, lambda m, s=shard.shard_id, r=record: tr.advance_shards(m, {s: r}, utc_now())  # type: ignore[misc]
        )  # fmt: skip
        logger.info("shard %s -> batch %s (%s)", shard.shard_id, batch.id, batch.status)
    crash_point("after-submit")
    observe.publish_run(manifest, store)
    return manifest


def _renew_lease(
    store: ObjectStore, manifest: RunManifest, shard_id: str, *, owner: str, lease_seconds: float
) -> None:
    """Extend our lease of one shard, or raise LeaseLostError (called before upload and create)."""
    renew = functools.partial(
        tr.renew_lease, owner=owner, now_epoch=time.time(), lease_seconds=lease_seconds
    )
    current = load_manifest(store, manifest_layout(manifest))
    update_manifest(store, current, lambda m: tr.advance_shards(m, {shard_id: renew}, utc_now()))


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


def reconcile_stage(manifest: RunManifest, store: ObjectStore, api: BatchApi) -> RunManifest:
    """Find the run's batches that no shard records; cancel the open ones and keep them on record,
    so their usage reaches the cost record."""
    found = strays_of(manifest, api.find_batches(run_metadata_filter(manifest.run_id)), utc_now())
    if not found:
        return manifest
    logger = get_run_logger()
    for stray in found:
        logger.warning(
            "batch %s (shard %s, attempt %d, %s) carries run %s's metadata but is no shard's batch: "
            "%s; its usage goes into the cost record", stray.batch_id, stray.shard_id,
            stray.attempt, stray.status, manifest.run_id,
            "cancelling it" if stray.status not in TERMINAL_BATCH_STATUSES else "counting it",
        )  # fmt: skip
        if stray.status not in TERMINAL_BATCH_STATUSES and stray.status != "cancelling":
            stray = stray.model_copy(update={"status": api.cancel(stray.batch_id).status})

        def add(m: RunManifest, s=stray) -> RunManifest:  # type: ignore[no-untyped-def]
            known = {x.batch_id for x in m.stray_batches}
            return m if s.batch_id in known else with_stray(m, s, utc_now())

        manifest = update_manifest(store, manifest, add)
    return manifest


def count_stray_usage(manifest: RunManifest, store: ObjectStore, api: BatchApi) -> RunManifest:
    """Sum the billed usage of every terminal stray batch from its output and error files."""
    job = manifest.job
    for stray in uncounted_strays(manifest):
        if stray.status not in TERMINAL_BATCH_STATUSES:
            continue
        usage: dict[str, dict[str, int]] = {}
        for file_id in (stray.output_file_id, stray.error_file_id):
            if not file_id:
                continue
            with tempfile.TemporaryFile() as sink:
                api.download(file_id, sink)
                sink.seek(0)
                add_usage(
                    usage, billed_usage_of_lines(sink, job.request.endpoint, job.request.model)
                )
        counted_stray = stray.model_copy(update={"usage": usage, "usage_counted": True})
        manifest = update_manifest(
            store,
            manifest,
            lambda m, s=counted_stray: with_stray(m, s, utc_now()),  # type: ignore[misc]
        )
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
