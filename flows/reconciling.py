"""Reconciliation as a stage: the run's batches that no shard records (tasks/reconcile.py decides)
are cancelled while open, and their billed usage is counted once they are terminal."""

from __future__ import annotations

import tempfile

from prefect import get_run_logger

from schemas.manifest import TERMINAL_BATCH_STATUSES, RunManifest
from tasks.batch_api import BatchApi
from tasks.reconcile import (
    add_usage,
    billed_usage_of_lines,
    run_metadata_filter,
    strays_of,
    uncounted_strays,
    with_stray,
)
from tasks.runs import update_manifest, utc_now
from tasks.storage import ObjectStore


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
