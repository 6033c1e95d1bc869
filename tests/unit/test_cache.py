from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.job import JobSpec
from schemas.settings import Settings
from schemas.tables import CACHE_HITS_SCHEMA, results_schema
from tasks.cache import (
    CacheIndex,
    ResultCache,
    cache_key,
    cache_key_from_line,
    cache_shard_results,
    custom_id_of_line,
    key_array,
    namespace,
)
from tasks.render import RequestRenderer
from tasks.storage import ObjectStore
from tests.unit.helpers import assert_sidecar_keys_match_lines, products_job

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)


def job(**request: object) -> JobSpec:
    base = {"model": "gpt-4o-mini", "template": "Say {t}", "params": {"max_tokens": 5}}
    return JobSpec.model_validate(
        {
            "name": "j",
            "source": {"uri": "s", "id_column": "id"},
            "request": {**base, **request},
            "output_uri": "o",
            "storage_root": "r",
        }
    )


def key_of(spec: JobSpec, text: str, custom_id: str = "r-1") -> bytes:
    renderer = RequestRenderer(spec.request)
    return cache_key_from_line(renderer.line(custom_id, renderer.body({"t": text})))


def test_the_key_covers_what_is_sent_and_nothing_else() -> None:
    base = job()
    assert key_of(base, "hi") == key_of(base, "hi", custom_id="r-other-id")  # ids do not matter
    assert key_of(base, "hi") != key_of(base, "hello")  # the rendered text does
    assert key_of(base, "hi") != key_of(job(model="gpt-4o"), "hi")
    assert key_of(base, "hi") != key_of(job(template="Please say {t}"), "hi")
    assert key_of(base, "hi") != key_of(job(params={"max_tokens": 6}), "hi")
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    other = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert key_of(job(output_schema=schema), "hi") != key_of(job(output_schema=other), "hi")
    assert namespace(job(output_schema=schema), "a") != namespace(job(output_schema=other), "a")
    assert len(key_of(base, "hi")) == 16
    assert cache_key("/v1/embeddings", b"{}") != cache_key("/v1/chat/completions", b"{}")


def test_index_lookup_is_vectorised_and_exact_on_prefixes() -> None:
    keys = [cache_key("/v1/embeddings", str(i).encode()) for i in range(1000)]
    index = CacheIndex.from_keys(keys[:500])
    found = index.contains(keys)
    assert found[:500].all() and not found[500:].any()
    assert not CacheIndex.empty().contains(keys[:3]).any()


def test_segments_round_trip_expire_and_prune(tmp_path: Path) -> None:
    spec = job()
    cache = ResultCache(ObjectStore(), str(tmp_path), spec, "test-api")
    schema = results_schema(spec.request)
    results = pa.Table.from_pylist(
        [{"custom_id": f"r-{i}", "attempt": 1, "batch_id": "b", "model": "gpt-4o-mini", "finish_reason": "stop",
          "response_text": f"answer {i}", "input_tokens": 10, "cached_tokens": 0, "cache_write_tokens": 0,
          "output_tokens": 2, "reasoning_tokens": 0} for i in range(3)],
        schema=schema,
    )  # fmt: skip
    keys = [cache_key("/v1/chat/completions", str(i).encode()) for i in range(3)]
    old = (NOW - timedelta(days=10)).isoformat()
    cache.write_segment("run-a-s0", keys[:2], results.slice(0, 2), "run-a", old)
    cache.write_segment("run-b-s0", keys[2:], results.slice(2, 1), "run-b", NOW.isoformat())

    assert len(cache.index(None, NOW)) == 3
    assert (
        len(cache.index(max_age_days=5, now=NOW)) == 1
    )  # entries older than 5 days are not served
    hits = pa.table({"custom_id": ["x0", "x1", "x2"], "cache_key": key_array(keys)})
    entries = pa.concat_tables(cache.served_entries(hits, None, NOW))
    served = zip(
        entries["custom_id"].to_pylist(), entries["response_text"].to_pylist(), strict=True
    )
    assert sorted(served) == [
        ("x0", "answer 0"),
        ("x1", "answer 1"),
        ("x2", "answer 2"),
    ]
    assert set(entries.column("run_id").to_pylist()) == {"run-a", "run-b"}
    recent = pa.concat_tables(cache.served_entries(hits, 5, NOW))
    assert recent.column("response_text").to_pylist() == ["answer 2"]
    assert cache.prune(older_than_days=5, now=NOW) == 1
    assert len(cache.index(None, NOW)) == 1


