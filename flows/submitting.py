"""submit as a stage: take the submit lease of every shard that may be submitted now, by
compare-and-swap on the manifest, then submit those shards and only those (tasks/submit.py holds the
per-shard protocol, tasks/leases.py the lease rule)."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime

from prefect import get_run_logger

from flows import observe
from flows.approval import request_approval
from schemas.manifest import RunManifest
from schemas.settings import Settings
from tasks import transitions as tr
from tasks.admission import admit, queue_state
from tasks.batch_api import BatchApi
from tasks.costrecord import check_budget
from tasks.crashpoints import crash_point
from tasks.errors import BudgetExceededError, LeaseLostError
from tasks.leases import new_owner, owner_is_gone
from tasks.runs import list_open_manifests, load_manifest, manifest_layout, update_manifest, utc_now
from tasks.steps import submit_shard_task
from tasks.storage import ObjectStore


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
    now = datetime.now(UTC)
    queue = queue_state(list_open_manifests(store, job.storage_root, now), job.request.model, now)

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
            root=job.storage_root,
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
