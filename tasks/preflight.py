"""Pre-flight: everything that can be checked about a job before Prefect, the emulator or any upload
starts — the spec file, the price of its model, its source against the spec (footers only), access to
its storage root, and the state of the run it would resume. Each problem is one BadInputError naming
it and the fix; the CLI prints it in one line and exits 2, in about as long as it takes to read a
Parquet footer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from schemas.job import JobSpec
from schemas.manifest import RunManifest
from tasks.errors import BadInputError
from tasks.refusals import row_limits
from tasks.runs import check_api, find_manifest, layout_for
from tasks.source import CheckedSource, checked_source
from tasks.storage import NoCredentialsError, ObjectStore, access_refused


def read_job(path: str | Path) -> JobSpec:
    """The job spec in the YAML file at `path`, or one BadInputError that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(
            f"job spec not found: {str(path)!r}. Give the path of a YAML job spec "
            "(see examples/ticket-triage.yaml)."
        )
    try:
        return JobSpec.from_yaml(path)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise BadInputError(
            f"{path} is not valid YAML{line}: {problem}. Fix the YAML syntax there."
        ) from None
    except ValidationError as exc:
        raise BadInputError(f"{path} is not a valid job spec:\n{describe(exc)}") from None
    except ValueError as exc:  # not a mapping
        raise BadInputError(str(exc)) from None


def describe(exc: ValidationError) -> str:
    """A pydantic error as one line per problem: where, and what (never the input values, which
    may hold prompts)."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"] if not isinstance(part, int)) or "spec"
        message = error["msg"].removeprefix("Value error, ").removeprefix(f"{where} ")
        if error["type"] == "extra_forbidden":
            message = "not a setting nightbatch knows (a typo?)"
            if where.startswith("request."):
                message += "; body parameters such as max_tokens go under request.params"
        lines.append(f"  - {where}: {message}")
    return "\n".join(dict.fromkeys(lines))


@dataclass
class PreflightResult:
    job: JobSpec
    run_date: str
    api: str  # the API identity the run is checked against (schemas.lineage)
    source: CheckedSource | None  # None: not checked
    existing: RunManifest | None  # the run this date already has, if any


def preflight(
    job: JobSpec, run_date: str, store: ObjectStore, api: str, source: bool = True
) -> PreflightResult:
    """Check `job` for `run_date` against the API identity `api` (schemas.lineage); without
    `source`, leave its source alone (to abandon a run, say). Reads only."""
    row_limits(job)  # the model has a price (and, where known, a context window)
    checked = checked_source(job, store) if source else None
    try:
        existing = find_manifest(store, layout_for(job, run_date))
    except (PermissionError, NoCredentialsError) as exc:
        raise access_refused(job.storage_root, exc) from None
    if existing is not None:
        if existing.status == "abandoned":
            raise BadInputError(
                f"run {existing.run_id} was abandoned ({'; '.join(existing.notes[-1:])}); "
                "nothing will be resumed. Run the job under another --run-date."
            )
        check_api(existing, api)
    return PreflightResult(job, run_date, api, checked, existing)