@pytest.mark.parametrize("system_prompt", ["Sum up.", "Sum up {title}."], ids=["framed", "per-row"])
def test_an_incremental_prepare_writes_exactly_the_missed_lines(
    tmp_path: Path, system_prompt: str
) -> None:
    """The lines of an incremental prepare are the full prepare's lines whose key is not cached,
    byte for byte and in order, with exact token counts (both rendering paths)."""
    from tasks.layout import RunLayout
    from tasks.prepare import write_shards
    from tasks.tokens import count_request_tokens

    job = products_job(
        tmp_path, 9000, system_prompt=system_prompt, template="{description}", max_lines=2500,
        mean_chars=150.0, name="inc",
    )  # fmt: skip
    store = ObjectStore()
    full = write_shards(job, store, RunLayout(job.storage_root, job.name, "2026-01-01"))
    lines = [
        line for s in full.shards for line in Path(s.request_uri).read_bytes().splitlines(True)
    ]
    cached = {cache_key_from_line(line) for i, line in enumerate(lines) if i % 10 < 7}
    night2 = write_shards(
        job,
        store,
        RunLayout(job.storage_root, job.name, "2026-01-02"),
        cache_index=CacheIndex.from_keys(sorted(cached)),
    )
    sent = [
        line for s in night2.shards for line in Path(s.request_uri).read_bytes().splitlines(True)
    ]
    assert sent == [line for line in lines if cache_key_from_line(line) not in cached]
    assert night2.cache_hits == len(cached) and len(sent) == 9000 - len(cached)
    assert [s.lines for s in night2.shards] == [2500, 200]
    layout = RunLayout(job.storage_root, job.name, "2026-01-02")
    for shard in night2.shards:  # the keys of the lookup are kept for collect
        assert_sidecar_keys_match_lines(layout.ids_file(1, shard.index), shard.request_uri)
    first = pq.read_table(RunLayout(job.storage_root, job.name, "2026-01-01").ids_file(1, 0))
    assert first.column_names == ["custom_id"]  # no lookup (an empty cache), no keys: none hashed
    for shard in night2.shards:
        body_lines = Path(shard.request_uri).read_bytes().splitlines()
        exact = sum(
            count_request_tokens(job.request.endpoint, orjson.loads(b)["body"]) for b in body_lines
        )
        assert shard.input_tokens == exact


