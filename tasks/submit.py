"""submit: upload shard files and create batches, exactly once per shard attempt.

The protocol, safe against a crash, a retry or a concurrent submitter at any point:
1. the manifest records the intent (`submitting`) and the shard's submit lease, by compare-and-swap,
   before anything is uploaded: only the lease holder goes on (tasks/leases.py);
2. for a shard in `submitting`, look for a batch already created for it (batch metadata carries the run,
   the shard and the file's sha256); adopt it if found;
3. otherwise delete our orphaned uploads of that shard, upload the file, renew the lease (stop if it
   was lost), create the batch; if the create fails in a way that may have created it (5xx, timeout),
   look it up again before retrying.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import datetime

from schemas.manifest import Shard
from tasks.batch_api import BatchApi, BatchInfo
from tasks.crashpoints import crash_point
from tasks.errors import BatchApiUnavailable
from tasks.layout import root_digest
from tasks.storage import ObjectStore

CREATE_ATTEMPTS = 4
MAX_CREATE_BACKOFF_SECONDS = 30.0
LOOKUP_MARGIN_SECONDS = 24 * 3600.0


def shard_metadata(run_id: str, shard: Shard, root: str = "") -> dict[str, str]:
    """What a shard attempt's batch carries: the run, the storage root it belongs to (a digest:
    two roots may hold runs of the same job and date on one account), the shard and its content."""
    return {
        "nightbatch_run": run_id[:512],
        "nightbatch_shard": shard.shard_id,
        "nightbatch_attempt": str(shard.attempt),
        "nightbatch_sha256": shard.sha256,
        **root_metadata(root),
    }


def root_metadata(root: str) -> dict[str, str]:
    """The storage root's digest, as batch metadata (empty for callers that name no root)."""
    return {"nightbatch_root": root_digest(root)} if root else {}


def upload_filename(run_id: str, shard: Shard, root: str = "") -> str:
    where = f".{root_digest(root)}" if root else ""
    return f"nightbatch.{run_id}{where}.{shard.shard_id}.jsonl"


def lookup_since(started_at: str | None) -> float | None:
    """How far back a look-up for what a submit (or run) begun at `started_at` created must go:
    nothing of it is older; a day of margin for clocks."""
    if started_at is None:
        return None
    return datetime.fromisoformat(started_at).timestamp() - LOOKUP_MARGIN_SECONDS


def find_existing_batch(
    api: BatchApi, run_id: str, shard: Shard, root: str = ""
) -> BatchInfo | None:
    """The batch of this shard attempt of this run in this storage root, if one was created (one
    made before batches named their root is taken as ours)."""
    matches = api.find_batches(
        shard_metadata(run_id, shard),
        lookup_since(shard.submit_started_at),
        if_present=root_metadata(root),
    )
    if not matches:
        return None
    usable = [b for b in matches if b.status != "failed"] or matches
    return max(usable, key=lambda b: b.created_at or 0)


def delete_orphan_uploads(
    api: BatchApi, run_id: str, shard: Shard, keep: str | None = None, root: str = ""
) -> int:
    """Delete uploads of this shard that no batch uses (left by a crash between upload and create)."""
    name = upload_filename(run_id, shard, root)
    deleted = 0
    for file in api.iter_files(lookup_since(shard.submit_started_at)):
        if file.filename == name and file.id != keep:
            api.delete_file(file.id)
            deleted += 1
    return deleted


def submit_shard(
    api: BatchApi,
    store: ObjectStore,
    run_id: str,
    endpoint: str,
    shard: Shard,
    sleep: Callable[[float], None] | None = None,
    keep_lease: Callable[[], None] | None = None,
    root: str = "",
) -> BatchInfo:
    """Return the one batch of this shard attempt, creating it only if none exists. `keep_lease`
    renews this process's submit lease and raises LeaseLostError when it is no longer ours: it is
    called before the upload and before every create, so a lease cannot expire unnoticed."""
    renew = keep_lease or (lambda: None)
    existing = find_existing_batch(api, run_id, shard, root)
    if existing is not None:
        delete_orphan_uploads(api, run_id, shard, keep=existing.input_file_id, root=root)
        return existing
    delete_orphan_uploads(api, run_id, shard, root=root)
    renew()
    with store.open_read(shard.request_uri) as handle:
        file_id = api.upload(handle, upload_filename(run_id, shard, root))
    crash_point("after-upload")
    metadata = shard_metadata(run_id, shard, root)
    last_error: Exception | None = None
    for attempt in range(CREATE_ATTEMPTS):
        try:
            renew()
        except Exception:
            with contextlib.suppress(Exception):
                api.delete_file(file_id)
            raise
        try:
            batch = api.create_batch(file_id, endpoint, metadata)
            crash_point("after-create")
            return batch
        except BatchApiUnavailable as exc:
            last_error = exc
            # The create may have happened even though we got no answer: look before trying again.
            existing = find_existing_batch(api, run_id, shard, root)
            if existing is not None:
                return existing
            wait = exc.retry_after if exc.retry_after is not None else 0.5 * 2**attempt
            (sleep or time.sleep)(min(wait, MAX_CREATE_BACKOFF_SECONDS))
    with contextlib.suppress(Exception):
        api.delete_file(file_id)
    assert last_error is not None
    raise last_error
