"""prefect.yaml for real: a local `prefect server start` (SQLite), `prefect deploy --all`, a process
worker; the nightly deployments triggered for a sample job against the emulator, and the poller
carrying the run to loaded — observed through the Prefect API, with artifacts and no stage run twice."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
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

REPO = Path(__file__).resolve().parents[2]
RUN_DATE = "2026-11-20"
PREFECT = [sys.executable, "-m", "prefect"]


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
        "PWD": str(REPO),
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


def _sample_job(tmp_path: Path) -> Path:
    pq.write_table(support_tickets(60), tmp_path / "tickets.parquet")
    spec = yaml.safe_load((REPO / "examples" / "ticket-triage.yaml").read_text())
    spec["source"]["uri"] = str(tmp_path / "tickets.parquet")
    spec["output_uri"] = str(tmp_path / "output")
    spec["storage_root"] = str(tmp_path / "state")
    spec["limits"]["max_lines_per_shard"] = 25
    path = tmp_path / "ticket-triage.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_nightly_deployments_and_the_poller_carry_a_run_to_loaded(
    tmp_path: Path, emulator: Any, prefect_server: dict[str, str]
) -> None:
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**prefect_server, "OPENAI_BASE_URL": emulator.base_url, "OPENAI_API_KEY": "sk-test"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [*PREFECT, *args]
        return subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180
        )

    created = run("work-pool", "create", "nightbatch-local", "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stderr
    deployed = run("--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    worker = subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", "nightbatch-local", "--limit", "4"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    job_file = _sample_job(tmp_path)
    job = JobSpec.from_yaml(job_file)
    store = ObjectStore()
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):

            def trigger(name: str, **parameters: Any) -> Any:
                flow_run = run_deployment(name, parameters=parameters, timeout=180)
                assert flow_run.state is not None and flow_run.state.is_completed(), (
                    name,
                    flow_run.state,
                )
                return flow_run

            trigger("prepare/ticket-triage", job=str(job_file), run_date=RUN_DATE)
            trigger("submit/ticket-triage", job=str(job_file), run_date=RUN_DATE)
            for _ in range(20):
                trigger("poller/every-5-minutes", jobs=[str(job_file)])
                trigger(
                    "poller/every-5-minutes", jobs=[str(job_file)]
                )  # a repeated poll starts nothing new
                if load_manifest(store, layout_for(job, RUN_DATE)).status == "loaded":
                    break
                time.sleep(1)
            manifest = load_manifest(store, layout_for(job, RUN_DATE))
            assert manifest.status == "loaded"
            assert pq.read_table(manifest.output_file_uri).num_rows == 60

            with get_client(sync_client=True) as client:
                runs_by_deployment: Counter[str] = Counter()
                keys: Counter[str] = Counter()
                deployments = client.read_deployments(
                    deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=["ticket-triage"])
                    )
                )
                by_id = {d.id: d for d in deployments}
                for flow_run in client.read_flow_runs(limit=200):
                    if flow_run.deployment_id in by_id:
                        flow_name = client.read_flow(by_id[flow_run.deployment_id].flow_id).name
                        runs_by_deployment[flow_name] += 1
                        if flow_run.idempotency_key and flow_name in (
                            "collect",
                            "load",
                            "retry-failures",
                        ):
                            keys[flow_run.idempotency_key] += 1
                assert runs_by_deployment["load"] == 1
                assert runs_by_deployment["collect"] >= 1
                assert all(n == 1 for n in keys.values())
                assert runs_by_deployment["collect"] + runs_by_deployment["load"] == sum(
                    keys.values()
                )
                run_md = Artifact.get(f"run-ticket-triage-{RUN_DATE}", client=None)
                assert run_md is not None and "loaded" in str(run_md.data)
                assert Artifact.get("cost-ticket-triage") is not None
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