def _collected_shard(tmp_path: Path, with_keys: bool) -> tuple[ResultCache, tuple[str, str], str]:
    """A shard of three lines (its request file, its sidecar with or without keys) and the results
    collect wrote for two of them, in another order than the lines."""
    spec = job()
    renderer = RequestRenderer(spec.request)
    lines = [renderer.line(f"r-{t}", renderer.body({"t": t})) for t in ("a", "b", "c")]
    request_uri, ids_uri = str(tmp_path / "requests.jsonl"), str(tmp_path / "ids.parquet")
    Path(request_uri).write_bytes(b"".join(lines))
    ids = {"custom_id": [custom_id_of_line(x) for x in lines]}
    if with_keys:
        ids["cache_key"] = [cache_key_from_line(x) for x in lines]
    pq.write_table(pa.table(ids), ids_uri)
    schema = results_schema(spec.request)
    rows = [{"custom_id": c, "response_text": f"out {c}", "attempt": 1} for c in ("r-c", "r-a")]
    results_uri = str(tmp_path / "results.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), results_uri)
    return (
        ResultCache(ObjectStore(), str(tmp_path / "root"), spec, "test-api"),
        (request_uri, ids_uri),
        results_uri,
    )


@pytest.mark.parametrize("with_keys", [True, False], ids=["sidecar-keys", "request-file"])
def test_collected_results_are_cached_under_their_request_keys(
    tmp_path: Path, with_keys: bool
) -> None:
    """Keys come from the sidecar when prepare recorded them there (the request file is then not
    read: it is gone here), else from the request file."""
    cache, files, results_uri = _collected_shard(tmp_path, with_keys)
    expected = [key_of(job(), "c"), key_of(job(), "a")]
    if with_keys:
        Path(files[0]).unlink()
    sidecar = pq.read_table(files[1])
    store = ObjectStore()
    assert cache_shard_results(cache, store, results_uri, sidecar, files[0], "s", "run-1", "t") == 2
    (segment,) = cache.segments()
    table = pq.read_table(segment)
    assert table.column("cache_key").to_pylist() == expected
    assert table.column("response_text").to_pylist() == ["out r-c", "out r-a"]


def test_served_entries_are_the_newest_of_each_key_a_segment_at_a_time(tmp_path: Path) -> None:
    """Across segments the newest entry of a key wins; two hits with the same request share its
    entry; a key that shares only its first 8 bytes with an entry is not served; each table holds
    one segment's rows."""
    spec = job()
    cache = ResultCache(ObjectStore(), str(tmp_path), spec, "test-api")
    schema = results_schema(spec.request)

    def results(*texts: str) -> pa.Table:
        rows = [{"custom_id": f"r-{t}", "attempt": 1, "response_text": t} for t in texts]
        return pa.Table.from_pylist(rows, schema=schema)

    k = [cache_key("/v1/chat/completions", str(i).encode()) for i in range(3)]
    twin = k[0][:8] + bytes(8)  # same 8-byte prefix as k[0], another key
    day = [(NOW - timedelta(days=d)).isoformat() for d in (3, 2, 1)]
    cache.write_segment("a", [k[0], k[1]], results("k0 old", "k1 old"), "run-a", day[0])
    cache.write_segment("b", [k[1], k[2]], results("k1 new", "k2"), "run-b", day[2])
    cache.write_segment("c", [k[0]], results("k0 mid"), "run-c", day[1])
    hits = pa.table(
        {"custom_id": ["h1", "h0", "h0-twin", "h-prefix"], "cache_key": key_array([k[1], k[0], k[0], twin])},
        schema=CACHE_HITS_SCHEMA,
    )  # fmt: skip
    tables = list(cache.served_entries(hits, None, NOW))
    assert [set(t["run_id"].to_pylist()) for t in tables] == [{"run-b"}, {"run-c"}]
    served = {r["custom_id"]: r["response_text"] for t in tables for r in t.to_pylist()}
    assert served == {"h1": "k1 new", "h0": "k0 mid", "h0-twin": "k0 mid"}
    usage = pa.concat_tables(cache.served_entries(hits, None, NOW, ["model", "input_tokens"]))
    assert "response_text" not in usage.column_names and usage.num_rows == 3
    assert list(cache.served_entries(hits.slice(3), None, NOW)) == []  # only the prefix twin
    assert list(cache.served_entries(hits.slice(0, 0), None, NOW)) == []
    assert list(cache.served_entries(hits, 0.5, NOW)) == []  # every entry is older


def test_the_cache_on_s3_reads_its_segments_in_order(s3_env: str) -> None:
    """Index, served entries and prune over a moto S3 server, with more segments than are read at
    once (the reads overlap; their results keep the segments' order)."""
    spec = job().model_copy(update={"storage_root": f"s3://{s3_env}/root"})
    cache = ResultCache(ObjectStore(), spec.storage_root, spec, "test-api")
    schema = results_schema(spec.request)
    keys = [cache_key("/v1/chat/completions", str(i).encode()) for i in range(20)]
    for i, key in enumerate(keys):  # one entry a segment; the even ones 10 days old
        when = (NOW - timedelta(days=10 if i % 2 == 0 else 0)).isoformat()
        row = {"custom_id": f"r-{i}", "attempt": 1, "response_text": f"answer {i}"}
        cache.write_segment(
            f"s{i:02d}", [key], pa.Table.from_pylist([row], schema=schema), "r", when
        )
    assert len(cache.segments()) == 20 > 2 * 8
    assert len(cache.index(None, NOW)) == 20 and len(cache.index(5, NOW)) == 10
    hits = pa.table({"custom_id": [f"h{i}" for i in range(20)], "cache_key": key_array(keys)})
    served = [r for t in cache.served_entries(hits, None, NOW) for r in t.to_pylist()]
    assert [(r["custom_id"], r["response_text"]) for r in served] == [
        (f"h{i}", f"answer {i}") for i in range(20)
    ]
    assert cache.prune(older_than_days=5, now=NOW) == 10
    assert len(cache.segments()) == 10


def test_compaction_merges_segments_and_serves_the_same_entries(tmp_path: Path) -> None:
    """Five segments of two entries (one key twice, the newer entry in a later segment) become three
    of about three entries; the index and what is served do not change; the old segments go; a
    segment already large is left as it is. Pruning a merged segment keeps its younger entries."""
    spec = job()
    cache = ResultCache(ObjectStore(), str(tmp_path), spec, "test-api")
    schema = results_schema(spec.request)
    keys = [cache_key("/v1/chat/completions", str(i).encode()) for i in range(9)] + [b"k" * 16]
    for s in range(5):
        pair = [keys[2 * s], keys[2 * s + 1]] if s < 4 else [keys[0], keys[9]]  # keys[0] again
        rows = [{"custom_id": "r", "attempt": 1, "response_text": f"s{s} e{e}"} for e in range(2)]
        when = (NOW - timedelta(days=5 - s)).isoformat()
        cache.write_segment(f"s{s}", pair, pa.Table.from_pylist(rows, schema=schema), "r", when)
    hits = pa.table({"custom_id": [f"h{i}" for i in range(10)], "cache_key": key_array(keys)})

    def served() -> dict[str, str]:
        tables = cache.served_entries(hits, None, NOW)
        return {r["custom_id"]: r["response_text"] for t in tables for r in t.to_pylist()}

    before_index, before = cache.index(None, NOW).sorted_keys, served()
    assert before["h0"] == "s4 e0"  # the newer entry of keys[0]
    old = cache.segments()
    assert cache.compact(NOW, max_rows=3) == (5, 3)
    assert not set(old) & set(cache.segments()) and len(cache.segments()) == 3
    assert (cache.index(None, NOW).sorted_keys == before_index).all() and served() == before
    assert cache.compact(NOW, max_rows=3) == (3, 3)  # segments of 4, 4 and 2: one small one
    assert cache.compact(NOW) == (3, 1) and served() == before
    # pruning the merged segment (entries 5 to 1 days old) keeps its younger entries
    assert cache.prune(older_than_days=2.5, now=NOW) == 1
    assert served() == {"h0": "s4 e0", "h9": "s4 e1", "h6": "s3 e0", "h7": "s3 e1"}
    assert len(cache.segments()) == 1 and cache.prune(older_than_days=2.5, now=NOW) == 0


def test_the_cache_command_compacts_a_jobs_segments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        "name: j\nsource: {uri: s.parquet, id_column: id}\n"
        "request: {model: gpt-4o-mini, template: 'Say {t}', params: {max_tokens: 5}}\n"
        "output_uri: out\nstorage_root: state\n"
    )
    spec = JobSpec.from_yaml(spec_file)
    cache = ResultCache(ObjectStore(), spec.storage_root, spec, Settings.from_env().api_identity)
    row = {"custom_id": "r", "attempt": 1, "response_text": "x"}
    for s in range(4):
        key = cache_key("/v1/chat/completions", str(s).encode())
        table = pa.Table.from_pylist([row], schema=results_schema(spec.request))
        cache.write_segment(f"s{s}", [key], table, "r", NOW.isoformat())
    assert main(["cache", str(spec_file), "--compact"]) == 0
    out = capsys.readouterr().out
    assert "compacted 4 segment(s) into 1" in out and "4 entries in 1 segments" in out
    assert len(cache.segments()) == 1


