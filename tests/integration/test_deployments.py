"""prefect.yaml for real: a local `prefect server start` (SQLite), `prefect deploy --all`, the shipped
automations, process workers; the nightly deployments and the poller against the emulator, observed
through the Prefect API.

- Racing and healing: submit stage runs (in and outside deployments) and pollers race on one run while the
  API answers 503s and fails 5% of lines, and a collect flow run is SIGKILLed once before it records
  anything: one batch per shard attempt, every row exactly once, the cost record equal to what the
  emulator billed, the crashed stage started again under the next attempt's key, nothing left
  running.
- Completion-driven progress: a run that needs three attempts is loaded within two poll cycles."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from schemas.job import JobSpec
from tasks.runs import layout_for, load_manifest
from tasks.samples import support_tickets
from tasks.storage import ObjectStore
from tests.integration.helpers import (
    assert_every_row_exactly_once,
    assert_no_orphan_uploads,
    assert_one_batch_per_shard_attempt,
)

REPO = Path(__file__).resolve().parents[2]
RUN_DATE = "2026-11-20"
PREFECT = [sys.executable, "-m", "prefect"]
ACTIVE = {"SCHEDULED", "PENDING", "RUNNING", "CANCELLING"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    port = _free_port()
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # the test triggers the nightly runs itself
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError("prefect server did not become healthy")
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _sample_job(tmp_path: Path, rows: int, shard_lines: int, max_attempts: int = 3) -> Path:
    pq.write_table(support_tickets(rows), tmp_path / "tickets.parquet")
    spec = yaml.safe_load((REPO / "examples" / "ticket-triage.yaml").read_text())
    spec["source"]["uri"] = str(tmp_path / "tickets.parquet")
    spec["output_uri"] = str(tmp_path / "output")
    spec["storage_root"] = str(tmp_path / "state")
    spec["limits"]["max_lines_per_shard"] = shard_lines
    spec["retry"] = {"max_attempts": max_attempts}
    path = tmp_path / "ticket-triage.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@contextlib.contextmanager
def deployed(env: dict[str, str], workers: int = 1) -> Iterator[Callable[..., Any]]:
    """Work pool, `prefect deploy --all`, the shipped automations and `workers` process workers;
    yields `trigger(deployment, wait=True, **parameters)`."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
        )

    created = cli("work-pool", "create", "nightbatch-local", "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stderr
    deployed_ = cli("--no-prompt", "deploy", "--all")
    assert deployed_.returncode == 0, deployed_.stdout[-3000:] + deployed_.stderr[-3000:]
    automations = cli("automation", "create", "--from-file", "automations.yaml")
    assert automations.returncode == 0, automations.stdout[-3000:] + automations.stderr[-3000:]
    procs = [
        subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", "nightbatch-local", "--limit", "4"],
            cwd="/",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip  (cwd "/": nothing depends on where the worker was started)
        for _ in range(workers)
    ]

    def trigger(name: str, wait: bool = True, **parameters: Any) -> Any:
        flow_run = run_deployment(name, parameters=parameters, timeout=240 if wait else 0)
        if wait:
            assert flow_run.state is not None and flow_run.state.is_completed(), (
                name,
                flow_run.state,
            )
        return flow_run

    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield trigger
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _flow_runs() -> list[Any]:
    from prefect.client.orchestration import get_client

    runs: list[Any] = []
    with get_client(sync_client=True) as client:
        while page := client.read_flow_runs(limit=200, offset=len(runs)):
            runs += page
    return runs


def _wait_for(flow_runs: list[Any], seconds: float = 240) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        for flow_run in flow_runs:
            while (
                state := client.read_flow_run(flow_run.id).state
            ) is None or not state.is_final():
                assert time.monotonic() < deadline, f"{flow_run.name} did not finish"
                time.sleep(0.5)
            assert state.is_completed(), (flow_run.name, state)


def _settle(deadline_seconds: float = 120) -> list[Any]:
    """Every flow run once none is still scheduled, pending or running."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        runs = _flow_runs()
        active = [r for r in runs if r.state and r.state.type.value in ACTIVE]
        if not active or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def test_racing_stage_runs_and_pollers_heal_and_bill_exactly_once(
    tmp_path: Path, emulator: Any, prefect_server: dict[str, str]
) -> None:
    rows = 120
    job_file = _sample_job(tmp_path, rows, shard_lines=20, max_attempts=4)
    job = JobSpec.from_yaml(job_file)
    marker = tmp_path / "collect-crashed"
    env = {
        **prefect_server,
        "OPENAI_BASE_URL": emulator.base_url,
        "OPENAI_API_KEY": "sk-test",
        "NIGHTBATCH_CHAIN_WAIT_SECONDS": "0",  # the poller drives every step in this test
        "NIGHTBATCH_STAGE_BACKOFF_SECONDS": "1",
        "NIGHTBATCH_CRASH_AT": "before-collect-record",  # a collect run dies before recording
        "NIGHTBATCH_CRASH_ONCE": str(marker),
    }
    emulator.configure(
        faults={
            "line_failure_rates": {"server_error": 0.05},
            "route_faults": [
                {
                    "route": "POST /batches",
                    "status": 503,
                    "times": 3,
                    "skip": 1,
                    "retry_after": 0.5,
                },
                {
                    "route": "GET /batches/{id}",
                    "status": 503,
                    "times": 2,
                    "skip": 3,
                    "retry_after": 0.2,
                },
            ],
        }
    )
    with deployed(env, workers=2) as trigger:
        trigger("prepare/ticket-triage", job=str(job_file), run_date=RUN_DATE)
        # three submitters at once: two deployment runs and a process outside the deployment
        submits = [
            trigger("submit/ticket-triage", wait=False, job=str(job_file), run_date=RUN_DATE)
            for _ in range(2)
        ]
        outside = subprocess.Popen(  # a submit outside any deployment and its concurrency limit
            [sys.executable, "-c", "import sys; from flows.stages import submit; "
             "submit(sys.argv[1], sys.argv[2], continue_run=False)", str(job_file), RUN_DATE],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert outside.wait(timeout=300) == 0, (
            outside.stderr.read()[-3000:] if outside.stderr else ""
        )
        _wait_for(submits)  # nothing polls before this: the collects are the poller's
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            trigger("poller/every-5-minutes", jobs=[str(job_file)])
            if load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).status == "loaded":
                break
            time.sleep(1)
        runs = _settle()

    manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
    assert manifest.status == "loaded"
    ids = [f"T-{i:06d}" for i in range(1, rows + 1)]
    assert_every_row_exactly_once(job, RUN_DATE, ids)
    stats = emulator.stats()
    assert_one_batch_per_shard_attempt(stats)
    assert_no_orphan_uploads(stats)
    assert stats["batches"]["created"] == len(manifest.shards)
    assert manifest.stray_batches == []
    record = pq.read_table(manifest.cost_record_uri).to_pylist()[0]
    billed = stats["usage"]["gpt-4o-mini"]
    assert record["billed_lines"] == billed["requests"]
    assert (record["input_tokens"], record["output_tokens"]) == (
        billed["input_tokens"],
        billed["output_tokens"],
    )

    assert marker.exists(), "no collect run reached the crash point"
    states = {r.state.type.value for r in runs if r.state}
    assert not states & ACTIVE, "a flow run was left running"
    collects = {r.idempotency_key: r.state.type.value for r in runs if r.idempotency_key and r.idempotency_key.startswith("collect:")}  # fmt: skip
    crashed = [k for k, s in collects.items() if s in ("CRASHED", "FAILED")]
    everything = sorted((r.name, r.idempotency_key, r.state.type.value) for r in runs if r.state)
    assert crashed, f"the killed collect run is not marked crashed: {everything}"
    for key in crashed:  # started again under the next attempt's key, and that one completed
        prefix, attempt = key.rsplit(":", 1)
        assert collects.get(f"{prefix}:{int(attempt) + 1}") == "COMPLETED", collects
    names = {r.name for r in runs}
    assert any(n.startswith("poller-") and n != "poller" for n in names)
    assert any(n.startswith(f"collect-ticket-triage-{RUN_DATE}-a") for n in names), names


def test_a_three_attempt_run_is_loaded_within_two_poll_cycles(
    tmp_path: Path, emulator: Any, prefect_server: dict[str, str]
) -> None:
    from prefect.artifacts import Artifact

    rows = 60
    job_file = _sample_job(tmp_path, rows, shard_lines=25)
    job = JobSpec.from_yaml(job_file)
    env = {**prefect_server, "OPENAI_BASE_URL": emulator.base_url, "OPENAI_API_KEY": "sk-test"}
    emulator.configure(  # two rows fail twice: attempts 1, 2 and 3
        faults={
            "forced_line_failures": {
                "r-T-000005": {"kind": "server_error", "times": 2},
                "r-T-000044": {"kind": "server_error", "times": 2},
            }
        }
    )
    with deployed(env) as trigger:
        trigger("prepare/ticket-triage", job=str(job_file), run_date=RUN_DATE)
        polls = 0
        for _ in range(4):
            trigger("poller/every-5-minutes", jobs=[str(job_file)])  # a "5-minute" cycle
            polls += 1
            started = time.monotonic()
            while time.monotonic() - started < 90:  # the stage run it started goes on
                if load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).status == "loaded":
                    break
                time.sleep(1)
            if load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).status == "loaded":
                break
        runs = _settle()
        manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
        assert manifest.status == "loaded" and manifest.current_attempt == 3
        assert polls <= 2
        assert_every_row_exactly_once(job, RUN_DATE, [f"T-{i:06d}" for i in range(1, rows + 1)])
        assert_one_batch_per_shard_attempt(emulator.stats())
        assert not {r.state.type.value for r in runs if r.state} & ACTIVE
        summary = Artifact.get(f"run-ticket-triage-{RUN_DATE}")
        assert summary is not None and "actual cost" in str(summary.data)
        assert Artifact.get("progress-ticket-triage") is not None
        assert Artifact.get("cost-ticket-triage") is not None


def test_an_over_budget_run_waits_for_approval_without_a_process_and_is_asked_once(
    tmp_path: Path, emulator: Any, prefect_server: dict[str, str]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    job_file = _sample_job(tmp_path, 40, shard_lines=20)
    spec = yaml.safe_load(job_file.read_text())
    spec["limits"] |= {"max_cost_usd": 0.000001, "over_budget": "wait_for_approval"}
    job_file.write_text(yaml.safe_dump(spec))
    job = JobSpec.from_yaml(job_file)
    env = {**prefect_server, "OPENAI_BASE_URL": emulator.base_url, "OPENAI_API_KEY": "sk-test"}
    with deployed(env) as trigger:
        trigger("prepare/ticket-triage", job=str(job_file), run_date=RUN_DATE)
        asking = trigger("submit/ticket-triage", wait=False, job=str(job_file), run_date=RUN_DATE)
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while (
                state := client.read_flow_run(asking.id).state
            ) is None or state.name != "Suspended":
                assert time.monotonic() < deadline, f"the submit run did not suspend: {state}"
                time.sleep(0.5)
        manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
        assert manifest.approval is not None and manifest.approval.requested_by == str(asking.id)
        for _ in range(2):  # polls while the answer is awaited start nothing
            trigger("poller/every-5-minutes", jobs=[str(job_file)])
        submits = [r for r in _flow_runs() if r.name.startswith("submit-")]
        assert [r.id for r in submits] == [asking.id]
        assert emulator.stats()["batches"]["created"] == 0

        resume_flow_run(asking.id, run_input={"approve": True, "approved_by": "alice"})
        deadline = time.monotonic() + 180
        while load_manifest(ObjectStore(), layout_for(job, RUN_DATE)).status != "loaded":
            if time.monotonic() > deadline:
                from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

                with get_client(sync_client=True) as client:
                    logs = client.read_logs(
                        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[asking.id]))
                    )
                    state = client.read_flow_run(asking.id).state
                raise AssertionError(
                    f"not loaded: {state}\n" + "\n".join(line.message[:800] for line in logs)
                )
            trigger("poller/every-5-minutes", jobs=[str(job_file)])
            time.sleep(1)
        runs = _settle()
    manifest = load_manifest(ObjectStore(), layout_for(job, RUN_DATE))
    assert manifest.budget_approved_by == "alice" and manifest.approval.decision == "approved"  # type: ignore[union-attr]
    assert not {r.state.type.value for r in runs if r.state} & ACTIVE
    assert_one_batch_per_shard_attempt(emulator.stats())
