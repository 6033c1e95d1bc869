"""Pure manifest transitions. Each checks the state it starts from and returns a new object; stages
persist the result. A transition from the wrong state raises InvalidTransitionError."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from schemas.manifest import TERMINAL_BATCH_STATUSES, RunManifest, Shard, ShardCounts
from tasks.batch_api import BatchInfo
from tasks.errors import InvalidTransitionError, LeaseLostError


def _require(shard: Shard, allowed: Iterable[str], action: str) -> None:
    allowed = tuple(allowed)
    if shard.state not in allowed:
        raise InvalidTransitionError(
            f"cannot {action} shard {shard.shard_id}: it is {shard.state!r}, expected one of {allowed}"
        )


def lease_is_free(shard: Shard, now_epoch: float, holder_gone: bool = False) -> bool:
    """A shard in `submitting` whose lease has expired (or whose holder is known to be gone) may be
    taken over; one in `prepared` has no lease yet."""
    if shard.state == "prepared":
        return True
    if shard.state != "submitting":
        return False
    expired = shard.lease_expires_at is None or shard.lease_expires_at <= now_epoch
    return expired or holder_gone


def start_submit(
    shard: Shard,
    now: str,
    owner: str = "",
    now_epoch: float = 0.0,
    lease_seconds: float = 0.0,
    holder_gone: bool = False,
) -> Shard:
    """Record the intent to submit, and take the shard's submit lease, before anything is uploaded
    or created. A shard already `submitting` is taken over only when its lease is free."""
    _require(shard, ("prepared", "submitting"), "start submitting")
    if not lease_is_free(shard, now_epoch, holder_gone):
        raise LeaseLostError(
            f"shard {shard.shard_id} is being submitted by {shard.submit_owner} "
            f"(lease until {shard.lease_expires_at})"
        )
    return shard.model_copy(
        update={
            "state": "submitting",
            "submit_started_at": shard.submit_started_at if shard.state == "submitting" else now,
            "submit_owner": owner or None,
            "lease_expires_at": now_epoch + lease_seconds if owner else None,
        }
    )


def renew_lease(shard: Shard, owner: str, now_epoch: float, lease_seconds: float) -> Shard:
    """Extend our lease before a create; LeaseLostError when it is no longer ours."""
    if shard.state != "submitting" or shard.submit_owner != owner:
        raise LeaseLostError(
            f"shard {shard.shard_id} is no longer ours to submit: it is {shard.state!r}, "
            f"lease held by {shard.submit_owner}"
        )
    return shard.model_copy(update={"lease_expires_at": now_epoch + lease_seconds})


def record_batch(shard: Shard, batch: BatchInfo, now: str) -> Shard:
    _require(shard, ("submitting",), "record a batch for")
    return shard.model_copy(
        update={
            "state": "submitted",
            "submit_owner": None,
            "lease_expires_at": None,
            "file_id": batch.input_file_id,
            "batch_id": batch.id,
            "batch_status": batch.status,
            "expires_at": batch.expires_at,
            "submitted_at": now,
        }
    )


def record_poll(shard: Shard, batch: BatchInfo, now: str) -> Shard:
    _require(shard, ("submitted",), "record a poll of")
    if batch.id != shard.batch_id:
        raise InvalidTransitionError(
            f"shard {shard.shard_id} has batch {shard.batch_id}, not {batch.id}"
        )
    terminal = batch.status in TERMINAL_BATCH_STATUSES
    return shard.model_copy(
        update={
            "state": "terminal" if terminal else "submitted",
            "batch_status": batch.status,
            "request_counts": batch.request_counts,
            "batch_errors": batch.errors,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "terminal_at": now if terminal else None,
        }
    )


def record_collected(shard: Shard, results_uri: str, errors_uri: str, counts: ShardCounts) -> Shard:
    _require(shard, ("terminal",), "record the collection of")
    return shard.model_copy(
        update={
            "state": "collected",
            "results_uri": results_uri,
            "errors_uri": errors_uri,
            "counts": counts,
        }
    )


def record_provider_files_deleted(shard: Shard) -> Shard:
    _require(shard, ("collected",), "record the provider files deleted of")
    return shard.model_copy(update={"provider_files_deleted": True})


def replace_shard(manifest: RunManifest, shard: Shard, now: str) -> RunManifest:
    shards = [shard if s.shard_id == shard.shard_id else s for s in manifest.shards]
    return manifest.model_copy(update={"shards": shards, "updated_at": now})


def replace_shards(manifest: RunManifest, changed: Iterable[Shard], now: str) -> RunManifest:
    by_id = {s.shard_id: s for s in changed}
    shards = [by_id.get(s.shard_id, s) for s in manifest.shards]
    return manifest.model_copy(update={"shards": shards, "updated_at": now})


def advance_shards(
    manifest: RunManifest, changes: Mapping[str, Callable[[Shard], Shard]], now: str
) -> RunManifest:
    """Apply each shard's transition to that shard as it is in `manifest` now. A shard whose state
    no longer allows it (another process advanced it first) is left as it is; with nothing changed,
    `manifest` itself is returned (and nothing needs saving)."""
    changed: list[Shard] = []
    for shard in manifest.shards:
        change = changes.get(shard.shard_id)
        if change is None:
            continue
        try:
            changed.append(change(shard))
        except InvalidTransitionError:
            continue
    if not changed:
        return manifest
    return with_status(replace_shards(manifest, changed, now), now)


def run_status_from_shards(manifest: RunManifest) -> str:
    """The run status the shard states amount to (loaded, failed and abandoned are kept as they are)."""
    if manifest.status in ("loaded", "abandoned"):
        return manifest.status
    states = {s.state for s in manifest.shards}
    if not states or states == {"collected"}:
        return "collected"
    if states & {"prepared", "submitting"}:
        return "submitting" if states - {"prepared"} else "prepared"
    return "waiting"


def with_status(manifest: RunManifest, now: str, **extra: Any) -> RunManifest:
    update = {"status": run_status_from_shards(manifest), "updated_at": now, **extra}
    return manifest.model_copy(update=update)


def mark_loaded(manifest: RunManifest, now: str, **extra: Any) -> RunManifest:
    if run_status_from_shards(manifest) != "collected" and manifest.status != "loaded":
        raise InvalidTransitionError(
            f"cannot load run {manifest.run_id}: not every shard is collected ({manifest.status})"
        )
    return manifest.model_copy(
        update={"status": "loaded", "loaded_at": now, "updated_at": now, **extra}
    )


def dead_letter_verdict(
    manifest: RunManifest, dead_lettered: int, reasons: dict[str, int]
) -> str | None:
    """Why a loaded run went badly (its dead-letter share is above the job's limit), or None."""
    rows = manifest.rows_selected
    limit = manifest.job.limits.max_dead_letter_fraction
    if rows == 0 or dead_lettered / rows <= limit:
        return None
    top = ", ".join(f"{code} {n}" for code, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5])
    return (
        f"{dead_lettered} of {rows} rows ({100 * dead_lettered / rows:.1f}%) are in the dead letter, "
        f"above limits.max_dead_letter_fraction = {100 * limit:g}%; top reasons: {top or 'none'}"
    )


