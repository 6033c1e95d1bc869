"""What an open run needs next, and whether the poller should start a stage run for it. Pure: the
poller asks this of every run's manifest and of the stage runs it started before."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from schemas.manifest import RunManifest
from tasks.reconcile import open_strays, uncounted_strays

Step = Literal["submit", "wait", "collect", "finish", "approval", "blocked", "done"]


def next_step(manifest: RunManifest, now_epoch: float = 0.0) -> Step:
    """submit: shards wait to be submitted; collect: batches are terminal and not yet parsed;
    wait: batches are still open; finish: everything is collected (retry-failures, then load);
    approval: an operator's answer is awaited; blocked: an operator rejected the estimate."""
    if manifest.status in ("loaded", "abandoned"):
        return "done"
    approval = manifest.approval
    if approval is not None and approval.decision == "rejected":
        return "blocked"
    if approval is not None and approval.decision == "pending" and approval.expires_at > now_epoch:
        return "approval"
    states = {s.state for s in manifest.shards}
    if states & {"prepared", "submitting"}:
        return "submit"
    if "terminal" in states:
        return "collect"
    if "submitted" in states or open_strays(manifest):
        return "wait"
    if uncounted_strays(manifest):
        return "collect"
    return "finish"


def step_key(manifest: RunManifest, step: Step, attempt: int = 1) -> str:
    """An idempotency key for starting `step` on this run: the same while the run has not moved,
    different once it has; `attempt` counts the stage runs started for the same state (a failed
    or stuck stage run is started again under the next attempt's key)."""
    shards = ",".join(f"{s.shard_id}:{s.state}" for s in manifest.shards)
    digest = hashlib.sha256(shards.encode()).hexdigest()[:16]
    return f"{step}:{manifest.run_id}:{digest}:{attempt}"


def key_prefix(key: str) -> str:
    return key.rsplit(":", 1)[0] + ":"


ACTIVE_STATES = frozenset({"SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED"})
FAILED_STATES = frozenset({"FAILED", "CRASHED", "CANCELLED"})


@dataclass(frozen=True)
class StageAttempt:
    """A stage run the poller started before for the same run state (from Prefect's API)."""

    number: int
    state: str  # Prefect state type: SCHEDULED, RUNNING, COMPLETED, FAILED, CRASHED, ...
    flow_run_id: str
    started_at: float | None = None  # epoch seconds
    ended_at: float | None = None


@dataclass(frozen=True)
class Launch:
    action: Literal["start", "leave", "give_up"]
    attempt: int  # the attempt to start (start) or the one that stands (leave, give_up)
    reason: str
    stuck: StageAttempt | None = None  # a run to mark crashed before starting the next
    failed: StageAttempt | None = None  # the failed run this start replaces


def decide_launch(
    attempts: Sequence[StageAttempt],
    now: float,
    timeout_seconds: float,
    max_attempts: int,
    backoff_seconds: float = 60.0,
) -> Launch:
    """Start the stage when nothing was started for this state; leave a run that is still going;
    start the next attempt after a completed one (the run still needs the step), after a failed
    or crashed one (with exponential backoff), or after one stuck past `timeout_seconds`; give up
    after `max_attempts` failures."""
    if not attempts:
        return Launch("start", 1, "first start for this state of the run")
    last = max(attempts, key=lambda a: a.number)
    failures = sum(1 for a in attempts if a.state in FAILED_STATES)
    if last.state in ACTIVE_STATES:
        running_for = now - last.started_at if last.started_at is not None else 0.0
        if last.state == "RUNNING" and running_for > timeout_seconds:
            if failures + 1 >= max_attempts:
                return Launch("give_up", last.number, _stuck(last, running_for), stuck=last)
            return Launch("start", last.number + 1, _stuck(last, running_for), stuck=last)
        return Launch("leave", last.number, f"flow run {last.flow_run_id} is {last.state.lower()}")
    if last.state not in FAILED_STATES:
        return Launch("start", last.number + 1, f"flow run {last.flow_run_id} completed before")
    if failures >= max_attempts:
        return Launch(
            "give_up", last.number, f"the stage failed {failures} times (last: {last.state})"
        )
    wait = backoff_seconds * 2 ** (failures - 1)
    if last.ended_at is not None and now < last.ended_at + wait:
        return Launch("leave", last.number, f"backing off {wait:.0f}s after a {last.state} run")
    return Launch(
        "start",
        last.number + 1,
        f"flow run {last.flow_run_id} ended {last.state}; starting the stage again",
        failed=last,
    )


def _stuck(run: StageAttempt, seconds: float) -> str:
    return f"flow run {run.flow_run_id} has been running for {seconds:.0f}s, past the stage timeout"
