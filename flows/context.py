"""Building the clients a flow needs from settings, and resolving flow parameters."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

import openai

from schemas.job import JobSpec
from schemas.rundate import RunDateError, parse_run_date, run_date_at
from schemas.settings import Settings
from tasks.batch_api import SDK_RETRIES, BatchApi
from tasks.errors import BadInputError, TerminalError
from tasks.preflight import read_job
from tasks.storage import ObjectStore


def resolve_job(job: JobSpec | str) -> JobSpec:
    """A job given inline (a dict validated by Prefect) or as the path of a YAML file."""
    return job if isinstance(job, JobSpec) else read_job(job)


def resolve_run_date(run_date: str | None, timezone: str | None = None) -> str:
    """The run's logical date: given (strictly YYYY-MM-DD), else the date of this flow run's
    scheduled start in its schedule's timezone (else `timezone`, else NIGHTBATCH_RUN_DATE_TIMEZONE,
    default UTC), else today there."""
    try:
        if run_date:
            return parse_run_date(run_date)
        fallback = timezone or Settings.from_env().run_date_timezone
        scheduled, schedule_timezone = _scheduled_start()
        return run_date_at(scheduled or datetime.now(UTC), schedule_timezone or fallback)
    except RunDateError as exc:
        raise BadInputError(str(exc)) from None


def _scheduled_start() -> tuple[datetime | None, str | None]:
    """This flow run's expected start and, for a deployment run, its schedule's timezone."""
    from prefect.runtime import deployment, flow_run

    if not flow_run.id:
        return None, None
    scheduled = flow_run.scheduled_start_time
    if not deployment.id:
        return scheduled, None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        schedules = client.read_deployment(deployment.id).schedules or []
    zones = [getattr(s.schedule, "timezone", None) for s in schedules]
    return scheduled, next((z for z in zones if z), None)


def build_store(settings: Settings) -> ObjectStore:
    return ObjectStore(storage_options=dict(settings.storage_options))


def openai_client(settings: Settings) -> openai.OpenAI:
    assert settings.openai_api_key is not None
    return openai.OpenAI(
        api_key=settings.openai_api_key.get_secret_value(),
        base_url=settings.openai_base_url,
        organization=settings.openai_organization,
        project=settings.openai_project,
        timeout=openai.Timeout(600.0, connect=10.0),
        max_retries=SDK_RETRIES,
    )


def build_batch_api(settings: Settings) -> BatchApi:
    if settings.openai_api_key is None:
        raise TerminalError(
            "OPENAI_API_KEY is not set. Set it to use OpenAI, or run against the bundled emulator "
            "(`nightbatch run JOB.yaml --emulator`, or OPENAI_BASE_URL pointing at `nightbatch emulator`)."
        )
    factory = functools.partial(openai_client, settings)
    return BatchApi(factory(), client_factory=factory)
