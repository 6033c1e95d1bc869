"""Incremental runs: rows whose exact request succeeded before are served from the result cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flows.stages import pipeline
from tasks.runs import layout_for, load_manifest
from tasks.samples import support_tickets
from tasks.storage import ObjectStore
from tests.integration.helpers import chat_job

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROWS = 200
RESULT = ["ticket_id", "subject", "category"]


def run(job: Any, date: str) -> dict[str, Any]:
    return pipeline(job, run_date=date, poll_interval_seconds=0.1)


def sent_lines(emulator: Any) -> int:
    return sum(b["request_counts"]["total"] for b in emulator.stats()["batches"]["items"])


def rows_of(result: dict[str, Any]) -> pa.Table:
    return pq.read_table(result["output"]).sort_by("ticket_id")


def test_a_second_run_on_the_same_data_sends_nothing_and_gives_the_same_output(
    tmp_path: Path, emulator: Any
) -> None:
    pq.write_table(support_tickets(ROWS), tmp_path / "tickets.parquet")
    job = chat_job(tmp_path / "tickets.parquet", tmp_path, limits={"max_lines_per_shard": 100})
    first = run(job, "2026-11-23")
    assert sent_lines(emulator) == ROWS

    second = run(job, "2026-11-24")

    assert sent_lines(emulator) == ROWS  # nothing sent the second night
    assert second["shards"] == {} and second["rows"] == ROWS
    assert rows_of(second).select(RESULT).equals(rows_of(first).select(RESULT))
    out = rows_of(second)
    assert set(out.column("nb_status").to_pylist()) == {"cached"}
    assert set(out.column("nb_cached_from_run").to_pylist()) == {"triage-2026-11-23"}
    record = pq.read_table(second["cost_record"]).to_pylist()[0]
    first_record = pq.read_table(first["cost_record"]).to_pylist()[0]
    assert record["requests_cached"] == ROWS and record["cost_batch_usd"] == 0
    assert record["cache_avoided_batch_usd"] == pytest.approx(first_record["cost_batch_usd"])
    assert record["cache_avoided_standard_usd"] == pytest.approx(first_record["cost_standard_usd"])
    assert load_manifest(ObjectStore(), layout_for(job, "2026-11-24")).cache_hits == ROWS


def test_five_percent_changed_rows_are_the_only_ones_sent(tmp_path: Path, emulator: Any) -> None:
    source = tmp_path / "tickets.parquet"
    table = support_tickets(ROWS)
    pq.write_table(table, source)
    job = chat_job(source, tmp_path / "incremental", limits={"max_lines_per_shard": 100})
    run(job, "2026-11-23")
    before = sent_lines(emulator)
    changed_ids = {f"T-{i:06d}" for i in range(1, ROWS + 1, 20)}  # 10 of 200 rows: 5%
    subjects = [
        f"{s} (updated)" if i in changed_ids else s
        for i, s in zip(
            table.column("ticket_id").to_pylist(), table.column("subject").to_pylist(), strict=True
        )
    ]
    changed = table.set_column(
        table.schema.get_field_index("subject"), "subject", pa.array(subjects)
    )
    pq.write_table(changed, source)

    incremental = run(job, "2026-11-24")

    assert sent_lines(emulator) - before == len(changed_ids)
    sent_ids = {b["metadata"]["nightbatch_run"] for b in emulator.stats()["batches"]["items"]}
    assert "triage-2026-11-24" in sent_ids
    out = rows_of(incremental)
    fresh = out.filter(pc.equal(out.column("nb_status"), "succeeded"))
    assert set(fresh.column("ticket_id").to_pylist()) == changed_ids
    full = run(chat_job(source, tmp_path / "full", cache={"enabled": False}), "2026-11-24")
    assert out.select(RESULT).equals(rows_of(full).select(RESULT))


@pytest.mark.parametrize(
    "change",
    [
        {"request": {"template": "Ticket: {subject}\n\n{body}"}},
        {"request": {"model": "gpt-4o"}},
        {"request": {"params": {"max_tokens": 120}}},
        {
            "request": {
                "output_schema": {"type": "object", "properties": {"category": {"type": "string"}}}
            }
        },
    ],
    ids=["template", "model", "params", "schema"],
)
def test_a_changed_request_re_sends_every_row(
    change: dict[str, Any], tmp_path: Path, emulator: Any
) -> None:
    pq.write_table(support_tickets(60), tmp_path / "tickets.parquet")
    job = chat_job(tmp_path / "tickets.parquet", tmp_path, limits={"max_lines_per_shard": 100})
    run(job, "2026-11-23")
    assert sent_lines(emulator) == 60
    base = job.model_dump()
    base["request"].update(change["request"])
    changed = type(job).model_validate(base)
    result = run(changed, "2026-11-24")
    assert sent_lines(emulator) == 120
    assert set(rows_of(result).column("nb_status").to_pylist()) == {"succeeded"}


def test_cache_off_and_refresh(tmp_path: Path, emulator: Any) -> None:
    pq.write_table(support_tickets(30), tmp_path / "tickets.parquet")
    job = chat_job(tmp_path / "tickets.parquet", tmp_path)
    run(job, "2026-11-22")
    run(chat_job(tmp_path / "tickets.parquet", tmp_path, cache={"enabled": False}), "2026-11-23")
    assert sent_lines(emulator) == 60
    run(chat_job(tmp_path / "tickets.parquet", tmp_path, cache={"refresh": True}), "2026-11-24")
    assert sent_lines(emulator) == 90
    run(job, "2026-11-25")
    assert sent_lines(emulator) == 90  # served from the cache again


def test_a_dry_run_on_the_emulator_never_reaches_a_run_against_another_api(
    tmp_path: Path, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nightbatch run --emulator` first (the README's first step), then the real run: nothing of
    the dry run is served; each row says which API answered it; a run is finished against the API
    it was prepared for, or refused with one message."""
    import yaml

    from flows.cli import main

    pq.write_table(support_tickets(40), tmp_path / "tickets.parquet")
    job = chat_job(tmp_path / "tickets.parquet", tmp_path, limits={"max_lines_per_shard": 100})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))

    dry = ["run", str(job_file), "--emulator", "--run-date", "2026-11-23", "--poll-interval", "0.1"]
    assert main([*dry, "--emulator-state", str(tmp_path / "emu")]) == 0
    dry_out = pq.read_table(
        load_manifest(ObjectStore(), layout_for(job, "2026-11-23")).output_file_uri
    )  # type: ignore[arg-type]
    assert set(dry_out.column("nb_api").to_pylist()) == {"emulator"}

    real = ["run", str(job_file), "--run-date", "2026-11-24", "--poll-interval", "0.1"]
    assert main(real) == 0  # against "another" API: the test's emulator on its own URL
    manifest = load_manifest(ObjectStore(), layout_for(job, "2026-11-24"))
    assert manifest.cache_hits == 0 and sent_lines(emulator) == 40
    out = pq.read_table(manifest.output_file_uri)  # type: ignore[arg-type]
    assert set(out.column("nb_status").to_pylist()) == {"succeeded"}
    assert set(out.column("nb_api").to_pylist()) == {manifest.api} != {"emulator"}
    assert manifest.api is not None and manifest.api.startswith("127.0.0.1:")

    capsys.readouterr()
    resumed = ["run", str(job_file), "--run-date", "2026-11-24", "--emulator", "--emulator-state", str(tmp_path / "emu")]  # fmt: skip
    assert main(resumed) == 2
    err = capsys.readouterr().err
    assert f"prepared for the API {manifest.api!r}" in err and "'emulator'" in err
