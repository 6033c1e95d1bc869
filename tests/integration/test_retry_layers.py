"""One retry layer per concern, counted in HTTP attempts at the emulator under injected 500s: the
SDK retries an idempotent call SDK_RETRIES times (the adapter adds none); an upload and a batch
create are sent once per try, and a create is looked up before it is tried again."""

from __future__ import annotations

import io
from typing import Any

import pytest

from flows.context import build_batch_api
from schemas.settings import Settings
from tasks.batch_api import SDK_RETRIES
from tasks.errors import BatchApiUnavailable


def _api(emulator: Any) -> Any:
    api = build_batch_api(Settings.from_env())
    api.client = api.client.with_options(max_retries=SDK_RETRIES)  # as built, without the waits:
    api.client._calculate_retry_timeout = lambda *args, **kwargs: 0.01  # type: ignore[method-assign]
    return api


def _calls(emulator: Any, route: str) -> int:
    return int(emulator.stats()["api_calls"].get(route, 0))


def test_an_idempotent_call_is_tried_sdk_retries_plus_one_times(emulator: Any) -> None:
    api = _api(emulator)
    emulator.configure(faults={"route_faults": [{"route": "GET /batches/{id}", "times": 100}]})
    with pytest.raises(BatchApiUnavailable, match="HTTP 500"):
        api.retrieve("batch_nope")
    assert _calls(emulator, "GET /batches/{id}") == SDK_RETRIES + 1  # was 3 x 5 = 15


def test_a_transient_failure_the_sdk_outlasts_is_not_seen(emulator: Any) -> None:
    api = _api(emulator)
    file_id = api.upload(io.BytesIO(b'{"custom_id": "r-1"}\n'), "x.jsonl")
    emulator.configure(faults={"route_faults": [{"route": "DELETE /files/{id}", "times": 2}]})
    api.delete_file(file_id)
    assert _calls(emulator, "DELETE /files/{id}") == 3
    assert emulator.stats()["files"]["items"][file_id]["deleted"]


@pytest.mark.parametrize("route", ["POST /files", "POST /batches"])
def test_uploads_and_creates_are_sent_once_per_try(emulator: Any, route: str) -> None:
    api = _api(emulator)
    file_id = api.upload(io.BytesIO(b'{"custom_id": "r-1"}\n'), "x.jsonl")
    before = _calls(emulator, route)
    emulator.configure(faults={"route_faults": [{"route": route, "times": 100}]})
    with pytest.raises(BatchApiUnavailable):
        if route == "POST /files":
            api.upload(io.BytesIO(b"{}\n"), "y.jsonl")
        else:
            api.create_batch(file_id, "/v1/chat/completions", {"nightbatch_run": "r"})
    assert _calls(emulator, route) - before == 1
