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
