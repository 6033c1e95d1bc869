"""Bad input stops prepare with a message naming the problem and the fix, before anything is sent."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from schemas.job import JobSpec, SourceSpec
from tasks.errors import BadInputError
from tasks.layout import RunLayout
from tasks.prepare import PrepareResult, write_shards
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


def prepare(job: JobSpec) -> PrepareResult:
    layout = RunLayout(job.storage_root, job.name, "2026-11-24")
    return write_shards(job, ObjectStore(), layout)


def request_texts(result: PrepareResult) -> dict[str, str]:
    """custom_id -> the user message of every request prepared."""
    texts = {}
    for shard in result.shards:
        for line in Path(shard.request_uri).read_text().splitlines():
            request = json.loads(line)
            texts[request["custom_id"]] = request["body"]["messages"][-1]["content"]
    return texts


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


def test_a_row_too_large_for_any_shard_is_refused_and_the_rest_prepared(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1, 2], "text": ["short", "x" * 5000]}))
    job = make_job(tmp_path)
    job.limits.max_bytes_per_shard = 2048
    result = prepare(job)
    assert result.refused == 1 and [s.lines for s in result.shards] == [1]
    assert result.refused_uri is not None
    refused = pq.read_table(result.refused_uri).to_pylist()
    assert [(r["custom_id"], r["code"], r["attempt"]) for r in refused] == [("r-2", "too_large", 0)]
    assert "max_bytes_per_shard 2,048" in refused[0]["message"]


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


def test_a_binary_template_column_is_refused_with_a_fix(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1], "text": pa.array([b"\x89PNG"], pa.binary())}))
    with pytest.raises(BadInputError, match=r"'text' is a binary column.*add a text column"):
        prepare(make_job(tmp_path))


def test_list_and_struct_columns_are_sent_as_json_not_python_repr(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": [1, 2],
            "text": pa.array([["red", "blue"], None], pa.list_(pa.string())),
            "dims": pa.array([{"w": 3, "unit": "cm"}, {"w": None, "unit": "in"}]),
        }
    )
    write_source(tmp_path, table)
    texts = request_texts(prepare(make_job(tmp_path, template="Say {text} {dims}")))
    assert texts == {
        "r-1": 'Say ["red","blue"] {"w":3,"unit":"cm"}',
        "r-2": 'Say  {"w":null,"unit":"in"}',
    }


def test_a_template_column_missing_from_some_files_of_the_dataset_is_refused(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["a"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": [2], "other": ["b"]}), folder / "part-1.parquet")
    job = make_job(tmp_path)
    job.source.uri = str(folder)
    with pytest.raises(
        BadInputError, match=r"\['text'\] are missing from 1 of the 2 files.*part-1"
    ):
        prepare(job)


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (("n", ">", "5"), r"'n' holds int64 values, but '5' is str.*as a number"),
        (("tier", "==", 5), r"'tier' holds string values, but 5 is int.*text, in quotes"),
        (("n", "in", ["1", 2]), r"'n' holds int64 values, but '1' is str"),
        (("day", ">=", "soon"), r"'day' holds date32\[day\] values.*an ISO date"),
    ],
)
def test_a_filter_value_of_the_wrong_type_is_named_with_its_fix(
    tmp_path: Path, condition: tuple[str, str, object], message: str
) -> None:
    write_source(tmp_path, _filterable())
    job = make_job(tmp_path)
    job.source.filter = [condition]  # type: ignore[list-item]
    with pytest.raises(BadInputError, match=message):
        prepare(job)


def _filterable() -> pa.Table:
    return pa.table(
        {
            "id": [1, 2, 3, 4],
            "text": ["a", "b", "c", "d"],
            "n": [1, 5, 10, None],
            "tier": ["pro", None, "free", "pro"],
            "day": pa.array([date(2026, 1, d) for d in (1, 2, 3, 4)], pa.date32()),
        }
    )


@pytest.mark.parametrize(
    ("conditions", "ids"),
    [
        ([("tier", "is_null")], ["r-2"]),
        ([("tier", "not_null"), ("n", ">=", 5)], ["r-3"]),
        ([("n", "is_null")], ["r-4"]),
        ([("day", ">=", "2026-01-03")], ["r-3", "r-4"]),
        ([("day", "<", date(2026, 1, 2))], ["r-1"]),
        ([("tier", "not in", ["free"])], ["r-1", "r-4"]),  # null matches no comparison
        ([("tier", "!=", "free")], ["r-1", "r-4"]),
    ],
)
def test_filters_select_the_rows_they_say(
    tmp_path: Path, conditions: list[tuple[object, ...]], ids: list[str]
) -> None:
    write_source(tmp_path, _filterable())
    job = make_job(tmp_path)
    job.source.filter = conditions  # type: ignore[assignment]
    assert sorted(request_texts(prepare(job))) == ids


def test_null_ops_take_no_value_and_comparisons_with_null_are_refused() -> None:
    base = {"uri": "x", "id_column": "id"}
    with pytest.raises(ValidationError, match=r"write \[column, is_null\], no value"):
        SourceSpec.model_validate({**base, "filter": [["tier", "is_null", None]]})
    with pytest.raises(ValidationError, match=r"use \[tier, is_null\] or \[tier, not_null\]"):
        SourceSpec.model_validate({**base, "filter": [["tier", "==", None]]})
    with pytest.raises(ValidationError, match=r"unknown op 'like'"):
        SourceSpec.model_validate({**base, "filter": [["tier", "like", "p%"]]})


def test_a_csv_file_named_parquet_is_named_as_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "src.parquet").write_text("id,text\n1,hello\n")
    with pytest.raises(BadInputError, match=r"is not Parquet.*convert it"):
        prepare(make_job(tmp_path))


@pytest.mark.parametrize("template", ["Say {text", "Say text}", "Say {text:{x}{"])
def test_unbalanced_template_braces_are_refused_by_the_spec(tmp_path: Path, template: str) -> None:
    with pytest.raises(ValidationError, match=r"unbalanced brace|not a plain column name"):
        make_job(tmp_path, template=template)


def test_an_unknown_model_price_stops_prepare_before_a_shard_is_written(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1], "text": ["a"]}))
    job = make_job(tmp_path, model="gpt-9-imaginary")
    with pytest.raises(BadInputError, match=r"no price for model 'gpt-9-imaginary'"):
        prepare(job)
    assert not (tmp_path / "state").exists()


def test_literal_json_braces_in_a_template_name_the_escape(tmp_path: Path) -> None:
    write_source(tmp_path, pa.table({"id": [1], "text": ["a"]}))
    with pytest.raises(
        BadInputError, match=r"For a literal brace in a template, write \{\{ or \}\}"
    ):
        prepare(make_job(tmp_path, template='JSON: {"a": {text}}'))
