"""Sampled token counting: its real error, measured on realistic text of several shapes, stays within
the documented bound (tasks.tokens.SAMPLED_ERROR_BOUND), and what admission control and the budget
gate see (shard totals, the job total) is never below the exact count."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.synth import SHAPES, product_chunk, texts
from schemas.job import JobSpec
from tasks import tokens
from tasks.layout import RunLayout
from tasks.prepare import write_shards
from tasks.storage import ObjectStore
from tasks.tokens import (
    SAMPLE_BLOCK_ROWS,
    SAMPLED_ERROR_BOUND,
    count_request_tokens,
    count_text,
    count_texts,
    encoding_for_model,
    estimate_text_tokens,
    sample_rows,
)

BATCH = 2 * SAMPLE_BLOCK_ROWS
WINDOWS = (1_000, 5_000)  # runs of consecutive rows the bound is checked on (any shard is one)


CORPUS = {"corpus_seed": 77, "corpus_words": 150_000}


@cache
def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, exact tokens) of each text of a named data set; seeds differ from the ones the
    estimator was tuned on."""
    rows = 2 * BATCH
    if name.startswith("sorted-mix") or name.startswith("interleaved-mix"):
        parts = [texts(shape, rows // len(SHAPES), 101, 500.0, **CORPUS) for shape in SHAPES]
        data = [t for part in parts for t in part]
        if name.startswith("interleaved"):
            order = np.random.default_rng(4).permutation(len(data))
            data = [data[i] for i in order]
    else:
        shape, mean = name.rsplit("-", 1)
        data = texts(shape, rows, 78, float(mean), **CORPUS)
    raw = [t.encode() for t in data]
    encoding = encoding_for_model("gpt-4o-mini")
    return np.array([len(t) for t in raw], np.int64), count_texts(encoding, raw)


def _estimate(lengths: np.ndarray, exact: np.ndarray, bound: float) -> np.ndarray:
    """The sampled estimate, batch by batch as prepare makes it, with `bound` as the inflation."""
    out = np.zeros(len(lengths), np.int64)
    saved = tokens.SAMPLED_ERROR_BOUND
    tokens.SAMPLED_ERROR_BOUND = bound
    try:
        for start in range(0, len(lengths), BATCH):
            part, truth = lengths[start : start + BATCH], exact[start : start + BATCH]
            rows = sample_rows(part)
            estimate, recount = estimate_text_tokens(part, rows, truth[rows])
            estimate[recount] = truth[recount]
            out[start : start + BATCH] = estimate
    finally:
        tokens.SAMPLED_ERROR_BOUND = saved
    return out


def _window_errors(estimate: np.ndarray, exact: np.ndarray, window: int) -> np.ndarray:
    starts = range(0, len(exact) - window + 1, window // 4)
    return np.array(
        [estimate[s : s + window].sum() / exact[s : s + window].sum() - 1 for s in starts]
    )


# mean characters: ~60 and ~350 tokens a row (CJK: 3 bytes a character, so fewer)
DATASETS = [
    f"{shape}-{mean}" for shape in SHAPES for mean in (250, 1200 if shape != "cjk" else 400)
]
DATASETS += ["sorted-mix", "interleaved-mix"]


def test_counting_bytes_equals_counting_text() -> None:
    encoding = encoding_for_model("gpt-4o-mini")
    for shape in SHAPES:
        sample = texts(shape, 50, 3, 400.0, **CORPUS) + ["", "é", "😀" * 3, "a\nb"]
        expected = [count_text(encoding, t) for t in sample]
        assert count_texts(encoding, [t.encode() for t in sample]).tolist() == expected


@pytest.mark.parametrize("name", DATASETS)
def test_sampled_error_stays_within_the_bound(name: str) -> None:
    lengths, exact = _dataset(name)
    raw = _estimate(lengths, exact, 0.0)
    reported = _estimate(lengths, exact, SAMPLED_ERROR_BOUND)
    for window in WINDOWS:
        errors = _window_errors(raw, exact, window)
        assert np.abs(errors).max() <= SAMPLED_ERROR_BOUND, (
            name,
            window,
            errors.min(),
            errors.max(),
        )
        inflated = _window_errors(reported, exact, window)
        assert inflated.min() >= 0, (name, window, inflated.min())
        assert inflated.max() <= 3 * SAMPLED_ERROR_BOUND, (name, window, inflated.max())
        assert len(errors) >= 10
    assert exact.sum() <= reported.sum() <= exact.sum() * (1 + 2 * SAMPLED_ERROR_BOUND)


def test_short_texts_and_small_batches_are_counted_exactly() -> None:
    lengths, exact = _dataset("english-250")
    short = np.minimum(lengths, 12)
    assert len(sample_rows(short)) == len(short)  # 12-byte rows: every one counted
    small = lengths[:100]
    assert len(sample_rows(small)) == 100
    assert len(sample_rows(lengths[:BATCH])) < BATCH // 10


def _job(tmp_path: Path, counting: str, **limits: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": f"tokens-{counting}",
            "source": {"uri": str(tmp_path / "products.parquet"), "id_column": "sku"},
            "request": {
                "model": "gpt-4o-mini",
                "system_prompt": "Summarise the product.",
                "template": "{title}\n\n{description}",
                "params": {"max_tokens": 50},
            },
            "output_uri": str(tmp_path / "out"),
            "storage_root": str(tmp_path / "state"),
            "limits": {"token_counting": counting, **limits},
        }
    )


def _exact_shard_tokens(uri: str) -> int:
    with open(uri, "rb") as handle:
        return sum(
            count_request_tokens(line["url"], line["body"]) for line in map(orjson.loads, handle)
        )


@pytest.mark.parametrize(
    ("counting", "limits"),
    [
        ("exact", {"max_lines_per_shard": 6000}),
        ("sampled", {"max_lines_per_shard": 6000}),
        ("auto", {"exact_token_counting_rows": 5000, "max_enqueued_tokens": 1_500_000}),
    ],
)
def test_shard_token_counts_are_exact_or_never_below_exact(
    tmp_path: Path, counting: str, limits: dict[str, Any]
) -> None:
    pq.write_table(product_chunk(0, 20_000, 3, mean_chars=300.0), tmp_path / "products.parquet")
    job = _job(tmp_path, counting, **limits)
    result = write_shards(job, ObjectStore(), RunLayout(job.storage_root, job.name, "2026-01-01"))
    assert result.rows == 20_000 and len(result.shards) > 1
    assert result.tokens_exact is (counting == "exact")
    for shard in result.shards:
        exact = _exact_shard_tokens(shard.request_uri)
        if counting == "exact":
            assert shard.input_tokens == exact
        else:  # what admission control sums: never an undercount, never far above
            assert exact <= shard.input_tokens <= exact * (1 + 2 * SAMPLED_ERROR_BOUND)
        if job.limits.max_enqueued_tokens:
            assert shard.input_tokens <= job.limits.max_enqueued_tokens


def test_auto_is_exact_for_small_jobs(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"sku": ["a", "b"], "title": ["x", "y"], "description": ["d", None]}),
        tmp_path / "products.parquet",
    )
    job = _job(tmp_path, "auto")
    result = write_shards(job, ObjectStore(), RunLayout(job.storage_root, job.name, "2026-01-01"))
    assert result.tokens_exact
    assert result.shards[0].input_tokens == _exact_shard_tokens(result.shards[0].request_uri)


