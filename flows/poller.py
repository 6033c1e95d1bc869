"""The scheduled poller: advances every open run and exits (no worker waits for hours).

Each run's open batches are polled inline (one cheap `retrieve` per batch). When the run needs a
stage, that stage is started as its own deployment run, keyed by the run's state and an attempt
number: a repeated poll never starts a stage twice, and a stage run that failed, crashed or got
stuck past `NIGHTBATCH_STAGE_TIMEOUT_SECONDS` is started again (with backoff, at most
`NIGHTBATCH_MAX_STAGE_ATTEMPTS` times), at WARNING and with a `nightbatch.stage.failed` or
`nightbatch.run.stuck` event. The stage run then carries the run as far as it goes."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger

from flows import launcher, observe
from flows.advancing import advance_run
from flows.context import build_batch_api, build_store, resolve_job
from flows.runstages import poll_stage, retryable_rows
from flows.stages import TASK_RUNNER
from schemas.job import JobSpec
from schemas.manifest import RunManifest
from schemas.settings import Settings
from tasks.advance import decide_launch, key_prefix, next_step, step_key
from tasks.batch_api import BatchApi
from tasks.errors import NightbatchError
from tasks.runs import list_open_manifests, refresh_job
from tasks.storage import ObjectStore

STAGE_FLOWS = {"submit": "submit", "collect": "collect", "retry": "retry-failures", "load": "load"}


def _poller_name() -> str:
    return f"poller-{datetime.now(UTC):%Y-%m-%dT%H%MZ}"


@flow(name="poller", flow_run_name=_poller_name, task_runner=TASK_RUNNER)
def poller(jobs: list[JobSpec | str], launch: bool = True) -> dict[str, Any]:
    """Advance every open run of the given jobs: poll its open batches, then start the stage it
    needs (which goes on as far as the run can go), or start again a stage run that failed.

    Args:
        jobs: The jobs to look after: paths of their YAML files (relative to the project
            directory) or specs as mappings.
        launch: Start each stage as its own deployment run `{flow}/{job name}` (deployments);
            false runs the stages inline in this flow run (local use).
    """
    settings = Settings.from_env()
    store = build_store(settings)
    api = build_batch_api(settings)
    report: dict[str, Any] = {}
    for job in map(resolve_job, jobs):
        for manifest in list_open_manifests(store, job.storage_root, datetime.now(UTC)):
            if manifest.job_name != job.name or next_step(manifest, time.time()) == "done":
                continue
            try:
                report[manifest.run_id] = _advance(job, manifest, store, api, settings, launch)
            except NightbatchError as exc:  # one broken run must not stop the others
                get_run_logger().error("run %s: %s: %s", manifest.run_id, type(exc).__name__, exc)
                report[manifest.run_id] = f"error: {type(exc).__name__}"
    return report


def _advance(
    job: JobSpec,
    manifest: RunManifest,
    store: ObjectStore,
    api: BatchApi,
    settings: Settings,
    launch: bool,
) -> str:
    """Poll the run's open batches, then start (or run inline) the stage it needs."""
    manifest = refresh_job(manifest, job)
    if next_step(manifest, time.time()) == "wait":
        manifest = poll_stage(manifest, store, api, settings.expiry_grace_seconds)
        observe.publish_progress(manifest)
    step: str = next_step(manifest, time.time())
    if step == "finish":
        step = "retry" if retryable_rows(manifest, store) else "load"
    if step not in STAGE_FLOWS:
        return step
    if launch:
        return _start(job, manifest, step, settings)
    return advance_run(manifest, store, api, settings, settings.chain_wait_seconds).status


def _start(job: JobSpec, manifest: RunManifest, step: str, settings: Settings) -> str:
    """Start (or start again) the stage run `step` needs; returns what was done."""
    logger = get_run_logger()
    key = step_key(manifest, step)  # type: ignore[arg-type]
    attempts = launcher.stage_attempts(manifest.run_id, key_prefix(key))
    decision = decide_launch(
        attempts, time.time(), settings.stage_timeout_seconds, settings.max_stage_attempts,
        settings.stage_backoff_seconds,
    )  # fmt: skip
    stage = STAGE_FLOWS[step]
    if decision.stuck is not None:
        launcher.mark_crashed(decision.stuck.flow_run_id, f"nightbatch poller: {decision.reason}")
        logger.warning("run %s: %s; marked it crashed", manifest.run_id, decision.reason)
        observe.run_stuck(manifest.run_id, manifest.job_name, stage, decision.reason)
    if decision.failed is not None:
        logger.warning("run %s: %s", manifest.run_id, decision.reason)
        observe.stage_failed(
            manifest.run_id, manifest.job_name, stage, decision.failed.flow_run_id,
            decision.failed.state, decision.reason,
        )  # fmt: skip
    if decision.action == "give_up":
        logger.error(
            "run %s: %s; not starting %s again. Look at the failed flow runs, fix the cause, then "
            "start %s/%s by hand", manifest.run_id, decision.reason, stage, stage, job.name,
        )  # fmt: skip
        observe.run_stuck(manifest.run_id, manifest.job_name, stage, decision.reason)
        return f"{step}: gave up"
    if decision.action == "leave":
        logger.info("run %s: %s (%s)", manifest.run_id, step, decision.reason)
        return f"{step}: {decision.reason}"
    run = launcher.start_stage(
        f"{stage}/{job.name}",
        {"job": job.model_dump(mode="json"), "run_date": manifest.run_date},
        step_key(manifest, step, decision.attempt),  # type: ignore[arg-type]
        manifest.run_id,
        ["nightbatch", job.name],
    )
    restarted = decision.failed is not None or decision.stuck is not None
    log = logger.warning if restarted else logger.info
    log("run %s: started %s as flow run %s (attempt %d: %s)", manifest.run_id, stage, run.id,
        decision.attempt, decision.reason)  # fmt: skip
    return step
