"""The streaming paths give exactly what the row-by-row paths give: rendered lines (byte for byte),
custom ids, JSON escaping, the Parquet scan with its filter, and shard packing."""

from __future__ import annotations

import datetime
import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from schemas.job import JobSpec, RequestSpec
from tasks.layout import RunLayout
from tasks.prepare import ShardPacker, read_ahead
from tasks.render import (
    RequestRenderer,
    custom_id_for,
    custom_ids_for,
    json_escaped,
    json_escaped_array,
)
from tasks.source import iter_source_batches, merge_small_batches
from tasks.sourcecheck import source_filter
from tasks.storage import ObjectStore

ROWS: dict[str, list[Any]] = {
    "id": ["a", "x y", "é", "T-1", "z" * 61, "ok.id:9_-"],
    "t": [
        'he said "hi"\n\\ok',
        None,
        "tab\there\r\x01\x1f ctrl \x08\x0c",
        "ünï ✓ 😀 \u2028",
        "",
        "plain",
    ],
    "n": [1, None, 3, -4, 0, 2**40],
    "f": [1.0, 2.5, None, 1e20, 0.1 + 0.2, -0.0],
    "b": [True, False, None, True, False, True],
    "d": [datetime.date(2020, 1, 1), None, datetime.date(2021, 2, 3)] * 2,
}
SPECS: list[dict[str, Any]] = [
    {
        "model": "gpt-4o-mini",
        "system_prompt": 'Sys {{x}} "q"',
        "template": "T: {t} n={n} f={f} b={b} d={d}",
        "params": {"max_tokens": 5, "temperature": 0},
        "output_schema": {"type": "object", "properties": {"a": {"type": "string"}}},
    },
    {"model": "gpt-4o-mini", "template": "{t}"},
    {"model": "gpt-4o-mini", "template": "static only, {{braces}}"},
    {"model": "gpt-4o-mini", "template": "{n:>4} {f!r} {t!r:.5} {t}"},
    {
        "endpoint": "/v1/responses",
        "model": "gpt-5-mini",
        "system_prompt": "Be brief",
        "template": "{t}",
        "output_schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
    },
    {
        "endpoint": "/v1/responses",
        "model": "gpt-5-mini",
        "template": "{t}",
        "params": {"instructions": "x"},
    },
    {
        "endpoint": "/v1/embeddings",
        "model": "text-embedding-3-small",
        "template": "{t}{n}",
        "params": {"dimensions": 8},
    },
    {"model": "gpt-4o-mini", "system_prompt": "About {n}", "template": "{t}"},  # per-row path
]


@pytest.mark.parametrize("spec", SPECS)
def test_batch_rendering_is_byte_for_byte_the_row_rendering(spec: dict[str, Any]) -> None:
    batch = pa.RecordBatch.from_pydict(ROWS)
    renderer = RequestRenderer(RequestSpec(**spec))
    rendered = renderer.render_batch(batch, "id")
    data = bytes(rendered.chunk(0, len(rendered)))
    expected = [
        renderer.line(custom_id_for(row["id"]), renderer.body(row)) for row in batch.to_pylist()
    ]
    assert data.splitlines(keepends=True) == expected
    assert rendered.lengths.tolist() == [len(line) for line in expected]
    assert bytes(rendered.chunk(2, 4)) == b"".join(expected[2:4])
    assert rendered.custom_ids.to_pylist() == [custom_id_for(v) for v in ROWS["id"]]


def test_custom_ids_for_every_id_type_match_the_row_rule() -> None:
    columns = [
        pa.array(["T-000123", "x y", "a" * 60, "a" * 61, "ü", ""]),
        pa.array(["T-1", "b c"], pa.large_string()),
        pa.array([0, -5, 2**62], pa.int64()),
        pa.array([7], pa.int8()),
        pa.array([1.5, 2.0]),
        pa.array([datetime.date(2026, 1, 2)]),
    ]
    for column in columns:
        assert custom_ids_for(column).to_pylist() == [custom_id_for(v) for v in column.to_pylist()]


