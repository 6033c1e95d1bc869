"""Enqueued-token admission control: which prepared shards may be submitted now.

The Batch API refuses a batch (`token_limit_exceeded`) when the model's queued input tokens — over
all non-terminal batches — would pass the organisation's limit, and allows 2,000 batch creations per
hour. Submit admits shards in order while both stay within bounds; the rest wait for a later cycle."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.manifest import OPEN_BATCH_STATUSES, RunManifest, Shard

MAX_CREATES_PER_HOUR = 2000


@dataclass(frozen=True)
class QueueState:
    queued_tokens: int  # input tokens of this model's batches that are not terminal yet
    created_last_hour: int  # batches created by nightbatch in the past hour


def queue_state(manifests: Iterable[RunManifest], model: str, now: datetime) -> QueueState:
    hour_ago = now - timedelta(hours=1)
    queued = created = 0
    for manifest in manifests:
        for shard in manifest.shards:
            if shard.submitted_at and datetime.fromisoformat(shard.submitted_at) >= hour_ago:
                created += 1
            if manifest.job.request.model != model:
                continue
            in_flight = shard.state == "submitting" or (
                shard.state == "submitted" and shard.batch_status in OPEN_BATCH_STATUSES
            )
            if in_flight:
                queued += shard.input_tokens
    return QueueState(queued, created)


def admit(
    pending: list[Shard],
    state: QueueState,
    token_limit: int | None,
    max_creates_per_hour: int = MAX_CREATES_PER_HOUR,
) -> list[Shard]:
    """The prefix of `pending` that fits under the token limit and the hourly creation cap."""
    admitted: list[Shard] = []
    queued = state.queued_tokens
    creates_left = max(max_creates_per_hour - state.created_last_hour, 0)
    for shard in pending:
        if len(admitted) >= creates_left:
            break
        if token_limit is not None and queued + shard.input_tokens > token_limit:
            break
        admitted.append(shard)
        queued += shard.input_tokens
    return admitted
