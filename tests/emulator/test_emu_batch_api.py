"""Batches API surface: create-time 400s, retrieve/cancel 404s, listing, authentication, unknown URLs."""

from __future__ import annotations

import re

import openai
import pytest
from openai import OpenAI


@pytest.fixture
def input_file(client: OpenAI, kit) -> str:
    return kit.upload(client, [kit.chat_line("a")])


def _create(client: OpenAI, **overrides):
    params = {"endpoint": "/v1/chat/completions", "completion_window": "24h", **overrides}
    return client.batches.create(**params)


def _error(excinfo) -> dict:
    return excinfo.value.body


def test_create_returns_full_validating_object(client: OpenAI, input_file: str) -> None:
    batch = _create(client, input_file_id=input_file, metadata={"run_id": "r1", "shard": "0001"})
    assert re.fullmatch(r"batch_[0-9a-f]{32}", batch.id)
    assert batch.object == "batch"
    assert batch.status == "validating"
    assert batch.endpoint == "/v1/chat/completions"
    assert batch.completion_window == "24h"
    assert batch.input_file_id == input_file
    assert batch.expires_at == batch.created_at + 86400
    assert (batch.request_counts.total, batch.request_counts.completed) == (0, 0)
    assert batch.request_counts.failed == 0
    assert batch.metadata == {"run_id": "r1", "shard": "0001"}
    for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at"):
        assert getattr(batch, name) is None
    assert (batch.cancelling_at, batch.cancelled_at) == (None, None)
    assert (batch.errors, batch.output_file_id, batch.error_file_id, batch.model) == (
        None,
        None,
        None,
        None,
    )


def test_bad_endpoint(client: OpenAI, input_file: str) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        _create(client, input_file_id=input_file, endpoint="/v1/invalid/endpoint")
    error = _error(excinfo)
    assert (error["code"], error["param"], error["type"]) == (
        "invalid_value",
        "endpoint",
        "invalid_request_error",
    )
    assert error["message"].startswith("Invalid value: '/v1/invalid/endpoint'. Supported values")


@pytest.mark.parametrize("window", ["1h", "48h", ""])
def test_completion_window_must_be_24h(client: OpenAI, input_file: str, window: str) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        _create(client, input_file_id=input_file, completion_window=window)
    assert _error(excinfo)["param"] == "completion_window"
    assert _error(excinfo)["code"] == "invalid_value"


def test_missing_input_file_id(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.post("/batches", body={"endpoint": "/v1/embeddings"}, cast_to=object)
    assert _error(excinfo)["code"] == "missing_required_parameter"
    assert _error(excinfo)["param"] == "input_file_id"


def test_metadata_rules(client: OpenAI, input_file: str) -> None:
    ok = {f"k{i}": "v" * 512 for i in range(16)} | {"x" * 64: "v"}
    ok.pop("k0")
    assert _create(client, input_file_id=input_file, metadata=ok).metadata == ok

    cases = [
        ({f"k{i}": "v" for i in range(17)}, "metadata", "object_above_max_properties"),
        ({"x" * 65: "v"}, "metadata", "string_above_max_length"),
        ({"note": "v" * 513}, "metadata.note", "string_above_max_length"),
        ({"tags": ["a", "b"]}, "metadata.tags", "invalid_type"),
        ({"n": 3}, "metadata.n", "invalid_type"),
    ]
    for metadata, param, code in cases:
        with pytest.raises(openai.BadRequestError) as excinfo:
            _create(client, input_file_id=input_file, metadata=metadata)
        assert (_error(excinfo)["param"], _error(excinfo)["code"]) == (param, code)
    with pytest.raises(openai.BadRequestError) as excinfo:
        _create(client, input_file_id=input_file, metadata={"tags": ["a"]})
    assert _error(excinfo)["message"] == (
        "Invalid type for 'metadata.tags': expected a string, but got an array instead."
    )


def test_unknown_input_file_is_a_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        _create(client, input_file_id="file-doesnotexist")
    assert _error(excinfo)["param"] == "file_id"
    assert _error(excinfo)["message"].startswith("Cannot find file file-doesnotexist")


def test_input_file_must_have_batch_purpose(client: OpenAI) -> None:
    other = client.files.create(file=("x.jsonl", b"{}"), purpose="user_data").id
    with pytest.raises(openai.BadRequestError) as excinfo:
        _create(client, input_file_id=other)
    assert _error(excinfo)["param"] == "input_file_id"


def test_output_expires_after(kit, client: OpenAI) -> None:
    file_id = kit.upload(client, [kit.chat_line("a")])
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 3600},
    )
    done = kit.wait(client, batch.id)
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output"
    assert output.expires_at == output.created_at + 3600
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 10},
        )
    assert _error(excinfo)["param"] == "output_expires_after.seconds"


def test_unknown_batch_is_404_for_retrieve_and_cancel(client: OpenAI) -> None:
    for call in (client.batches.retrieve, client.batches.cancel):
        with pytest.raises(openai.NotFoundError) as excinfo:
            call("batch_nope")
        assert excinfo.value.status_code == 404
        assert _error(excinfo)["message"] == "No batch found with id 'batch_nope'."


def test_list_newest_first_with_cursor(client: OpenAI, input_file: str) -> None:
    ids = [_create(client, input_file_id=input_file).id for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [ids[4], ids[3]]
    assert page.has_more is True
    assert (page.first_id, page.last_id) == (ids[4], ids[3])  # type: ignore[attr-defined]

    second = client.batches.list(limit=2, after=ids[3])
    assert [b.id for b in second.data] == [ids[2], ids[1]]
    last = client.batches.list(limit=2, after=ids[1])
    assert [b.id for b in last.data] == [ids[0]]
    assert last.has_more is False

    # auto-pagination and the default page size of 20
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]
    assert [b.id for b in client.batches.list().data] == ids[::-1]


def test_list_limit_bounds(client: OpenAI) -> None:
    assert client.batches.list(limit=100).data == []
    for limit, code in ((0, "integer_below_min_value"), (101, "integer_above_max_value")):
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.batches.list(limit=limit)
        assert (_error(excinfo)["param"], _error(excinfo)["code"]) == ("limit", code)


def test_list_empty(client: OpenAI) -> None:
    page = client.batches.list()
    assert page.data == [] and page.has_more is False
    assert (page.first_id, page.last_id) == (None, None)  # type: ignore[attr-defined]


def test_missing_api_key_is_401(client: OpenAI) -> None:
    anonymous = client.with_options(default_headers={"Authorization": ""})
    with pytest.raises(openai.AuthenticationError) as excinfo:
        anonymous.batches.list()
    assert excinfo.value.status_code == 401
    error = _error(excinfo)
    assert error["message"].startswith("You didn't provide an API key.")
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)
    with pytest.raises(openai.AuthenticationError):
        anonymous.files.create(file=("x.jsonl", b"{}"), purpose="batch")


def test_configured_api_key_is_enforced(kit) -> None:
    server = kit.server(api_key="sk-right")
    assert kit.client(server, api_key="sk-right").batches.list().data == []
    with pytest.raises(openai.AuthenticationError) as excinfo:
        kit.client(server, api_key="sk-wrong-key").batches.list()
    assert _error(excinfo)["code"] == "invalid_api_key"


def test_unknown_route_is_openai_shaped_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.get("/nothing/here", cast_to=object)
    assert _error(excinfo)["message"] == "Invalid URL (GET /v1/nothing/here)"
