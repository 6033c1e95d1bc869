"""The scheduled poller: advances every open run one step and exits (no worker waits for hours).

Each run is polled inline (one cheap `retrieve` per open batch); the next stage is started as its own
deployment run with an idempotency key, so a repeated poll never starts a stage twice."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows.context import build_batch_api, build_store, resolve_job
from flows.stages import TASK_RUNNER, poll_stage, retryable_rows
from schemas.job import JobSpec
from schemas.settings import Settings
from tasks.advance import next_step, step_key
from tasks.runs import list_manifests

STAGE_FLOWS = {"submit": "submit", "collect": "collect", "retry": "retry-failures", "load": "load"}


@flow(name="poller", flow_run_name="poller", task_runner=TASK_RUNNER)
def poller(jobs: list[JobSpec | str], launch: bool = True) -> dict[str, Any]:
    """Advance every open run of the given jobs by one step.

    With `launch` (the default, for deployments) the next stage runs as a deployment run named
    `{flow}/{job name}`; without it, the stage runs inline in this flow run (for local use)."""
    logger = get_run_logger()
    settings = Settings.from_env()
    store = build_store(settings)
    api = build_batch_api(settings)
    report: dict[str, Any] = {}
    for job in map(resolve_job, jobs):
        runs = list_manifests(store, job.storage_root)
        for manifest in runs:
            if manifest.job_name != job.name or next_step(manifest) == "done":
                continue
            if next_step(manifest) == "wait":
                manifest = poll_stage(manifest, store, api, settings.expiry_grace_seconds)
            step: str = next_step(manifest)
            if step == "finish":
                step = "retry" if retryable_rows(manifest, store) else "load"
            report[manifest.run_id] = step
            if step in STAGE_FLOWS:
                key = step_key(manifest, step)  # type: ignore[arg-type]
                params = {"job": job.model_dump(mode="json"), "run_date": manifest.run_date}
                if launch:
                    run: Any = run_deployment(
                        f"{STAGE_FLOWS[step]}/{job.name}",
                        parameters=params,
                        idempotency_key=key,
                        timeout=0,
                        as_subflow=False,
                        tags=["nightbatch", job.name],
                    )
                    logger.info(
                        "run %s: %s -> flow run %s (key %s)", manifest.run_id, step, run.id, key
                    )
                else:
                    _run_inline(step, job, manifest.run_date)
    return report


def _run_inline(step: str, job: JobSpec, run_date: str) -> None:
    from flows.stages import collect, load, retry_failures, submit

    stages = {"submit": submit, "collect": collect, "retry": retry_failures, "load": load}
    stages[step](job, run_date)