def test_json_escaping_matches_orjson_on_random_text() -> None:
    rng = random.Random(3)
    alphabet = 'ab "\\\n\t\r\x00\x1f\x7fé€😀\u2028/' + "".join(map(chr, range(32)))
    for controls in (True, False):
        chars = alphabet if controls else 'ab "\\\n\t\ré€😀\u2028/'
        texts = ["".join(rng.choice(chars) for _ in range(rng.randrange(30))) for _ in range(300)]
        array = pa.array(texts, pa.large_string())
        expected = [orjson.dumps(t)[1:-1] for t in texts]
        assert json_escaped_array(array).to_pylist() == expected
        assert json_escaped(array) == expected


def _write_dataset(root: Path) -> ds.Dataset:
    """Three files: one with the columns in another order and an int32 `n`, one without `note`."""
    root.mkdir()
    rng = np.random.default_rng(5)
    ids = iter(range(10_000))

    def table(rows: int) -> pa.Table:
        return pa.table(
            {
                "id": [f"r{next(ids)}" for _ in range(rows)],
                "n": pa.array(rng.integers(0, 100, rows), pa.int64()),
                "tier": pa.array(rng.choice(["free", "pro", "ent"], rows).tolist()),
                "note": [None if i % 7 == 0 else f"note {i}" for i in range(rows)],
            }
        )

    pq.write_table(table(2500), root / "part-0.parquet", row_group_size=600)
    second = table(1800)
    second = second.select(["note", "tier", "id", "n"]).set_column(
        3, "n", second.column("n").cast(pa.int32())
    )
    pq.write_table(second, root / "part-1.parquet", row_group_size=500)
    pq.write_table(table(900).drop_columns(["note"]), root / "part-2.parquet")
    return ds.dataset(root, format="parquet")


@pytest.mark.parametrize(
    "filters",
    [
        None,
        [("tier", "in", ["pro", "ent"])],
        [("n", ">=", 50), ("tier", "!=", "free")],
        [("n", ">", 1000)],
    ],
)
def test_streamed_scan_selects_the_rows_arrow_selects(
    tmp_path: Path, filters: list[tuple[str, str, Any]] | None
) -> None:
    dataset = _write_dataset(tmp_path / "src")
    job = JobSpec.model_validate(
        {
            "name": "scan",
            "source": {"uri": str(tmp_path / "src"), "id_column": "id", "filter": filters},
            "request": {"model": "gpt-4o-mini", "template": "{note}"},
            "output_uri": str(tmp_path / "out"),
            "storage_root": str(tmp_path / "state"),
        }
    )
    expression = source_filter(job)
    columns = ["id", "note", "n"]
    expected = dataset.to_table(columns=columns, filter=expression)
    filter_on = [f[0] for f in filters or []]
    batches = list(iter_source_batches(dataset, columns, expression, filter_on))
    got = pa.Table.from_batches(batches, schema=expected.schema)
    assert got.equals(expected)
    merged = list(read_ahead(merge_small_batches(iter(batches), 1000), 2))
    assert all(b.num_rows >= 1000 for b in merged[:-1])
    assert pa.Table.from_batches(merged, schema=expected.schema).equals(expected)


def test_read_ahead_passes_errors_on() -> None:
    def failing() -> Any:
        yield pa.record_batch({"x": [1]})
        raise OSError("disk gone")

    reader = read_ahead(failing(), 1)
    assert next(reader).num_rows == 1
    with pytest.raises(OSError, match="disk gone"):
        next(reader)


def _pack(
    tmp_path: Path, name: str, limits: dict[str, Any], rows: int, bulk: bool
) -> tuple[list[Any], list[bytes], list[list[str]]]:
    job = JobSpec.model_validate(
        {
            "name": name,
            "source": {"uri": "unused", "id_column": "id"},
            "request": {"model": "gpt-4o-mini", "template": "{t}"},
            "output_uri": str(tmp_path / "out"),
            "storage_root": str(tmp_path / name),
            "limits": limits,
        }
    )
    store = ObjectStore()
    layout = RunLayout(job.storage_root, job.name, "2026-01-01")
    renderer = RequestRenderer(job.request)
    packer = ShardPacker(job, store, layout, 1)
    rng = random.Random(9)
    table = pa.table(
        {
            "id": [f"id-{i}" for i in range(rows)],
            "t": ["x" * rng.randrange(1, 400) for _ in range(rows)],
        }
    )
    for batch in table.to_batches(max_chunksize=333):
        rendered = renderer.render_batch(batch, "id")
        tokens = rendered.lengths // 7 + 1
        if bulk:
            packer.add_rendered(rendered, tokens)
        else:
            data = bytes(rendered.chunk(0, len(rendered)))
            ids = rendered.custom_ids.to_pylist()
            for cid, line, count in zip(ids, data.splitlines(keepends=True), tokens, strict=True):
                packer.add(cid, line, int(count))
    shards = packer.finish()
    files = [Path(s.request_uri).read_bytes() for s in shards]
    ids = [
        pq.read_table(layout.ids_file(1, s.index)).column("custom_id").to_pylist() for s in shards
    ]
    return shards, files, ids


