"""Starting stage runs as deployment runs, and reading back the ones started before: the Prefect
side of the poller's healing. What to do is decided in `tasks.advance.decide_launch`."""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.deployments import run_deployment
from prefect.states import Crashed

from tasks.advance import StageAttempt


def run_tag(run_id: str) -> str:
    """The tag every stage run started for a run carries (filter on it in the UI)."""
    return f"nightbatch-run:{run_id}"


def stage_attempts(run_id: str, prefix: str) -> list[StageAttempt]:
    """The stage runs started before under keys `prefix<n>` (same stage, same run state)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[run_tag(run_id)])),
            limit=200,
        )
    attempts = []
    for run in runs:
        key = run.idempotency_key or ""
        number = key.removeprefix(prefix)
        if not key.startswith(prefix) or not number.isdigit() or run.state is None:
            continue
        attempts.append(
            StageAttempt(
                number=int(number),
                state=run.state.type.value,
                flow_run_id=str(run.id),
                started_at=run.start_time.timestamp() if run.start_time else None,
                ended_at=run.end_time.timestamp() if run.end_time else None,
            )
        )
    return attempts


def mark_crashed(flow_run_id: str, message: str) -> None:
    """End a stage run that is stuck (its process is gone or hangs), releasing its concurrency slot."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)


def start_stage(
    deployment: str, parameters: dict[str, Any], key: str, run_id: str, tags: list[str]
) -> Any:
    """Start a stage as its own deployment run; the key makes a repeated start return the same run."""
    return run_deployment(
        deployment,
        parameters=parameters,
        idempotency_key=key,
        timeout=0,
        as_subflow=False,
        tags=[*tags, run_tag(run_id)],
    )
