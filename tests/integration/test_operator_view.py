"""What operators see in Prefect: artifacts and events per run; the budget gate, failing or waiting for
an operator's approval."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.events.worker import EventsWorker
from prefect.flow_runs import resume_flow_run

from flows.stages import pipeline, prepare, submit
from tasks.errors import BudgetExceededError
from tasks.runs import layout_for, load_manifest
from tasks.samples import support_tickets
from tasks.storage import ObjectStore
from tests.integration.helpers import chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
RUN_DATE = "2026-11-24"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "tickets.parquet"
    pq.write_table(support_tickets(50), path)
    return path


def test_a_run_publishes_its_artifacts_and_events(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    job = chat_job(source, tmp_path, name="observed-job")
    emulator.configure(faults={"forced_line_failures": {"r-T-000002": "context_length_exceeded"}})
    pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.1)

    run_md = Artifact.get("run-observed-job-2026-11-24")
    assert run_md is not None and run_md.type == "markdown"
    text = str(run_md.data)
    assert "# observed-job-2026-11-24: loaded" in text
    assert "| context_length_exceeded | 1 |" in text
    assert "sk-test-secret" not in text and "Subject:" not in text  # no keys, no prompts
    cost = Artifact.get("cost-observed-job")
    assert cost is not None and cost.type == "table" and "cost_batch_usd" in str(cost.data)
    link = Artifact.get("output-observed-job")
    assert link is not None and "run_date=2026-11-24/part-0.parquet" in str(link.data)
    progress = Artifact.get("progress-observed-job")
    assert progress is not None and float(progress.data) == 100.0  # type: ignore[arg-type]

    EventsWorker.drain_all()
    deadline = time.monotonic() + 20
    names: set[str] = set()
    while (
        time.monotonic() < deadline
        and not {"nightbatch.batch.completed", "nightbatch.run.loaded"} <= names
    ):
        with get_client(sync_client=True) as client:
            page = client.read_events(
                EventFilter(event=EventNameFilter(prefix=["nightbatch."])), limit=50
            )
        names = {
            e.event for e in page.events if e.payload.get("run_id") == "observed-job-2026-11-24"
        }
        time.sleep(0.5)
    assert {"nightbatch.batch.completed", "nightbatch.run.loaded"} <= names


def test_an_over_budget_run_submits_nothing(tmp_path: Path, source: Path, emulator: Any) -> None:
    job = chat_job(source, tmp_path, limits={"max_cost_usd": 0.000001})
    summary = prepare(job, RUN_DATE)
    assert summary["status"] == "prepared"
    with pytest.raises(
        BudgetExceededError,
        match=r"estimated at \$0\.\d+.*max_cost_usd = \$0\.00; nothing was submitted",
    ):
        submit(job, RUN_DATE)
    assert emulator.stats()["files"]["created"] == 0 and emulator.stats()["batches"]["created"] == 0
    # raising the budget in the job spec lets the same run go on
    raised = job.model_copy(update={"limits": job.limits.model_copy(update={"max_cost_usd": 10.0})})
    assert pipeline(raised, run_date=RUN_DATE, poll_interval_seconds=0.1)["status"] == "loaded"


def test_an_over_budget_run_waits_for_an_operators_approval(
    tmp_path: Path, source: Path, emulator: Any
) -> None:
    job = chat_job(
        source, tmp_path, name="approval-job",
        limits={"max_cost_usd": 0.000001, "over_budget": "wait_for_approval", "approval_timeout_seconds": 120},
    )  # fmt: skip
    prepare(job, RUN_DATE)
    outcome: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: outcome.update(result=submit(job, RUN_DATE, continue_run=False)), daemon=True
    )
    worker.start()
    paused = None
    deadline = time.monotonic() + 90
    by_name = FlowRunFilter(name=FlowRunFilterName(any_=[f"submit-approval-job-{RUN_DATE}-a1"]))
    while paused is None and time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=by_name)
        paused = next((r for r in runs if r.state and r.state.is_paused()), None)
        time.sleep(0.3)
    assert paused is not None, "the submit flow run did not pause for approval"
    assert emulator.stats()["batches"]["created"] == 0  # nothing submitted while waiting
    resume_flow_run(paused.id, run_input={"approve": True, "approved_by": "alice"})
    worker.join(timeout=60)
    assert outcome["result"]["status"] == "waiting"
    manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
    assert manifest.budget_approved_by == "alice"
    assert manifest.approval is not None and manifest.approval.decision == "approved"
    assert emulator.stats()["batches"]["created"] == 2
