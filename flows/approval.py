"""Budget approval for an over-budget run, without holding a worker.

One request per run: asking is a compare-and-swap on the manifest, so of all the stage runs that
reach the budget gate only one asks and waits; the others leave the run to it. In a deployment
run the wait is `suspend_flow_run` (the process exits; resuming starts the flow again from the top,
which finds the answer under the same key); outside a deployment (`nightbatch run`) it is
`pause_flow_run` in the user's own process."""

from __future__ import annotations

import time

from prefect import get_run_logger, pause_flow_run, suspend_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run

from flows import observe
from schemas.manifest import Approval, RunManifest
from tasks.errors import BudgetExceededError
from tasks.leases import new_owner
from tasks.runs import update_manifest, utc_now
from tasks.storage import ObjectStore


class BudgetApproval(RunInput):
    """The operator's answer to an over-budget run (Prefect UI: resume the paused flow run)."""

    approve: bool = False
    approved_by: str = "operator"


def _requester() -> str:
    return str(flow_run.id) if flow_run.id else new_owner()


def holds_approval(manifest: RunManifest) -> bool:
    """Whether this flow run is the one that asked for the run's approval (a resumed run)."""
    approval = manifest.approval
    return (
        approval is not None
        and approval.decision == "pending"
        and approval.requested_by == _requester()
    )


def request_approval(manifest: RunManifest, store: ObjectStore, reason: str) -> RunManifest | None:
    """Wait for an operator's answer. Returns the approved manifest; None when another flow run
    holds this run's request (this one leaves the run alone); raises when the answer is no."""
    logger = get_run_logger()
    me = _requester()
    timeout = manifest.job.limits.approval_timeout_seconds

    def ask(m: RunManifest) -> RunManifest:
        current = m.approval
        if (
            current is not None
            and current.decision == "pending"
            and current.expires_at > time.time()
        ):
            return m  # somebody's request stands (ours again, if this is a resumed run)
        request = Approval(
            requested_at=utc_now(), requested_by=me, expires_at=time.time() + timeout
        )
        return m.model_copy(update={"approval": request})

    manifest = update_manifest(store, manifest, ask)
    assert manifest.approval is not None
    if manifest.approval.requested_by != me:
        logger.info(
            "run %s already waits for approval in flow run %s; leaving it",
            manifest.run_id, manifest.approval.requested_by,
        )  # fmt: skip
        return None
    logger.warning("%s Waiting for an operator's approval in the Prefect UI.", reason)
    create_markdown_artifact(
        markdown=f"# Budget approval needed: {manifest.run_id}\n\n{reason}\n\n"
        "Resume this flow run with `approve: true` to submit anyway, or `approve: false` to stop.",
        key=observe.artifact_key("budget", manifest.job_name),
    )
    if deployment.id:
        answer = suspend_flow_run(
            wait_for_input=BudgetApproval, timeout=timeout, key=f"budget-{manifest.run_id}"
        )
    else:
        answer = pause_flow_run(wait_for_input=BudgetApproval, timeout=timeout)
    decision = "approved" if answer.approve else "rejected"

    def decide(m: RunManifest) -> RunManifest:
        assert m.approval is not None
        approval = m.approval.model_copy(
            update={"decision": decision, "decided_by": answer.approved_by}
        )
        update: dict[str, object] = {"approval": approval}
        if answer.approve:
            update |= {"budget_approved_by": answer.approved_by, "budget_approved_at": utc_now()}
        return m.model_copy(update=update)

    manifest = update_manifest(store, manifest, decide)
    if not answer.approve:
        raise BudgetExceededError(f"{reason} An operator ({answer.approved_by}) rejected it.")
    logger.info("budget approved by %s", answer.approved_by)
    return manifest
