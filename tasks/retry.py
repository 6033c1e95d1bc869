"""retry-failures: rebuild shards of the retryable rows as the next attempt.

Retryable: 429/5xx/408 lines, request_timeout, batch_expired, batch_cancelled, lines that never came
back, and rows of a batch refused for the enqueued-token limit (those do not use up an attempt).
Everything else, and rows out of attempts, stays failed and is dead-lettered by load."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import orjson
import pyarrow as pa

from schemas.manifest import RunManifest, Shard
from tasks.layout import RunLayout
from tasks.prepare import ShardPacker
from tasks.storage import ObjectStore
from tasks.tokens import count_request_tokens

FREE_RETRY_CODES = {"token_limit_exceeded"}  # the batch never ran: no attempt used


@dataclass
class RetryPlan:
    """custom_ids to resend, grouped by the shard whose request file holds their line."""

    by_source_shard: dict[str, set[str]] = field(default_factory=dict)
    exhausted: int = 0
    permanent: int = 0

    @property
    def rows(self) -> int:
        return sum(len(ids) for ids in self.by_source_shard.values())


def plan_retries(errors: pa.Table, succeeded: set[str], max_attempts: int) -> RetryPlan:
    """Decide, from every error row of every attempt, which rows get another attempt."""
    attempts_used: dict[str, int] = defaultdict(int)
    latest: dict[str, dict] = {}
    for row in errors.select(["custom_id", "attempt", "batch_id", "code", "retryable"]).to_pylist():
        cid = row["custom_id"]
        if cid in succeeded:
            continue
        if row["code"] not in FREE_RETRY_CODES:
            attempts_used[cid] += 1
        if cid not in latest or row["attempt"] >= latest[cid]["attempt"]:
            latest[cid] = row
    plan = RetryPlan()
    for cid, row in latest.items():
        if not row["retryable"]:
            plan.permanent += 1
        elif attempts_used[cid] >= max_attempts:
            plan.exhausted += 1
        else:
            plan.by_source_shard.setdefault(row["batch_id"], set()).add(cid)
    return plan


def write_retry_shards(
    manifest: RunManifest, plan: RetryPlan, store: ObjectStore, layout: RunLayout
) -> list[Shard]:
    """Copy the planned lines from their request files into new shards of the next attempt."""
    attempt = manifest.current_attempt + 1
    packer = ShardPacker(manifest.job, store, layout, attempt)
    by_batch = {s.batch_id: s for s in manifest.shards if s.batch_id}
    endpoint = manifest.job.request.endpoint
    try:
        for batch_id, ids in sorted(plan.by_source_shard.items()):
            source = by_batch[batch_id]
            with store.open_read(source.request_uri) as handle:
                for raw in handle:
                    if not raw.strip():
                        continue
                    line = orjson.loads(raw)
                    if line["custom_id"] in ids:
                        tokens = count_request_tokens(endpoint, line["body"])
                        packer.add(
                            line["custom_id"], raw if raw.endswith(b"\n") else raw + b"\n", tokens
                        )
    except BaseException:
        packer.abort()
        raise
    return packer.finish()
