"""Bad input answered through the CLI before Prefect or the emulator start: one message on stderr
naming the problem and the fix, no traceback (unless --debug), exit 2, nothing written. And
`nightbatch plan`, which says what a run will do and cost without writing or sending anything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from schemas.job import JobSpec
from tasks import transitions as tr
from tasks.runs import layout_for, load_manifest, new_manifest, save_manifest
from tasks.storage import ObjectStore

RUN_DATE = "2026-11-24"
ROOT = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "cli",
        "source": {"uri": str(tmp_path / "src.parquet"), "id_column": "id"},
        "request": {"model": "gpt-4o-mini", "template": "Say {text}"},
        "output_uri": str(tmp_path / "out"),
        "storage_root": str(tmp_path / "state"),
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            spec[section][name] = value
        else:
            spec[section] = value
    return spec


def _job_file(tmp_path: Path, spec: dict[str, Any] | str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


def _source(tmp_path: Path, table: pa.Table | None = None) -> None:
    pq.write_table(
        table or pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]}), tmp_path / "src.parquet"
    )


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("nightbatch: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (None, r"job spec not found: '.*nope\.yaml'. Give the path of a YAML job spec"),
        ("name: x\nsource: [unclosed\n", r"is not valid YAML \(line 3, column 1\).*Fix the YAML"),
        ("- just\n- a list\n", r"must be a YAML mapping"),
        (
            {"request.max_tokens": 5},
            r"request\.max_tokens: not a setting.*go under request\.params",
        ),
        ({"request.template": "Say {txt}"}, r"template field 'txt' is not a column.*'text'"),
        ({"request.template": "Say {text"}, r"request: .*unbalanced brace"),
        ({"request.model": "gpt-9"}, r"no price for model 'gpt-9'.*prices:"),
        ({"output_uri": "SRC"}, r"output_uri .* overlap"),
        ({"source.filter": [["text", ">", 5]]}, r"'text' holds string values, but 5 is int"),
    ],
)
def test_bad_input_is_one_message_and_exit_2_with_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: Any, message: str
) -> None:
    import re

    _source(tmp_path)
    if spec is None:
        job = tmp_path / "nope.yaml"
    elif isinstance(spec, str):
        job = _job_file(tmp_path, spec)
    else:
        if spec.get("output_uri") == "SRC":
            spec = {"output_uri": str(tmp_path / "src.parquet")}
        job = _job_file(tmp_path, _spec(tmp_path, **spec))
    for command in (["plan", str(job)], ["run", str(job), "--emulator"]):
        err = _fails(command, capsys)
        assert re.search(message, err, re.S), err
    assert not (tmp_path / "state").exists() and not (tmp_path / "out").exists()


def test_a_csv_named_parquet_and_a_binary_template_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job_file(tmp_path, _spec(tmp_path))
    (tmp_path / "src.parquet").write_text("id,text\n1,hello\n")
    assert "is not Parquet" in _fails(["plan", str(job)], capsys)
    _source(tmp_path, pa.table({"id": [1], "text": pa.array([b"\x00"], pa.binary())}))
    assert "'text' is a binary column" in _fails(["run", str(job), "--emulator"], capsys)


def test_an_abandoned_run_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _source(tmp_path)
    spec = _spec(tmp_path)
    job = JobSpec.model_validate(spec)
    manifest = new_manifest(job, RUN_DATE, "2026-11-24T01:00:00+00:00")
    save_manifest(ObjectStore(), tr.mark_abandoned(manifest, "2026-11-24T02:00:00+00:00", "gone"))
    err = _fails(
        ["run", str(_job_file(tmp_path, spec)), "--run-date", RUN_DATE, "--emulator"], capsys
    )
    assert "was abandoned" in err and "another --run-date" in err


def test_debug_shows_the_traceback_as_well(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--debug", "plan", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "nightbatch: job spec not found" in err


def test_the_installed_command_answers_a_typo_in_one_line(tmp_path: Path) -> None:
    _source(tmp_path)
    job = _job_file(tmp_path, _spec(tmp_path, **{"request.template": "Say {txt}"}))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(job), "--emulator"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Did you mean 'text'" in done.stderr
    assert "Starting temporary server" not in done.stderr + done.stdout


# ---- wrong S3 credentials -------------------------------------------------------------------------


@pytest.fixture
def s3_with_auth() -> Iterator[str]:
    """A moto S3 server that checks credentials (it knows none, so every key is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # clients of other servers, from earlier tests
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # its clients point at this server
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def wrong_credentials(s3_with_auth: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS variables with a key the S3 server does not know."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_with_auth)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.usefixtures("wrong_credentials")
def test_wrong_s3_credentials_name_the_uri_and_the_aws_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(tmp_path, **{"source.uri": "s3://nb-data/tickets.parquet"})
    spec.update(output_uri="s3://nb-data/out", storage_root="s3://nb-data/state")
    err = _fails(["plan", str(_job_file(tmp_path, spec))], capsys)
    assert "cannot access 's3://nb-data/tickets.parquet': access denied" in err
    assert "AWS_ACCESS_KEY_ID" in err and "AWS_ENDPOINT_URL" in err
    assert "wrong-secret" not in err


# ---- plan -----------------------------------------------------------------------------------------


def _embeddings(tmp_path: Path, root: str, source: str) -> dict[str, Any]:
    ids = [f"P-{i:02d}" for i in range(20)]
    texts = ["" if i in (3, 9) else f"product number {i}" for i in range(20)]
    pq.write_table(pa.table({"id": ids, "text": texts}), tmp_path / "src.parquet")
    return {
        "name": "plan-embed",
        "source": {"uri": source, "id_column": "id"},
        "request": {"endpoint": "/v1/embeddings", "model": "text-embedding-3-small",
                    "template": "{text}"},
        "output_uri": f"{root}/out",
        "storage_root": f"{root}/state",
        "limits": {"max_dead_letter_fraction": 0.5, "max_lines_per_shard": 10},
    }  # fmt: skip


def _plan(job: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert main(["plan", str(job), "--run-date", RUN_DATE, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_plan_says_what_the_run_then_does_and_writes_nothing(
    tmp_path: Path, storage: str, request: pytest.FixtureRequest, emulator: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from flows.stages import pipeline

    if storage == "s3":
        bucket = request.getfixturevalue("s3_env")
        root = f"s3://{bucket}"
        spec = _embeddings(tmp_path, root, f"{root}/src/products.parquet")
        ObjectStore().write_table(
            f"{root}/src/products.parquet", pq.read_table(tmp_path / "src.parquet")
        )
    else:
        spec = _embeddings(tmp_path, str(tmp_path), str(tmp_path / "src.parquet"))
    job_file = _job_file(tmp_path, spec)
    job = JobSpec.model_validate(spec)
    store = ObjectStore()

    plan = _plan(job_file, capsys)
    assert not store.exists(spec["storage_root"]) or not store.list_files(spec["storage_root"])
    assert plan["rows_selected"] == 20 and plan["cache_hits"] == 0
    assert plan["not_sent"] == {"empty_input": 2}
    assert plan["rows_to_send"] == 18 and plan["shards"] == 2
    assert plan["api"] == "api.openai.com" or plan["api"].startswith("127.0.0.1")

    pipeline(job, run_date=RUN_DATE, poll_interval_seconds=0.1)
    manifest = load_manifest(store, layout_for(job, RUN_DATE))
    assert manifest.estimate is not None
    assert plan["input_tokens"] == manifest.estimate.input_tokens
    assert plan["batch_usd"] == pytest.approx(manifest.estimate.batch_usd)
    assert plan["shards"] == len(manifest.shards) and manifest.rows_refused == 2
    billed = emulator.stats()["usage"]["text-embedding-3-small"]
    assert billed["requests"] == 18 and billed["input_tokens"] == plan["input_tokens"]

    # the next night: every row that succeeded comes from the cache, nothing left to send
    night2 = _plan(job_file, capsys, "--run-date", "2026-11-25")
    assert night2["cache_hits"] == 18 and night2["rows_to_send"] == 0 and night2["batch_usd"] == 0
    assert main(["plan", str(job_file), "--run-date", RUN_DATE]) == 0
    text = capsys.readouterr().out
    assert "not sent        : 2 (empty_input 2: they cannot succeed)" in text
    assert f"run {manifest.run_id} exists (loaded)" in text


@pytest.mark.parametrize("command", ["resume", "retry", "abandon"])
def test_commands_on_a_run_that_does_not_exist_say_so_before_prefect_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    _source(tmp_path)
    job = _job_file(tmp_path, _spec(tmp_path))
    err = _fails([command, str(job), "--run-date", RUN_DATE, "--emulator"], capsys)
    assert f"no run cli-{RUN_DATE} under" in err and f"nothing to {command}" in err
    assert "`nightbatch run" in err
    assert not (tmp_path / "state").exists()


def test_a_misspelt_model_gets_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _source(tmp_path)
    job = _job_file(tmp_path, _spec(tmp_path, **{"request.model": "gpt-4o-mimi"}))
    assert "Did you mean 'gpt-4o-mini'?" in _fails(["plan", str(job)], capsys)


@pytest.mark.usefixtures("wrong_credentials")
def test_operator_commands_with_wrong_s3_credentials_answer_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in ("status", "costs", "cache"):
        err = _fails([command, "s3://nb-data/state"], capsys)
        assert "cannot access 's3://nb-data/state': access denied" in err, command
