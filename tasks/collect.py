"""collect: stream a terminal batch's output and error files into results/errors Parquet.

Both files are optional (null when empty, or when every line failed). Lines are joined on custom_id
against the shard's id sidecar, so lines that never came back are found and recorded as `missing`.

Memory stays bounded whatever the file size (an embeddings output file is GBs): each file is spooled
to local disk, then read in chunks of about CHUNK_BYTES; each chunk is parsed into Arrow columns
(`LineParser.read_lines` / `parse_table`, on background threads) and appended to the
Parquet file as a row group; which lines count (the first line of each id the shard sent) is decided
in file order on the calling thread."""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import repeat
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.job import JobSpec
from schemas.manifest import Shard, ShardCounts
from schemas.tables import ERRORS_SCHEMA, results_schema
from tasks.batch_api import BatchApi
from tasks.cache import CacheWrite, ResultCache, cache_shard_results
from tasks.errors import ProviderFileGoneError
from tasks.layout import RunLayout
from tasks.parse import LineParser, ParsedLines
from tasks.storage import ObjectStore

FLUSH_ROWS = 2000
CHUNK_BYTES = 4 << 20  # a chunk of an output file parsed at once
READ_AHEAD = 2  # chunks parsed ahead, on READ_THREADS other threads
READ_THREADS = 2
WRITE_AHEAD = 2  # tables queued for a sink's writer thread

log = logging.getLogger("nightbatch.collect")