def test_shard_token_counts_of_an_incremental_night_never_undercount(tmp_path: Path) -> None:
    """With most requests cached (all but the shortest fifth), the shards of the misses carry
    sampled estimates taken from whole batches at their rows: never below the exact count, never
    far above."""
    from tasks.cache import CacheIndex, cache_key_from_line

    pq.write_table(product_chunk(0, 20_000, 3, mean_chars=300.0), tmp_path / "products.parquet")
    job = _job(tmp_path, "sampled", max_lines_per_shard=2000)
    store = ObjectStore()
    night1 = write_shards(job, store, RunLayout(job.storage_root, job.name, "2026-01-01"))
    lines = []
    for shard in night1.shards:
        with open(shard.request_uri, "rb") as handle:
            lines += list(handle)
    short = np.quantile([len(line) for line in lines], 0.2)  # the short rows are the misses
    cached = [cache_key_from_line(line) for line in lines if len(line) > short]
    night2 = write_shards(
        job,
        store,
        RunLayout(job.storage_root, job.name, "2026-01-02"),
        cache_index=CacheIndex.from_keys(cached),
    )
    assert night2.cache_hits == len(cached)
    assert sum(s.lines for s in night2.shards) == 20_000 - len(cached)
    for shard in night2.shards:
        exact = _exact_shard_tokens(shard.request_uri)
        assert exact <= shard.input_tokens <= exact * (1 + 2 * SAMPLED_ERROR_BOUND)
