"""retry-failures: rebuild shards of the retryable rows as the next attempt.

Retryable: 429/5xx/408 lines, request_timeout, batch_expired, batch_cancelled, lines that never came
back, and rows of a batch refused for the enqueued-token limit (those do not use up an attempt).
Everything else, and rows out of attempts, stays failed and is dead-lettered by load."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import orjson
import pyarrow as pa

from schemas.manifest import RunManifest, Shard
from tasks.cache import cache_key_from_line, custom_id_of_line
from tasks.layout import RunLayout
from tasks.prepare import ShardPacker
from tasks.storage import ObjectStore
from tasks.tokens import count_requests_tokens

FREE_RETRY_CODES = {"token_limit_exceeded"}  # the batch never ran: no attempt used
MAX_FREE_RETRIES = 10  # after this many free requeues of a row, each further one uses an attempt


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
    free_used: dict[str, int] = defaultdict(int)
    latest: dict[str, dict] = {}
    for row in errors.select(["custom_id", "attempt", "batch_id", "code", "retryable"]).to_pylist():
        cid = row["custom_id"]
        if cid in succeeded:
            continue
        if row["code"] in FREE_RETRY_CODES and free_used[cid] < MAX_FREE_RETRIES:
            free_used[cid] += 1  # bounded: a queue that never has room must not loop for ever
        else:
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


RETRY_GROUP_LINES = 4096  # planned lines whose tokens are counted together


def _groups(lines: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    while group := list(islice(lines, size)):
        yield group


def write_retry_shards(
    manifest: RunManifest, plan: RetryPlan, store: ObjectStore, layout: RunLayout
) -> list[Shard]:
    """Copy the planned lines from their request files into new shards of the next attempt. A line's
    custom_id is read from its start (lines of other rows are not parsed), and the tokens of the
    copied lines are counted exactly, a group at a time (`count_requests_tokens`)."""
    attempt = manifest.current_attempt + 1
    packer = ShardPacker(manifest.job, store, layout, attempt)
    by_batch = {s.batch_id: s for s in manifest.shards if s.batch_id}
    endpoint = manifest.job.request.endpoint
    keyed = manifest.job.cache.enabled  # the copies' sidecars hold their cache keys, as prepare's
    try:
        for batch_id, ids in sorted(plan.by_source_shard.items()):
            lines = store.iter_lines(by_batch[batch_id].request_uri)
            planned = (raw for raw in lines if raw.strip() and custom_id_of_line(raw) in ids)
            for group in _groups(planned, RETRY_GROUP_LINES):
                bodies = [orjson.loads(raw)["body"] for raw in group]
                tokens = count_requests_tokens(endpoint, bodies)
                for raw, count in zip(group, tokens, strict=True):
                    line = raw if raw.endswith(b"\n") else raw + b"\n"
                    key = cache_key_from_line(line) if keyed else None
                    packer.add(custom_id_of_line(raw), line, count, key)
    except BaseException:
        packer.abort()
        raise
    return packer.finish()
