"""Building the clients a flow needs from settings, and resolving flow parameters."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

import openai

from schemas.job import JobSpec
from schemas.settings import Settings
from tasks.batch_api import BatchApi
from tasks.errors import TerminalError
from tasks.storage import ObjectStore


def resolve_job(job: JobSpec | str) -> JobSpec:
    """A job given inline (a dict validated by Prefect) or as the path of a YAML file."""
    return job if isinstance(job, JobSpec) else JobSpec.from_yaml(job)


def resolve_run_date(run_date: str | None) -> str:
    """The run's logical date: given, else the scheduled start date of this flow run, else today (UTC)."""
    if run_date:
        datetime.strptime(run_date, "%Y-%m-%d")
        return run_date
    try:
        from prefect.runtime import flow_run

        scheduled = flow_run.scheduled_start_time
        if scheduled is not None:
            return scheduled.strftime("%Y-%m-%d")
    except Exception:  # noqa: BLE001 - outside a flow run
        pass
    return datetime.now(UTC).strftime("%Y-%m-%d")


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
    )


def build_batch_api(settings: Settings) -> BatchApi:
    if settings.openai_api_key is None:
        raise TerminalError(
            "OPENAI_API_KEY is not set. Set it to use OpenAI, or run against the bundled emulator "
            "(`nightbatch run JOB.yaml --emulator`, or OPENAI_BASE_URL pointing at `nightbatch emulator`)."
        )
    factory = functools.partial(openai_client, settings)
    return BatchApi(factory(), client_factory=factory)
