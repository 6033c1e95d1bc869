"""Files API: upload, retrieve, list, content, delete, and the Batch upload rules."""

from __future__ import annotations

import re

import openai
import pytest
from openai import OpenAI


def test_upload_retrieve_content_delete(client: OpenAI, kit) -> None:
    data = kit.jsonl([kit.chat_line("a"), kit.chat_line("b")])
    created = client.files.create(file=("shard-0001.jsonl", data), purpose="batch")

    assert re.fullmatch(r"file-[A-Za-z0-9]{22}", created.id)
    assert created.object == "file"
    assert created.purpose == "batch"
    assert created.status == "processed"
    assert created.bytes == len(data)
    assert created.filename == "shard-0001.jsonl"
    assert created.expires_at == created.created_at + 30 * 86400

    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.files.retrieve(created.id)
    assert excinfo.value.status_code == 404
    assert excinfo.value.body["message"] == f"No such File object: {created.id}"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created.id)


def test_upload_accepts_malformed_jsonl_content(client: OpenAI) -> None:
    created = client.files.create(file=("bad.jsonl", b"not json at all\n{"), purpose="batch")
    assert created.status == "processed"
    assert client.files.content(created.id).content == b"not json at all\n{"


def test_expires_after_sets_expiry(client: OpenAI) -> None:
    created = client.files.create(
        file=("x.jsonl", b"{}\n"),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7 * 86400},
    )
    assert created.expires_at == created.created_at + 7 * 86400
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.files.create(
            file=("x.jsonl", b"{}\n"),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 60},
        )
    assert excinfo.value.body["code"] == "integer_below_min_value"  # type: ignore[index]
    assert excinfo.value.body["param"] == "expires_after.seconds"  # type: ignore[index]


def test_batch_purpose_requires_jsonl_filename(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.files.create(file=("input.csv", b"a,b\n"), purpose="batch")
    assert excinfo.value.status_code == 400
    assert excinfo.value.body["message"] == "Invalid file format for Batch API. Must be .jsonl"  # type: ignore[index]
    assert excinfo.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    # other purposes take any file name
    assert (
        client.files.create(file=("notes.txt", b"hi"), purpose="user_data").purpose == "user_data"
    )


def test_batch_file_size_limit(kit) -> None:
    server = kit.server(max_batch_file_bytes=1000)
    client = kit.client(server)
    assert client.files.create(file=("ok.jsonl", b"x" * 1000), purpose="batch").bytes == 1000
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.files.create(file=("big.jsonl", b"x" * 1001), purpose="batch")
    assert excinfo.value.body["message"] == "File is too large."  # type: ignore[index]


def test_default_batch_file_limit_is_200_mb(emu) -> None:
    assert emu.config.max_batch_file_bytes == 200 * 1024 * 1024


def test_unknown_purpose_rejected(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.files.create(file=("x.jsonl", b"{}"), purpose="nonsense")  # type: ignore[arg-type]
    assert excinfo.value.body["code"] == "invalid_value"  # type: ignore[index]
    assert excinfo.value.body["param"] == "purpose"  # type: ignore[index]


def test_list_files_order_purpose_and_pagination(client: OpenAI) -> None:
    ids = [client.files.create(file=(f"f{i}.jsonl", b"{}"), purpose="batch").id for i in range(5)]
    other = client.files.create(file=("n.txt", b"x"), purpose="user_data").id

    newest_first = [f.id for f in client.files.list(purpose="batch")]
    assert newest_first == ids[::-1]
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == ids

    page = client.files.list(limit=2, order="asc")
    assert [f.id for f in page.data] == ids[:2]
    assert page.has_more is True
    # the SDK follows the `after` cursor through every page
    assert [f.id for f in client.files.list(limit=2, order="asc")] == [*ids, other]

    client.files.delete(ids[0])
    assert ids[0] not in [f.id for f in client.files.list()]


def test_missing_file_part(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.post(
            "/files",
            body={"purpose": "batch"},
            files=[("other", ("x.jsonl", b"{}"))],
            options={"headers": {"Content-Type": "multipart/form-data"}},
            cast_to=object,
        )
    assert excinfo.value.body["code"] == "missing_required_parameter"  # type: ignore[index]
    assert excinfo.value.body["param"] == "file"  # type: ignore[index]