def _one_entry_segments(cache: ResultCache, count: int) -> list[bytes]:
    schema = results_schema(cache.job.request)
    keys = [cache_key("/v1/chat/completions", str(i).encode()) for i in range(count)]
    for i, key in enumerate(keys):
        row = {"custom_id": f"r-{i}", "attempt": 1, "response_text": f"answer {i}"}
        table = pa.Table.from_pylist([row], schema=schema)
        cache.write_segment(f"s{i}", [key], table, "r", NOW.isoformat())
    return keys


def test_served_entries_survive_a_compaction_between_their_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load reads the winning rows segment by segment; a compaction that removes the segments it
    has not read yet makes it look the rest up again, and every hit is served once."""
    import tasks.cache

    monkeypatch.setattr(tasks.cache, "SEGMENT_READERS", 1)  # one segment read ahead
    cache = ResultCache(ObjectStore(), str(tmp_path), job(), "test-api")
    keys = _one_entry_segments(cache, 6)
    hits = pa.table({"custom_id": [f"h{i}" for i in range(6)], "cache_key": key_array(keys)})
    tables = cache.served_entries(hits, None, NOW)
    first = next(tables)
    assert cache.compact(NOW) == (6, 1)
    served = [r for t in [first, *tables] for r in t.to_pylist()]
    assert sorted((r["custom_id"], r["response_text"]) for r in served) == [
        (f"h{i}", f"answer {i}") for i in range(6)
    ]


def test_the_index_survives_a_segment_pruned_while_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ObjectStore()
    cache = ResultCache(store, str(tmp_path), job(), "test-api")
    keys = _one_entry_segments(cache, 4)
    read_table = store.read_table
    pruned: list[str] = []

    def read_while_pruning(uri: str, columns: list[str] | None = None) -> pa.Table:
        if not pruned:  # the first read: another process removes the last segment meanwhile
            pruned.append(cache.segments()[-1])
            store.remove(pruned[0])
        return read_table(uri, columns)

    monkeypatch.setattr(store, "read_table", read_while_pruning)
    index = cache.index(None, NOW)
    assert len(index) == 3 and index.contains(keys).tolist() == [True, True, True, False]


def test_api_identities_are_stable_names_of_base_urls() -> None:
    from schemas.lineage import api_identity

    assert api_identity(None) == "api.openai.com"
    assert api_identity("https://api.openai.com/v1") == "api.openai.com"
    assert api_identity("https://api.openai.com/v1/") == "api.openai.com"
    assert (
        api_identity("https://MyRes.openai.azure.com/openai/v1") == "myres.openai.azure.com/openai"
    )
    assert api_identity("http://127.0.0.1:8089/v1") == "127.0.0.1:8089"
    assert api_identity("https://llm.example.com:443/v1") == "llm.example.com"
    assert api_identity("http://127.0.0.1:8089/v1") != api_identity("http://127.0.0.1:8090/v1")


def test_each_api_has_its_own_cache_namespace() -> None:
    spec = job()
    assert namespace(spec, "emulator") != namespace(spec, "api.openai.com")
    assert namespace(spec, "emulator").startswith("emulator--gpt-4o-mini-")
