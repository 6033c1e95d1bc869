"""Carrying a run on: every step that is possible now (submit, poll, collect, retry-failures, load),
one after the other, until the run waits on the provider, on an operator, or is done. Used by the
stage flows, the pipeline and the poller (flows/stages.py, flows/poller.py)."""

from __future__ import annotations

import time
from typing import Any

from prefect.states import Failed

from flows import observe
from flows.approval import holds_approval
from flows.reconciling import reconcile_stage
from flows.runstages import collect_stage, load_stage, poll_stage, retry_stage
from flows.submitting import submit_stage
from schemas.manifest import RunManifest
from schemas.settings import Settings
from tasks.advance import next_step
from tasks.batch_api import BatchApi
from tasks.errors import RunWentBadlyError
from tasks.storage import ObjectStore

CHAIN_POLL_SECONDS = 5.0


def outcome(manifest: RunManifest) -> Any:
    """A flow's return: the run's summary, as a Failed state when the run loaded but went badly
    (too many dead letters), so that Prefect shows it failed and the CLI exits 3."""
    result = summary(manifest)
    if manifest.status == "loaded" and manifest.went_badly:
        message = f"run {manifest.run_id} went badly: {manifest.went_badly}"
        return Failed(message=message, data=RunWentBadlyError(message, result))
    return result


def summary(manifest: RunManifest) -> dict[str, Any]:
    return {
        "run_id": manifest.run_id,
        "status": manifest.status,
        "rows": manifest.rows_selected,
        "shards": observe.shard_states(manifest),
        "output": manifest.output_file_uri,
        "cost_record": manifest.cost_record_uri,
        "dead_letter": manifest.dead_letter_uri,
        "dead_lettered": manifest.dead_lettered,
        "not_sent": manifest.rows_refused,
        "went_badly": manifest.went_badly,
    }


def _shape(manifest: RunManifest) -> tuple[Any, ...]:
    """What changes when a step makes progress."""
    return (manifest.status, tuple((s.shard_id, s.state) for s in manifest.shards),
            tuple((s.batch_id, s.status, s.usage_counted) for s in manifest.stray_batches))  # fmt: skip


def advance_run(
    manifest: RunManifest,
    store: ObjectStore,
    api: BatchApi,
    settings: Settings,
    wait_seconds: float,
    poll_seconds: float = CHAIN_POLL_SECONDS,
) -> RunManifest:
    """Carry a run as far as it can go now: submit, poll, collect, retry-failures and load, each as
    soon as it is possible. Open batches are polled every `poll_seconds` for up to `wait_seconds`;
    then the run is left to the next poll; shards that could not be submitted (queue full, leases
    held by another process) are tried again in the same rhythm. Stops at once when an operator's
    approval is awaited or the run is done."""
    deadline = time.monotonic() + wait_seconds
    while True:
        step, before = next_step(manifest, time.time()), _shape(manifest)
        if step == "approval" and holds_approval(manifest):
            step = "submit"  # resumed after the operator answered: the submit stage reads it
        if step == "submit":
            manifest = submit_stage(manifest, store, api, settings)
            if _shape(manifest) != before:
                continue
            # nothing submitted now: shards wait for queue room, or another process holds their
            # leases. Poll what is open and try again, until the wait is over.
            step = "wait"
        if step == "wait":
            if wait_seconds <= 0:
                return manifest  # not waiting for the provider at all: the poller polls
            manifest = poll_stage(manifest, store, api, settings.expiry_grace_seconds)
            observe.publish_progress(manifest)
            if _shape(manifest) != before:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return manifest
            time.sleep(min(poll_seconds, left))
            continue
        if step == "collect":
            manifest = collect_stage(manifest, store, api)
        elif step == "finish":
            manifest = reconcile_stage(manifest, store, api)
            if next_step(manifest, time.time()) == "finish":
                manifest, _ = retry_stage(manifest, store)
            if next_step(manifest, time.time()) == "finish":
                return load_stage(manifest, store)
        else:  # done, approval, blocked
            return manifest
        if _shape(manifest) == before:
            return manifest
