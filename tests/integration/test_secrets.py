"""The API key never appears in logs, manifests, run files, artifacts or error messages."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from prefect.artifacts import Artifact

from flows.stages import pipeline
from tasks.batch_api import redact
from tasks.samples import support_tickets
from tests.integration.helpers import chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
SECRET = "sk-test-secret-do-not-log"  # set by the emulator fixture


def test_the_key_is_nowhere_in_logs_run_files_or_artifacts(
    tmp_path: Path, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pq.write_table(support_tickets(20), tmp_path / "tickets.parquet")
    job = chat_job(tmp_path / "tickets.parquet", tmp_path, name="secret-job")
    emulator.configure(faults={"forced_line_failures": {"r-T-000001": "context_length_exceeded"}})
    with caplog.at_level(logging.DEBUG):
        result = pipeline(job, run_date="2026-11-24", poll_interval_seconds=0.1)
    assert result["status"] == "loaded"
    assert caplog.records and SECRET not in caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "emulator-state" not in p.parts]
    assert any(p.name == "manifest.json" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    for key in ("run-secret-job-2026-11-24", "cost-secret-job", "output-secret-job"):
        artifact = Artifact.get(key)
        assert artifact is not None and SECRET not in str(artifact.data)


def test_errors_from_the_api_are_redacted() -> None:
    message = f"Incorrect API key provided: {SECRET}. Or sk-...{SECRET[-4:]}"
    cleaned = redact(message, SECRET)
    assert SECRET not in cleaned and SECRET[-4:] not in cleaned
    assert redact("nothing to hide", None) == "nothing to hide"


def test_a_wrong_key_fails_with_a_message_that_does_not_echo_it(emulator: Any) -> None:
    import openai

    from tasks.batch_api import BatchApi
    from tasks.errors import BatchApiError

    emulator.configure(api_key="the-right-key")
    wrong = "sk-wrong-key-0123456789"
    api = BatchApi(openai.OpenAI(api_key=wrong, base_url=emulator.base_url, max_retries=0))
    with pytest.raises(BatchApiError) as raised:
        api.retrieve("batch_123")
    assert (
        "401" in str(raised.value)
        and wrong not in str(raised.value)
        and wrong[-4:] not in str(raised.value)
    )
    assert raised.value.__cause__ is None
