"""Prefect tasks: thin wrappers that unpack references, call one piece of logic or one adapter, and
return a small summary. Retries are driven by the transient branch of the error hierarchy only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.job import JobSpec
from schemas.manifest import Shard, ShardCounts
from tasks.batch_api import BatchApi, BatchInfo
from tasks.cache import CacheIndex, CacheWrite
from tasks.collect import collect_shard
from tasks.errors import TransientError
from tasks.layout import RunLayout
from tasks.prepare import PrepareResult, write_shards
from tasks.storage import ObjectStore
from tasks.submit import submit_shard


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only when it failed with a TransientError."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


RETRIES = 3
RETRY_DELAYS: list[float] = [2, 10, 30]


@task(name="write-shards", cache_policy=NO_CACHE)
def write_shards_task(
    job: JobSpec, store: ObjectStore, layout: RunLayout, cache_index: CacheIndex | None = None
) -> PrepareResult:
    return write_shards(job, store, layout, cache_index=cache_index)


@task(
    name="submit-shard",
    task_run_name="submit-{shard.shard_id}",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=only_transient,
    cache_policy=NO_CACHE,
)
def submit_shard_task(
    api: BatchApi,
    store: ObjectStore,
    run_id: str,
    endpoint: str,
    shard: Shard,
    keep_lease: Callable[[], None] | None = None,
    root: str = "",
) -> BatchInfo:
    return submit_shard(api, store, run_id, endpoint, shard, keep_lease=keep_lease, root=root)


@task(
    name="poll-batches",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=only_transient,
    cache_policy=NO_CACHE,
)
def poll_batches_task(api: BatchApi, batch_ids: list[str]) -> list[BatchInfo]:
    """Every open batch's status, in one task run per poll (reads only: retrying is harmless)."""
    return [api.retrieve(batch_id) for batch_id in batch_ids]


@task(
    name="collect-shard",
    task_run_name="collect-{shard.shard_id}",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=only_transient,
    cache_policy=NO_CACHE,
)
def collect_shard_task(
    job: JobSpec,
    layout: RunLayout,
    shard: Shard,
    store: ObjectStore,
    api: BatchApi,
    cache_write: CacheWrite | None = None,
) -> tuple[str, str, ShardCounts]:
    return collect_shard(job, layout, shard, store, api, cache_write)
