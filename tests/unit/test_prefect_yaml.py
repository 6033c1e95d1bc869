"""prefect.yaml validated offline with the models `prefect deploy` itself uses (one bad entry makes
prefect skip the whole file, and typos in deployment keys are silently ignored)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import validate as validate_params

from schemas.job import JobSpec

ROOT = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS: list[dict[str, Any]] = RAW["deployments"]
IDS = [f"{d['entrypoint'].split(':')[-1]}/{d['name']}" for d in DEPLOYMENTS]


def test_the_file_validates() -> None:
    PrefectYamlModel.model_validate(RAW)


def test_deployment_names_are_unique_per_flow() -> None:
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=IDS)
def test_only_known_keys(dep: dict[str, Any]) -> None:
    assert not set(dep) - set(DeploymentConfig.model_fields)


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=IDS)
def test_schedules_build(dep: dict[str, Any]) -> None:
    for schedule in dep.get("schedules") or []:
        _schedule_config_to_deployment_schedule(copy.deepcopy(schedule))


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=IDS)
def test_entrypoint_imports_and_parameters_validate(
    dep: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(dep["entrypoint"])
    schema = parameter_schema(flow).model_dump_for_openapi()
    params = dict(dep.get("parameters") or {})
    validate_params(params, schema, raise_on_error=True)
    for schedule in dep.get("schedules") or []:
        validate_params(
            {**params, **(schedule.get("parameters") or {})}, schema, raise_on_error=True
        )
    jobs = params.get("jobs") or [params["job"]]
    for job in jobs:  # the job files exist and are valid specs
        assert JobSpec.from_yaml(ROOT / job).name


def test_every_stage_deployment_exists_for_every_job_the_poller_advances() -> None:
    names = {(d["entrypoint"].split(":")[-1], d["name"]) for d in DEPLOYMENTS}
    poller = next(d for d in DEPLOYMENTS if d["entrypoint"].endswith(":poller"))
    for job_path in poller["parameters"]["jobs"]:
        job = JobSpec.from_yaml(ROOT / job_path).name
        for fn in ("prepare", "submit", "wait", "collect", "retry_failures", "load", "pipeline"):
            assert (fn, job) in names, f"no {fn} deployment for {job}"
    assert poller["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=IDS)
def test_every_deployment_and_parameter_is_described_for_the_ui(
    dep: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert dep.get("description"), f"{dep['entrypoint']} has no description"
    schema = parameter_schema(load_flow_from_entrypoint(dep["entrypoint"])).model_dump_for_openapi()
    undescribed = [n for n, p in schema["properties"].items() if not p.get("description")]
    assert undescribed == []


def test_no_pull_step_holds_a_deploy_time_path() -> None:
    pulls = [RAW.get("pull") or [], *[d.get("pull") or [] for d in DEPLOYMENTS]]
    text = yaml.safe_dump(pulls)
    assert "{{" not in text and "set_working_directory" not in text
    assert RAW["pull"] == [{"flows.deploy_steps.enter_project": {}}]


def test_the_pull_step_finds_the_project_where_the_flow_runs(tmp_path: Path) -> None:
    from flows.deploy_steps import project_directory

    assert project_directory({"NIGHTBATCH_HOME": str(tmp_path)}) == tmp_path
    assert project_directory({}) == ROOT  # an editable install: the checkout it came from


def test_the_shipped_automations_validate_as_prefect_reads_them() -> None:
    from prefect.events.schemas.automations import AutomationCore

    raw = yaml.safe_load((ROOT / "automations.yaml").read_text())["automations"]
    automations = [AutomationCore.model_validate(a) for a in raw]
    zombie = automations[0]
    assert zombie.actions[0].type == "change-flow-run-state"
    assert "prefect.flow-run.heartbeat" in zombie.trigger.after  # type: ignore[union-attr]
    assert zombie.trigger.expect  # type: ignore[union-attr]  (an empty expect fires on every event)
    assert all(a.trigger.expect for a in automations)  # type: ignore[union-attr]
    heartbeat = RAW["definitions"]["work_pools"]["local"]["job_variables"]["env"]
    assert (
        int(heartbeat["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) * 3
        <= zombie.trigger.within.total_seconds()
    )  # type: ignore[union-attr]
