"""Runtime settings, read from the environment only when a flow or the CLI asks (never at import)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, SecretStr

from schemas.lineage import api_identity


class Settings(BaseModel):
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_organization: str | None = None
    openai_project: str | None = None
    api_identity: str = "api.openai.com"  # schemas.lineage: which API produces this run's results
    poll_interval_seconds: float = 60.0
    max_wait_seconds: float = 26 * 3600.0
    expiry_grace_seconds: float = 3600.0
    submit_lease_seconds: float = 900.0  # a shard's submit lease; renewed before every create
    chain_wait_seconds: float = 60.0  # how long a stage run waits for batches before leaving them
    stage_timeout_seconds: float = 3600.0  # a stage run still running after this is stuck
    max_stage_attempts: int = 5  # the poller starts a failed stage again at most this often
    stage_backoff_seconds: float = 60.0  # before starting a failed stage again (doubles each time)
    run_date_timezone: str = "UTC"  # the run date of a run given none and started by no schedule
    storage_options: dict[str, str] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        key = env.get("OPENAI_API_KEY")
        base_url = env.get("OPENAI_BASE_URL") or None
        return cls(
            api_identity=env.get("NIGHTBATCH_API_IDENTITY") or api_identity(base_url),
            openai_api_key=SecretStr(key) if key else None,
            openai_base_url=base_url,
            openai_organization=env.get("OPENAI_ORG_ID") or None,
            openai_project=env.get("OPENAI_PROJECT_ID") or None,
            poll_interval_seconds=float(env.get("NIGHTBATCH_POLL_INTERVAL_SECONDS", 60)),
            max_wait_seconds=float(env.get("NIGHTBATCH_MAX_WAIT_SECONDS", 26 * 3600)),
            expiry_grace_seconds=float(env.get("NIGHTBATCH_EXPIRY_GRACE_SECONDS", 3600)),
            submit_lease_seconds=float(env.get("NIGHTBATCH_SUBMIT_LEASE_SECONDS", 900)),
            chain_wait_seconds=float(env.get("NIGHTBATCH_CHAIN_WAIT_SECONDS", 60)),
            stage_timeout_seconds=float(env.get("NIGHTBATCH_STAGE_TIMEOUT_SECONDS", 3600)),
            max_stage_attempts=int(env.get("NIGHTBATCH_MAX_STAGE_ATTEMPTS", 5)),
            stage_backoff_seconds=float(env.get("NIGHTBATCH_STAGE_BACKOFF_SECONDS", 60)),
            run_date_timezone=env.get("NIGHTBATCH_RUN_DATE_TIMEZONE") or "UTC",
        )
