"""Bad input stops prepare with a message naming the problem and the fix, before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from schemas.job import JobSpec
from tasks.errors import BadInputError
from tasks.layout import RunLayout
from tasks.prepare import write_shards
from tasks.storage import ObjectStore


def make_job(tmp_path: Path, **request: object) -> JobSpec:
    spec = {
        "name": "bad-input",
        "source": {"uri": str(tmp_path / "src.parquet"), "id_column": "id"},
        "request": {"model": "gpt-4o-mini", "template": "Say {text}", **request},
        "output_uri": str(tmp_path / "out"),
        "storage_root": str(tmp_path / "state"),
    }
    return JobSpec.model_validate(spec)


def prepare(job: JobSpec) -> None:
    layout = RunLayout(job.storage_root, job.name, "2026-11-24")
    write_shards(job, ObjectStore(), layout)


def write_source(tmp_path: Path, table: pa.Table) -> None:
    pq.write_table(table, tmp_path / "src.parquet")


def test_missing_source_names_the_uri(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    with pytest.raises(BadInputError, match=r"source not found: .*src\.parquet.*source\.uri"):
        prepare(job)


def test_misspelt_id_column_suggests_the_right_one(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"ids": [1, 2], "text": ["a", "b"]}))
    job = make_job(tmp_path)
    with pytest.raises(
        BadInputError, match=r"source\.id_column 'id' is not a column.*Did you mean 'ids'"
    ):
        prepare(job)


def test_template_field_that_is_not_a_column(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1, 2], "txt": ["a", "b"]}))
    job = make_job(tmp_path)
    with pytest.raises(
        BadInputError, match=r"template field 'text' is not a column.*Did you mean 'txt'"
    ):
        prepare(job)


def test_misspelt_output_column(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1], "text": ["a"]}))
    job = make_job(tmp_path)
    job.source.columns = ["id", "txet"]
    with pytest.raises(BadInputError, match=r"source\.columns entry 'txet'.*Did you mean 'text'"):
        prepare(job)


def test_null_ids(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1, None, 3], "text": ["a", "b", "c"]}))
    with pytest.raises(BadInputError, match=r"'id' has 1 null value.*filter those rows out"):
        prepare(make_job(tmp_path))


def test_duplicate_ids_are_named(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": ["x", "y", "x", "z"], "text": ["a", "b", "c", "d"]}))
    with pytest.raises(BadInputError, match=r"is not unique: 1 value\(s\).*'x'.*deduplicate"):
        prepare(make_job(tmp_path))


def test_unsupported_endpoint_is_rejected_by_the_spec(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"unsupported endpoint '/v1/images/generations'"):
        make_job(tmp_path, endpoint="/v1/images/generations")


def test_streaming_is_rejected_by_the_spec(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"params\.stream must not be set"):
        make_job(tmp_path, params={"stream": True})


def test_a_row_too_large_for_any_shard(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1, 2], "text": ["short", "x" * 5000]}))
    job = make_job(tmp_path)
    job.limits.max_bytes_per_shard = 2048
    with pytest.raises(BadInputError, match=r"row 'r-2' is [\d,]+ bytes.*Shorten that row"):
        prepare(job)


def test_bad_filter_column(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1], "text": ["a"], "tier": ["pro"]}))
    job = make_job(tmp_path)
    job.source.filter = [("teir", "==", "pro")]
    with pytest.raises(BadInputError, match=r"source\.filter column 'teir'.*Did you mean 'tier'"):
        prepare(job)


def test_nothing_is_written_to_the_run_on_bad_input(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": ["x", "x"], "text": ["a", "b"]}))
    with pytest.raises(BadInputError):
        prepare(make_job(tmp_path))
    assert not (tmp_path / "state" / "runs" / "bad-input" / "2026-11-24" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("source", "output"),
    [
        ("/data/tickets", "/data/tickets"),
        ("/data/tickets/", "/data/tickets/enriched"),
        ("s3://b/tickets", "s3://b/tickets/out"),
        ("/data/out/tickets", "/data/out"),
    ],
)
def test_output_inside_the_source_is_refused(source: str, output: str) -> None:
    from pydantic import ValidationError

    from schemas.job import JobSpec

    spec = {
        "name": "j", "source": {"uri": source, "id_column": "id"},
        "request": {"model": "gpt-4o-mini", "template": "{t}"},
        "output_uri": output, "storage_root": "/state",
    }  # fmt: skip
    with pytest.raises(ValidationError, match="overlap"):
        JobSpec.model_validate(spec)
    JobSpec.model_validate(spec | {"output_uri": "/elsewhere/enriched"})


def test_output_schema_properties_may_not_take_lineage_names() -> None:
    from pydantic import ValidationError

    from schemas.job import RequestSpec

    schema = {"type": "object", "properties": {"nb_status": {"type": "string"}}}
    with pytest.raises(ValidationError, match=r"\['nb_status'\] collide with nightbatch's lineage"):
        RequestSpec(model="gpt-4o-mini", template="{t}", output_schema=schema)


def test_a_missing_api_key_stops_the_cli_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    pq.write_table(pa.table({"id": ["a"], "t": ["x"]}), tmp_path / "s.parquet")
    (tmp_path / "job.yaml").write_text(
        "name: j\nsource: {uri: s.parquet, id_column: id}\n"
        "request: {model: gpt-4o-mini, template: '{t}'}\noutput_uri: out\nstorage_root: state\n"
    )
    assert main(["run", str(tmp_path / "job.yaml"), "--run-date", "2026-12-07"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OPENAI_API_KEY is not set" in err and "--emulator" in err
    assert not (tmp_path / "state").exists() and not (tmp_path / "out").exists()