class _TableSink:
    """Buffers rows and writes them to one Parquet file in row groups, on a background thread
    (Parquet encoding and compression release the GIL), at most WRITE_AHEAD tables queued."""

    def __init__(self, handle: IO[bytes], schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = pq.ParquetWriter(handle, schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nightbatch-sink")
        self.pending: deque[Future[None]] = deque()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()

    def add_table(self, table: pa.Table) -> None:
        if table.num_rows:
            self.flush()
            self._write(table)
            self.count += table.num_rows

    def flush(self) -> None:
        if self.rows:
            self._write(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def _write(self, table: pa.Table) -> None:
        self.pending.append(self.pool.submit(self.writer.write_table, table))
        while len(self.pending) > WRITE_AHEAD:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            self.flush()
            while self.pending:
                self.pending.popleft().result()
            self.writer.close()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _iter_chunks(handle: IO[bytes], size: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The file in pieces of about `size` bytes, each ending at the end of a line. Each piece is a
    view of a fresh buffer the file is read into: no copy, and no buffer is reused while a piece
    may still be parsed on another thread."""
    handle.seek(0)
    rest = b""
    while True:
        block = bytearray(len(rest) + size)
        block[: len(rest)] = rest
        got = handle.readinto(memoryview(block)[len(rest) :])  # type: ignore[attr-defined]
        if not got:
            break
        end = len(rest) + got
        cut = block.rfind(b"\n", 0, end) + 1
        rest = bytes(block[cut:end])
        if cut:
            yield memoryview(block)[:cut]
    if rest.strip():
        yield memoryview(rest)


class _Expected:
    """The shard's custom_ids, and which of them a line was already kept for: a line counts only
    if its custom_id belongs to the shard and is not a repeat (the first one wins)."""

    def __init__(self, custom_ids: list[str]) -> None:
        self.ids = custom_ids
        self.index: dict[str | None, int] = {cid: i for i, cid in enumerate(custom_ids)}
        self.seen = np.zeros(len(custom_ids), bool)

    def keep(self, custom_id: Any) -> bool:
        i = self.index.get(custom_id) if isinstance(custom_id, str) else None
        if i is None or self.seen[i]:
            return False
        self.seen[i] = True
        return True

    def keep_all(self, custom_ids: list[str | None]) -> np.ndarray:
        """`keep` of each custom_id (a string or None) in order, vectorised: the index lookups run
        in C (`map` over `dict.get`), repeats within the list and of earlier lists are found with
        numpy."""
        n = len(custom_ids)
        if not n:
            return np.zeros(0, bool)
        found = np.fromiter(map(self.index.get, custom_ids, repeat(-1, n)), np.int64, n)
        known = np.flatnonzero(found >= 0)
        positions = found[known]
        _, first = np.unique(positions, return_index=True)  # the first line of each custom_id
        fresh = known[first][~self.seen[positions[first]]]
        self.seen[found[fresh]] = True
        keep = np.zeros(n, bool)
        keep[fresh] = True
        return keep

    def never_seen(self) -> list[str]:
        return [self.ids[i] for i in np.flatnonzero(~self.seen)]


def batch_failure(shard: Shard) -> tuple[str, str, bool]:
    """Code, message and retryability of a batch that failed validation."""
    errors = shard.batch_errors or [{"code": "batch_failed", "message": "batch failed"}]
    first = errors[0]
    code = str(first.get("code") or "batch_failed")
    message = "; ".join(
        f"line {e.get('line')}: {e.get('message')}" if e.get("line") else str(e.get("message"))
        for e in errors[:5]
    )
    return code, message, code == "token_limit_exceeded"


def collect_shard(
    job: JobSpec,
    layout: RunLayout,
    shard: Shard,
    store: ObjectStore,
    api: BatchApi,
    cache_write: CacheWrite | None = None,
) -> tuple[str, str, ShardCounts]:
    """Parse one terminal shard; returns (results_uri, errors_uri, counts). With `cache_write` and
    the job's cache on, its succeeded results are added to the cache as one segment named after the
    run and shard (rewritten, not added twice, when a shard is collected again)."""
    assert shard.batch_id is not None
    sidecar = store.read_table(layout.ids_file(shard.attempt, shard.index))  # ids (and cache keys)
    expected = [str(v) for v in sidecar.column("custom_id").to_pylist()]
    parser = LineParser(job.request, shard.attempt, shard.batch_id)
    results_uri = layout.results_file(shard.attempt, shard.index)
    errors_uri = layout.errors_file(shard.attempt, shard.index)
    lines = _Expected(expected)
    counts = ShardCounts(lines=len(expected))
    with ExitStack() as stack:
        results = _TableSink(
            stack.enter_context(store.open_atomic(results_uri)), results_schema(job.request)
        )
        errors = _TableSink(stack.enter_context(store.open_atomic(errors_uri)), ERRORS_SCHEMA)
        for sink in (results, errors):
            stack.callback(sink.pool.shutdown, cancel_futures=True)
        if shard.batch_status == "failed":
            code, message, retryable = batch_failure(shard)
            for custom_id in expected:
                errors.add(parser.batch_failed(custom_id, code, message, retryable))
            lines.keep_all(list(expected))
            counts.retryable += len(expected) if retryable else 0
        for file_id in (shard.output_file_id, shard.error_file_id):
            if not file_id:
                continue
            spool = stack.enter_context(tempfile.TemporaryFile())
            try:
                api.download(file_id, spool)
            except ProviderFileGoneError:  # its lines are never seen: missing, and sent again
                log.warning(
                    "shard %s: file %s of batch %s is no longer at the provider; its lines count "
                    "as missing and are sent again", shard.shard_id, file_id, shard.batch_id,
                )  # fmt: skip
                continue
            for chunk, parsed in _read_ahead(parser, _iter_chunks(spool)):
                for row in _collect_chunk(parser, chunk, parsed, lines, results):
                    errors.add(row)
                    counts.retryable += 1 if row["retryable"] else 0
        for custom_id in lines.never_seen():
            errors.add(parser.missing(custom_id))
            counts.missing += 1
            counts.retryable += 1
        results.close()
        errors.close()
    counts.succeeded = results.count
    counts.failed = errors.count
    if cache_write is not None and job.cache.enabled:
        cache_shard_results(
            ResultCache(store, job.storage_root, job, cache_write.api), store, results_uri, sidecar,
            shard.request_uri, f"{cache_write.run_id}-{shard.shard_id}", cache_write.run_id,
            cache_write.created_at,
        )  # fmt: skip
    return results_uri, errors_uri, counts


def _read_ahead(
    parser: LineParser, chunks: Iterator[memoryview]
) -> Iterator[tuple[memoryview, ParsedChunk | None]]:
    """Each chunk with its lines read and parsed (`_parse_chunk`) on background threads, READ_AHEAD
    chunks ahead: Arrow's JSON reader and kernels release the GIL, so they overlap the rest."""
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="nightbatch-collect") as pool:
        pending: deque[tuple[memoryview, Future[ParsedChunk | None]]] = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_parse_chunk, parser, chunk)))
            if len(pending) > READ_AHEAD:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


@dataclass
class ParsedChunk:
    custom_ids: list[str | None]  # of every line, in order
    parsed: ParsedLines


def _parse_chunk(parser: LineParser, chunk: memoryview) -> ParsedChunk | None:
    """Every line of a chunk parsed (`LineParser.parse_table`), or None when Arrow cannot
    read it (then it is parsed line by line). Pure: which lines count is decided in order, later."""
    table = parser.read_lines(chunk)
    if table is None:
        return None
    return ParsedChunk(table.column("custom_id").to_pylist(), parser.parse_table(table))


def _collect_chunk(
    parser: LineParser,
    chunk: memoryview,
    parsed: ParsedChunk | None,
    lines: _Expected,
    results: _TableSink,
) -> list[dict[str, Any]]:
    """Keep the lines of a chunk that count: results go to the sink, error rows are returned."""
    if parsed is None:  # a line of another shape: this chunk line by line
        errors = []
        for line in (orjson.loads(raw) for raw in bytes(chunk).split(b"\n") if raw.strip()):
            if lines.keep(line.get("custom_id")):
                kind, row = parser.parse(line)
                if kind == "result":
                    results.add(row)
                else:
                    errors.append(row)
        return errors
    kept = parsed.parsed.kept(lines.keep_all(parsed.custom_ids))
    results.add_table(kept.results)
    return kept.errors