def is_overdue(status: str, expires_at: int | None, now_epoch: float, grace_seconds: float) -> bool:
    """A batch still open past its expires_at plus a grace period is to be cancelled."""
    if status in TERMINAL_BATCH_STATUSES or status == "cancelling" or expires_at is None:
        return False
    return now_epoch > expires_at + grace_seconds


def reopen_for_retry(manifest: RunManifest, extra_attempts: int, now: str) -> RunManifest:
    """Give a finished run's failed rows `extra_attempts` more attempts (the next load replaces its
    output and cost record)."""
    if manifest.status == "abandoned":
        raise InvalidTransitionError(f"run {manifest.run_id} was abandoned; start a new run date")
    retry = manifest.job.retry.model_copy(
        update={"max_attempts": manifest.job.retry.max_attempts + extra_attempts}
    )
    job = manifest.job.model_copy(update={"retry": retry})
    reopened = manifest.model_copy(update={"job": job, "status": "collected", "loaded_at": None})
    return with_status(reopened, now)


def mark_abandoned(manifest: RunManifest, now: str, note: str) -> RunManifest:
    if manifest.status == "loaded":
        raise InvalidTransitionError(f"run {manifest.run_id} is already loaded; nothing to abandon")
    notes = [*manifest.notes, note]
    return manifest.model_copy(update={"status": "abandoned", "updated_at": now, "notes": notes})