@pytest.mark.parametrize(
    "limits",
    [
        {"max_lines_per_shard": 50},
        {"max_bytes_per_shard": 4096},
        {"max_enqueued_tokens": 900},
        {"max_lines_per_shard": 120, "max_bytes_per_shard": 30_000, "max_enqueued_tokens": 3000},
    ],
)
def test_bulk_packing_packs_exactly_as_line_by_line(tmp_path: Path, limits: dict[str, Any]) -> None:
    one, one_files, one_ids = _pack(tmp_path, "one", limits, 1000, bulk=False)
    bulk, bulk_files, bulk_ids = _pack(tmp_path, "bulk", limits, 1000, bulk=True)
    assert bulk_files == one_files and bulk_ids == one_ids
    assert [s.model_dump(exclude={"request_uri"}) for s in bulk] == [
        s.model_dump(exclude={"request_uri"}) for s in one
    ]
    assert all(
        s.sha256 == hashlib.sha256(f).hexdigest() for s, f in zip(bulk, bulk_files, strict=True)
    )


# ---- collect: chunks of output lines parse as line-by-line parsing does ---------------------------

SCHEMA_SPEC = RequestSpec(
    model="gpt-4o-mini",
    template="{t}",
    output_schema={
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "score": {"type": "integer"},
            "weight": {"type": "number"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "extra": {"type": "object", "properties": {"x": {"type": "integer"}}},
        },
    },
)
GOOD = {"label": "a", "score": 3, "weight": 1.5, "ok": True, "tags": ["x"], "extra": {"x": 1}}


def _chat_line(custom_id: str, content: Any = None, **over: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "refusal": over.pop("refusal", None)}
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "model": over.pop("model", "gpt-4o-mini-2024-07-18"),
        "choices": over.pop(
            "choices",
            [{"index": 0, "message": message, "finish_reason": over.pop("finish", "stop")}],
        ),
        "usage": over.pop(
            "usage",
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 2},
                "completion_tokens_details": {"reasoning_tokens": 1},
            },
        ),
    }
    return {
        "id": "batch_req_1",
        "custom_id": custom_id,
        "response": {"status_code": over.pop("status", 200), "body": body},
        "error": None,
    }


def _chat_lines() -> list[dict[str, Any]]:
    def text(value: Any) -> str:
        return orjson.dumps(value).decode()

    lines = [_chat_line(f"ok-{i}", text({**GOOD, "score": i})) for i in range(50)]
    odd: list[dict[str, Any]] = [
        _chat_line("pretty", orjson.dumps(GOOD, option=orjson.OPT_INDENT_2).decode()),
        _chat_line("not-json", '{"label": "a", '),
        _chat_line("missing", text({k: v for k, v in GOOD.items() if k != "score"})),
        _chat_line("null-value", text({**GOOD, "label": None})),
        _chat_line("float-for-int", text({**GOOD, "score": 3.0})),
        _chat_line("int-for-float", text({**GOOD, "weight": 2})),
        _chat_line("number-for-string", text({**GOOD, "label": 7})),
        _chat_line("one-for-bool", text({**GOOD, "ok": 1})),
        _chat_line("list", text([GOOD])),
        _chat_line("refused", text(GOOD), refusal="I can't"),
        _chat_line("empty-refusal", text(GOOD), refusal=""),
        _chat_line("no-choices", text(GOOD), choices=[]),
        _chat_line("null-choices", text(GOOD), choices=None),
        _chat_line("null-content", None),
        _chat_line("empty-content", ""),
        _chat_line("truncated", '{"label": "a", "sc', finish="length"),
        _chat_line("no-usage", text(GOOD), usage=None),
        _chat_line("partial-usage", text(GOOD), usage={"prompt_tokens": 4}),
        _chat_line("unicode", text({**GOOD, "label": 'é 😀 \u2028 \\ "'})),
        _chat_line("null-model", text(GOOD), model=None),
        _chat_line("extra-keys", text({**GOOD, "more": [1, 2]})),
        {
            "custom_id": "expired",
            "response": None,
            "error": {"code": "batch_expired", "message": "x"},
        },
        {"custom_id": "no-error", "response": None, "error": None},
    ]
    for status, code in ((429, "rate_limit_exceeded"), (429, "insufficient_quota"), (500, None),
                         (400, "context_length_exceeded"), (408, None)):  # fmt: skip
        line = _chat_line(f"http-{status}-{code}", None, status=status)
        line["response"]["body"] = {"error": {"message": "m", "type": "t", "code": code}}
        odd.append(line)
    return lines[:20] + odd + lines[20:]


