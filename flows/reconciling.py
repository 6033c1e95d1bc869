"""Reconciliation as a stage: the run's batches that no shard records (tasks/reconcile.py decides)
are cancelled while open, and their billed usage is counted once they are terminal; and the run's
files at the provider are deleted once what they hold is stored (tasks/providerfiles.py decides)."""

from __future__ import annotations

import tempfile

from prefect import get_run_logger

from schemas.manifest import TERMINAL_BATCH_STATUSES, RunManifest
from tasks import transitions as tr
from tasks.batch_api import BatchApi
from tasks.errors import ProviderFileGoneError
from tasks.providerfiles import deletable_shards, deletable_strays, shard_files, stray_files
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
from tasks.submit import lookup_since, root_metadata


def reconcile_stage(manifest: RunManifest, store: ObjectStore, api: BatchApi) -> RunManifest:
    """Find the run's batches that no shard records; cancel the open ones and keep them on record,
    so their usage reaches the cost record. Delete the provider files a crash left behind."""
    manifest = delete_provider_files(manifest, store, api)
    batches = api.find_batches(
        run_metadata_filter(manifest.run_id),
        lookup_since(manifest.created_at),
        if_present=root_metadata(manifest.job.storage_root),
    )
    found = strays_of(manifest, batches, utc_now())
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
                try:
                    api.download(file_id, sink)
                except ProviderFileGoneError:
                    get_run_logger().warning(
                        "stray batch %s: file %s is gone at the provider; its usage cannot be "
                        "counted", stray.batch_id, file_id,
                    )  # fmt: skip
                    continue
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


def delete_provider_files(manifest: RunManifest, store: ObjectStore, api: BatchApi) -> RunManifest:
    """Delete, at the provider, the input, output and error files of every collected shard and
    counted stray batch (a file already gone counts as deleted), and record it. Idempotent: a crash
    in between is finished by the next stage run."""
    deleted = 0
    for shard in deletable_shards(manifest):
        for file_id in shard_files(shard):
            api.delete_file(file_id)
            deleted += 1
        manifest = update_manifest(
            store,
            manifest,
            lambda m, s=shard.shard_id: tr.advance_shards(  # type: ignore[misc]
                m, {s: tr.record_provider_files_deleted}, utc_now()
            ),
        )
    for stray in deletable_strays(manifest):
        for file_id in stray_files(stray):
            api.delete_file(file_id)
            deleted += 1
        done = stray.model_copy(update={"provider_files_deleted": True})
        manifest = update_manifest(
            store,
            manifest,
            lambda m, s=done: with_stray(m, s, utc_now()),  # type: ignore[misc]
        )
    if deleted:
        get_run_logger().info(
            "run %s: deleted %d file(s) at the provider (their contents are stored)",
            manifest.run_id, deleted,
        )  # fmt: skip
    return manifest