def _by_line(parser: Any, lines: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    results, errors = [], []
    for line in lines:
        kind, row = parser.parse(line)
        (results if kind == "result" else errors).append(row)
    return results, errors


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: r["custom_id"])


def _parsed(parser: Any, table: pa.Table, lines: list[dict[str, Any]]) -> tuple[Any, list[Any]]:
    """`parse_table`'s results and errors, after checking each row names the line it came from."""
    parsed = parser.parse_table(table)
    ids = [line["custom_id"] for line in lines]
    assert parsed.results.column("custom_id").to_pylist() == [ids[i] for i in parsed.result_lines]
    assert [e["custom_id"] for e in parsed.errors] == [ids[i] for i in parsed.error_lines]
    assert sorted([*parsed.result_lines, *parsed.error_lines]) == list(range(len(lines)))
    return parsed.results, parsed.errors


@pytest.mark.parametrize("schema", [True, False])
def test_chunk_parsing_classifies_every_line_as_line_parsing(schema: bool) -> None:
    from tasks.parse import LineParser

    spec = SCHEMA_SPEC if schema else RequestSpec(model="gpt-4o-mini", template="{t}")
    parser = LineParser(spec, 2, "batch_1")
    lines = _chat_lines()
    data = b"\n".join(orjson.dumps(line) for line in lines) + b"\n\n"
    table = parser.read_lines(data)
    assert table is not None and table.num_rows == len(lines)
    results, errors = _parsed(parser, table, lines)
    assert results.schema == parser.schema
    want_results, want_errors = _by_line(parser, lines)
    want_table = pa.Table.from_pylist(want_results, schema=parser.schema)
    assert _sorted(results.to_pylist()) == _sorted(want_table.to_pylist())
    assert _sorted(errors) == _sorted(want_errors)
    assert len(results) + len(errors) == len(lines)


def test_chunk_parsing_of_embeddings_and_fallbacks() -> None:
    from benchmarks.synth import embedding_output_lines
    from tasks.parse import LineParser

    spec = RequestSpec(endpoint="/v1/embeddings", model="text-embedding-3-small", template="{t}")
    parser = LineParser(spec, 1, "b")
    raw = list(embedding_output_lines([f"e-{i}" for i in range(30)], 8))
    lines = [orjson.loads(line) for line in raw]
    lines[3]["response"]["body"]["data"] = []
    lines[4]["response"]["body"]["data"][0]["embedding"] = None
    table = parser.read_lines(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    assert table is not None
    results, errors = _parsed(parser, table, lines)
    want_results, want_errors = _by_line(parser, lines)
    want = pa.Table.from_pylist(want_results, schema=parser.schema)
    assert _sorted(results.to_pylist()) == _sorted(want.to_pylist())
    assert _sorted(errors) == _sorted(want_errors) and len(errors) == 2
    base64_line = dict(lines[0], custom_id="b64")
    base64_line["response"] = {"status_code": 200, "body": {"data": [{"embedding": "AAAA"}]}}
    assert parser.read_lines(orjson.dumps(base64_line)) is None  # another shape: line by line
    chat = LineParser(RequestSpec(model="m", template="{t}"), 1, "b")
    assert chat.read_lines(b'{"custom_id": 5}\n') is None
    responses = LineParser(RequestSpec(endpoint="/v1/responses", model="m", template="{t}"), 1, "b")
    assert responses.read_lines(raw[0]) is None


# ---- load: the bucketed join writes what the in-memory join writes -------------------------------


def _collected_run(tmp_path: Path, embeddings: bool = False) -> tuple[Any, ObjectStore]:
    """A prepared run (3,000 rows, 4 shards) with made-up outcomes: most rows succeed in attempt 1,
    some fail for good, some are retried and succeed in attempt 2, some never come back; then 200
    rows are added to the source (not in the run)."""
    from schemas.tables import ERRORS_SCHEMA, results_schema
    from tasks.prepare import write_shards
    from tasks.runs import new_manifest

    source = tmp_path / "src.parquet"
    rows = 3000
    table = pa.table(
        {
            "id": [f"row-{i}" for i in range(rows)],
            "text": [f"text {i}" for i in range(rows)],
            "n": list(range(rows)),
        }
    )
    pq.write_table(table, source)
    job = JobSpec.model_validate(
        {
            "name": "load",
            "source": {"uri": str(source), "id_column": "id", "columns": ["id", "n"]},
            "request": (
                {
                    "endpoint": "/v1/embeddings",
                    "model": "text-embedding-3-small",
                    "template": "{text}",
                }
                if embeddings
                else {"model": "gpt-4o-mini", "template": "{text}"}
            ),
            "output_uri": str(tmp_path / "out"),
            "storage_root": str(tmp_path / "state"),
            "limits": {"max_lines_per_shard": 800},
        }
    )
    store = ObjectStore()
    layout = RunLayout(job.storage_root, job.name, "2026-01-02")
    prepared = write_shards(job, store, layout)
    schema = results_schema(job.request)
    shards = []
    retried: list[str] = []
    for shard in prepared.shards:
        ids = pq.read_table(layout.ids_file(1, shard.index)).column("custom_id").to_pylist()
        ok = [c for c in ids if hash(c) % 10 < 7]
        failed = [c for c in ids if hash(c) % 10 in (7, 8)]
        retried += [c for c in failed if hash(c) % 2]
        shards.append(_outcome_shard(store, layout, shard, schema, ok, failed, attempt=1))
    retry = shards[0].model_copy(update={"attempt": 2, "shard_id": "a2-s00000"})
    shards.append(_outcome_shard(store, layout, retry, schema, retried[::2], retried[1::2], 2))
    manifest = new_manifest(job, "2026-01-02", "2026-01-02T00:00:00+00:00").model_copy(
        update={"shards": shards, "rows_selected": rows}
    )
    more = pa.table({"id": [f"new-{i}" for i in range(200)], "text": ["x"] * 200, "n": [0] * 200})
    pq.write_table(pa.concat_tables([table, more]), source)
    assert ERRORS_SCHEMA is not None
    return manifest, store


def _outcome_shard(
    store: ObjectStore, layout: RunLayout, shard: Any, schema: pa.Schema, ok: list[str],
    failed: list[str], attempt: int,
) -> Any:  # fmt: skip
    from schemas.tables import ERRORS_SCHEMA

    n = len(ok)
    results = {
        "custom_id": ok, "attempt": [attempt] * n, "batch_id": [f"b{attempt}"] * n,
        "model": ["gpt-4o-mini"] * n, "finish_reason": ["stop"] * n,
        **(
            {"embedding": [[float(len(c)), 0.5] * 200 for c in ok]}  # 1.6 KB a row
            if "embedding" in schema.names
            else {"response_text": [f"answer {c}" for c in ok]}
        ),
        "input_tokens": [5] * n,
        "cached_tokens": [0] * n, "cache_write_tokens": [0] * n, "output_tokens": [2] * n,
        "reasoning_tokens": [0] * n,
    }  # fmt: skip
    m = len(failed)
    errors = {
        "custom_id": failed, "attempt": [attempt] * m, "batch_id": [f"b{attempt}"] * m,
        "kind": ["http"] * m, "status_code": [400] * m, "code": ["bad"] * m,
        "message": ["no"] * m, "retryable": [bool(hash(c) % 2) for c in failed],
        "billed": [False] * m, "model": [None] * m, "input_tokens": [0] * m,
        "cached_tokens": [0] * m, "cache_write_tokens": [0] * m, "output_tokens": [0] * m,
        "reasoning_tokens": [0] * m,
    }  # fmt: skip
    results_uri = layout.results_file(attempt, shard.index)
    errors_uri = layout.errors_file(attempt, shard.index)
    store.write_table(results_uri, pa.table(results, schema=schema))
    store.write_table(errors_uri, pa.table(errors, schema=ERRORS_SCHEMA))
    return shard.model_copy(
        update={"state": "collected", "results_uri": results_uri, "errors_uri": errors_uri}
    )


@pytest.mark.parametrize("embeddings", [False, True], ids=["chat", "embeddings"])
def test_bucketed_load_writes_what_the_in_memory_load_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embeddings: bool
) -> None:
    import tasks.load as load

    manifest, store = _collected_run(tmp_path, embeddings)
    whole = load.write_output(manifest, store)
    out = pq.read_table(whole.output_uri)
    dead = pq.read_table(whole.dead_letter_uri)
    assert whole.rows_not_in_run == 200
    assert whole.rows_written + whole.rows_dead_lettered == 3000 == out.num_rows + dead.num_rows
    assert out.column("id").to_pylist() == sorted(out.column("id").to_pylist(), key=_row_no)

    monkeypatch.setattr(load, "LOAD_BUCKET_ROWS", 400)
    assert load._Outcomes(manifest, store).bucket_count() == 8
    parts = load.write_output(manifest, store)
    assert (parts.rows_written, parts.rows_dead_lettered, parts.rows_not_in_run) == (
        whole.rows_written, whole.rows_dead_lettered, whole.rows_not_in_run,
    )  # fmt: skip
    bucketed = pq.read_table(parts.output_uri)
    assert bucketed.schema == out.schema
    assert bucketed.equals(out)  # the same rows, in the source's order
    assert (
        pq.read_table(parts.dead_letter_uri).sort_by("custom_id").equals(dead.sort_by("custom_id"))
    )
    # source batches of 97 rows and spilled batches of 64: results merged across batch boundaries
    import tasks.source as source

    monkeypatch.setattr(source, "SCAN_BATCH_ROWS", 97)
    monkeypatch.setattr(load, "SPILL_BATCH_BYTES", 1)
    small = load.write_output(manifest, store)
    assert pq.read_table(small.output_uri).equals(out)
    assert small.rows_dead_lettered == whole.rows_dead_lettered


def test_a_bucketed_load_stops_when_the_source_changes_between_its_scans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are merged back by position: if the second scan does not see the rows of the first, it
    stops before writing a row to the wrong result."""
    import tasks.load as load

    manifest, store = _collected_run(tmp_path)
    monkeypatch.setattr(load, "LOAD_BUCKET_ROWS", 400)
    scans = load.iter_source_batches

    def second_scan_reversed(dataset: Any, columns: list[str], *args: Any) -> Any:
        for batch in scans(dataset, columns, *args):
            yield batch if len(columns) == 1 else batch.take(pa.array(range(batch.num_rows))[::-1])

    monkeypatch.setattr(load, "iter_source_batches", second_scan_reversed)
    with pytest.raises(RuntimeError, match="source table changed while load was reading it"):
        load.write_output(manifest, store)

    def second_scan_shorter(dataset: Any, columns: list[str], *args: Any) -> Any:
        (batch,) = scans(dataset, columns, *args)  # one batch: its last 200 rows are not in the run
        yield batch if len(columns) == 1 else batch.slice(0, batch.num_rows - 300)

    monkeypatch.setattr(load, "iter_source_batches", second_scan_shorter)
    with pytest.raises(RuntimeError, match="source table changed while load was reading it"):
        load.write_output(manifest, store)


def _row_no(row_id: str) -> int:
    return int(row_id.rsplit("-", 1)[1])


def test_run_billing_sums_every_billed_line_per_model(tmp_path: Path) -> None:
    from schemas.tables import ERRORS_SCHEMA
    from tasks.load import USAGE_COLUMNS, run_billing

    manifest, store = _collected_run(tmp_path)
    with_errors = next(s for s in manifest.shards if s.errors_uri)
    rows = pq.read_table(with_errors.errors_uri).to_pylist()
    for i, row in enumerate(rows[::2]):  # invalid outputs: billed, with usage
        row.update(
            billed=True, model="gpt-4o-mini-2024-07-18", input_tokens=10 + i, output_tokens=3
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), with_errors.errors_uri)
    results = pa.concat_tables(
        [pq.read_table(s.results_uri) for s in manifest.shards if s.results_uri]
    ).to_pylist()
    errors = pa.concat_tables(
        [pq.read_table(s.errors_uri) for s in manifest.shards if s.errors_uri]
    ).to_pylist()
    billed_lines = results + [e for e in errors if e["billed"]]
    assert len(billed_lines) > len(results) > 0  # some error lines are billed too
    want: dict[str, dict[str, int]] = {}
    for line in billed_lines:
        acc = want.setdefault(line["model"], {"lines": 0, **dict.fromkeys(USAGE_COLUMNS, 0)})
        acc["lines"] += 1
        for key in USAGE_COLUMNS:
            acc[key] += line[key]
    billing = run_billing(manifest, store)
    assert billing.billed == want and len(want) == 2
    assert billing.error_rows == len(errors) and billing.cached == {}
    assert billing.result_rows == len(results)


# ---- collect: every expected line counted once, whatever the chunking ---------------------------


class _Files:
    """Downloads from bytes in memory (a stand-in for the Batch API's file content)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def download(self, file_id: str, sink: Any) -> int:
        sink.write(self.files[file_id])
        return len(self.files[file_id])


@pytest.mark.parametrize("chunk_bytes", [97, 4 << 20])
def test_collect_keeps_the_first_line_of_each_expected_id_once(
    tmp_path: Path, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeated lines (within a chunk and across chunks) count once, the first one wins; lines of
    ids the shard never sent are ignored; ids that never came back are `missing`."""
    from benchmarks.bench import CHAT_SCHEMA
    from benchmarks.synth import chat_output_lines
    from schemas.manifest import Shard
    from tasks import collect

    monkeypatch.setattr(collect, "CHUNK_BYTES", chunk_bytes)
    expected = [f"r-{i}" for i in range(60)]
    store = ObjectStore()
    job = JobSpec.model_validate(
        {
            "name": "c",
            "source": {"uri": str(tmp_path / "s.parquet"), "id_column": "id"},
            "request": {"model": "gpt-4o-mini", "template": "{t}", "output_schema": CHAT_SCHEMA},
            "output_uri": str(tmp_path / "out"),
            "storage_root": str(tmp_path / "state"),
        }
    )
    layout = RunLayout(job.storage_root, job.name, "2026-01-01")
    store.write_table(
        layout.ids_file(1, 0), pa.table({"custom_id": pa.array(expected, pa.string())})
    )
    lines = list(chat_output_lines(expected[:55], seed=3, errors=0.0))
    first = {cid: orjson.loads(line) for cid, line in zip(expected[:55], lines, strict=True)}
    again = [orjson.loads(lines[i]) for i in (0, 7, 40)]
    for line in again:  # a later copy of a line, with another answer: must not win
        line["response"]["body"]["choices"][0]["message"]["content"] = orjson.dumps(
            {"summary": "second copy", "audience": "x", "score": 1}
        ).decode()
    stranger = dict(orjson.loads(lines[1]), custom_id="r-not-in-shard")
    ordered = [*lines[:10], orjson.dumps(again[0]) + b"\n", orjson.dumps(stranger) + b"\n"]
    ordered += [*lines[10:], orjson.dumps(again[1]) + b"\n", orjson.dumps(again[2]) + b"\n"]
    shard = Shard(
        shard_id="a1-s00000", attempt=1, index=0, request_uri="unused", lines=60, bytes=1,
        input_tokens=1, embedding_inputs=60, sha256="0", state="terminal", batch_id="batch_1",
        batch_status="completed", output_file_id="file-out",
    )  # fmt: skip
    api = _Files({"file-out": b"".join(ordered)})
    results_uri, errors_uri, counts = collect.collect_shard(job, layout, shard, store, api)  # type: ignore[arg-type]
    results = store.read_table(results_uri).to_pylist()
    errors = store.read_table(errors_uri).to_pylist()
    assert sorted(r["custom_id"] for r in results) == sorted(expected[:55])
    by_id = {r["custom_id"]: r for r in results}
    for cid in ("r-0", "r-7", "r-40"):
        want = orjson.loads(first[cid]["response"]["body"]["choices"][0]["message"]["content"])
        assert by_id[cid]["summary"] == want["summary"] != "second copy"
    assert sorted(e["custom_id"] for e in errors) == expected[55:]
    assert {e["kind"] for e in errors} == {"missing"}
    assert (counts.succeeded, counts.failed, counts.missing) == (55, 5, 5)
