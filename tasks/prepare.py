"""prepare: stream the source table, render one request per row, pack shards of JSONL.

Validates the job against the data first (tasks.sourcecheck) and raises BadInputError, naming the
problem and the fix, before anything is written to the run or sent anywhere. Rows that cannot
succeed (tasks.rowgate) are not sent: they go to the run's rejected file, and from there to the
dead letter.

The source is streamed in record batches (tasks.source) and never held whole. Each batch is rendered column-wise (`RequestRenderer.render_batch`);
its tokens are counted on a thread pool while the next batch renders; shard files are written on one
background thread and hashed on another. Both cores are busy: the Parquet decoder, Arrow's kernels,
tiktoken, file writes and sha256 all release the GIL."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Empty, Full, Queue
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from schemas.job import JobSpec
from schemas.manifest import Shard
from schemas.tables import IDS_SCHEMA, IDS_WITH_KEYS_SCHEMA
from tasks.cache import CacheIndex, HitRecorder, key_array
from tasks.errors import BadInputError
from tasks.layout import RunLayout
from tasks.refusals import RowGate
from tasks.render import RenderedBatch, RequestRenderer, concat_rendered, custom_id_for
from tasks.source import (
    RENDER_BATCH_ROWS,
    checked_source,
    count_selected,
    iter_source_batches,
    merge_small_batches,
)
from tasks.sourcecheck import check_ids, filter_columns
from tasks.storage import ObjectStore
from tasks.tokens import TextTokenCounter, count_request_tokens, count_requests_tokens

SCAN_AHEAD = 2  # batches read ahead of rendering (on the scan thread)
WRITE_BEHIND_CHUNKS = 3  # chunks queued for the background writer: bounds the write's memory
RENDER_THREADS = 2
RENDER_AHEAD = 2  # rendered batches waiting to be packed: bounds the render's memory


def read_ahead(batches: Iterator[pa.RecordBatch], depth: int) -> Iterator[pa.RecordBatch]:
    """`batches`, produced on a background thread at most `depth` ahead (Parquet decoding releases
    the GIL, so the scan overlaps the rest). Errors are re-raised here; closing stops the thread."""
    queue: Queue[tuple[str, Any]] = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        queue.put(("batch", batch), timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
            queue.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put(("error", exc))

    thread = threading.Thread(target=produce, name="nightbatch-scan", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(Empty):
                queue.get(timeout=0.1)


class WriteBehind:
    """Runs write jobs in order on one background thread and hash jobs in order on another, at most
    WRITE_BEHIND_CHUNKS of each queued (file writes and sha256 release the GIL, so they overlap
    rendering and each other). Errors surface on the next call."""

    def __init__(self) -> None:
        self.writes = ThreadPoolExecutor(1, thread_name_prefix="nightbatch-write")
        self.hashes = ThreadPoolExecutor(1, thread_name_prefix="nightbatch-hash")
        self.pending: deque[Future[object]] = deque()

    def submit(self, write: Callable[[], object], digest: Callable[[], None]) -> None:
        self.pending.append(self.writes.submit(write))
        self.pending.append(self.hashes.submit(digest))
        while len(self.pending) > 2 * WRITE_BEHIND_CHUNKS:
            self.pending.popleft().result()

    def then(self, write: Callable[[], object]) -> None:
        """A write job with no bytes to hash (it runs after every write submitted before it)."""
        self.pending.append(self.writes.submit(write))

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.writes.shutdown(wait=True, cancel_futures=True)
            self.hashes.shutdown(wait=True, cancel_futures=True)


@dataclass
class ShardWriter:
    """Writes one shard: its JSONL request file (atomically) and its id sidecar: each line's
    custom_id and, when every line was given one, its cache key."""

    store: ObjectStore
    layout: RunLayout
    attempt: int
    index: int
    handle: IO[bytes]
    lines: int = 0
    bytes: int = 0
    input_tokens: int = 0
    custom_ids: list[str] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    behind: WriteBehind | None = None
    id_chunks: list[pa.Array] = field(default_factory=list)
    keys: list[builtins.bytes] = field(default_factory=list)
    key_chunks: list[pa.Array] = field(default_factory=list)
    keyless: bool = False  # a line came without its cache key: the sidecar holds ids only

    def _emit(self, data: builtins.bytes | memoryview) -> None:
        if self.behind is None:
            self._write(data)
        else:
            self.behind.submit(lambda: self.handle.write(data), lambda: self.digest.update(data))

    def _write(self, data: builtins.bytes | memoryview) -> None:
        self.handle.write(data)
        self.digest.update(data)

    def add(
        self, custom_id: str, line: builtins.bytes, tokens: int, key: builtins.bytes | None
    ) -> None:
        self._emit(line)
        self.lines += 1
        self.bytes += len(line)
        self.input_tokens += tokens
        self.custom_ids.append(custom_id)
        self._keep_keys(None if key is None else [key])

    def add_chunk(
        self,
        custom_ids: pa.Array,
        data: builtins.bytes | memoryview,
        tokens: int,
        keys: pa.Array | None,
    ) -> None:
        """Many lines at once: `data` is their JSONL bytes, `custom_ids` their ids in order (and
        `keys` their cache keys)."""
        self._emit(data)
        self._flush_ids()
        self.id_chunks.append(custom_ids)
        self.lines += len(custom_ids)
        self.bytes += len(data)
        self.input_tokens += tokens
        self._keep_keys(keys)

    def _keep_keys(self, keys: list[builtins.bytes] | pa.Array | None) -> None:
        if keys is None:
            self.keyless = True
        elif isinstance(keys, list):
            self.keys += keys
        else:
            self._flush_keys()
            self.key_chunks.append(keys)

    def _flush_ids(self) -> None:
        if self.custom_ids:
            self.id_chunks.append(pa.array(self.custom_ids, pa.string()))
            self.custom_ids = []

    def _flush_keys(self) -> None:
        if self.keys:
            self.key_chunks.append(key_array(self.keys))
            self.keys = []

    def sidecar(self) -> None:
        self._flush_ids()
        ids = pa.concat_arrays(self.id_chunks) if self.id_chunks else pa.array([], pa.string())
        columns = {"custom_id": ids.cast(pa.string())}
        schema = IDS_SCHEMA
        if self.lines and not self.keyless:
            self._flush_keys()
            columns["cache_key"] = pa.concat_arrays(self.key_chunks)
            schema = IDS_WITH_KEYS_SCHEMA
        table = pa.table(columns, schema=schema)
        self.store.write_table(self.layout.ids_file(self.attempt, self.index), table)
        self.id_chunks, self.key_chunks = [], []  # a closed shard keeps only its counts and digest

    def shard(self) -> Shard:
        return Shard(
            shard_id=f"a{self.attempt}-s{self.index:05d}",
            attempt=self.attempt,
            index=self.index,
            request_uri=self.layout.request_file(self.attempt, self.index),
            lines=self.lines,
            bytes=self.bytes,
            input_tokens=self.input_tokens,
            embedding_inputs=self.lines,
            sha256=self.digest.hexdigest(),
        )


class ShardPacker:
    """Packs lines into shards under the job's limits (lines, bytes, embedding inputs)."""

    def __init__(self, job: JobSpec, store: ObjectStore, layout: RunLayout, attempt: int) -> None:
        limits = job.limits
        self.max_lines = limits.max_lines_per_shard
        if job.request.endpoint == "/v1/embeddings":
            self.max_lines = min(self.max_lines, limits.max_embedding_inputs_per_shard)
        self.max_bytes = limits.max_bytes_per_shard
        self.max_tokens = limits.max_enqueued_tokens
        self.store = store
        self.layout = layout
        self.attempt = attempt
        self.shards: list[Shard] = []
        self._closed: list[ShardWriter] = []
        self._writer: ShardWriter | None = None
        self._context: Any = None
        self._behind: WriteBehind | None = None

    def _open(self) -> ShardWriter:
        index = len(self._closed)
        self._context = self.store.open_atomic(self.layout.request_file(self.attempt, index))
        handle = self._context.__enter__()
        self._writer = ShardWriter(
            self.store, self.layout, self.attempt, index, handle, behind=self._behind
        )
        return self._writer

    def _close(self) -> None:
        """Commit the open shard's file and write its sidecar: at once, or, when its lines are
        written behind, on the write thread after them (packing goes on meanwhile)."""
        writer, context = self._writer, self._context
        if writer is None:
            return
        self._writer = None
        self._closed.append(writer)

        def commit() -> None:
            context.__exit__(None, None, None)
            writer.sidecar()

        if self._behind is None:
            commit()
        else:
            self._behind.then(commit)

    def _too_big(self, custom_id: str, size: int) -> BadInputError:
        return BadInputError(
            f"the request for row {custom_id!r} is {size:,} bytes, more than a whole "
            f"shard may hold ({self.max_bytes:,} bytes). Shorten that row's text or filter it out."
        )

    def _too_many_tokens(self, custom_id: str, tokens: int) -> BadInputError:
        return BadInputError(
            f"the request for row {custom_id!r} has {tokens:,} input tokens, more than "
            f"limits.max_enqueued_tokens ({self.max_tokens:,}): it could never be queued. "
            "Shorten that row's text or filter it out."
        )

    def add(self, custom_id: str, line: bytes, tokens: int, key: bytes | None = None) -> None:
        """One line (with its cache key, when the cache is on)."""
        if len(line) > self.max_bytes:
            raise self._too_big(custom_id, len(line))
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise self._too_many_tokens(custom_id, tokens)
        writer = self._writer or self._open()
        if (
            writer.lines >= self.max_lines
            or writer.bytes + len(line) > self.max_bytes
            or (self.max_tokens is not None and writer.input_tokens + tokens > self.max_tokens)
        ):
            self._close()
            writer = self._open()
        writer.add(custom_id, line, tokens, key)

    def add_rendered(self, rendered: RenderedBatch, tokens: np.ndarray) -> None:
        """Every line of a rendered batch, in order, packed exactly as `add` would pack them one by
        one, but a shard's worth of lines at a time (written behind, on another thread)."""
        lengths = rendered.lengths
        self._check_rows(rendered, tokens)
        if self._behind is None:
            self._behind = WriteBehind()
            if self._writer is not None:
                self._writer.behind = self._behind
        start = 0
        while start < len(rendered):
            writer = self._writer or self._open()
            take = self._room(writer, lengths[start:], tokens[start:])
            if take == 0:
                self._close()
                continue
            stop = start + take
            writer.add_chunk(
                rendered.custom_ids.slice(start, take),
                rendered.chunk(start, stop),
                int(tokens[start:stop].sum()),
                rendered.keys.slice(start, take) if rendered.keys is not None else None,
            )
            start = stop

    def _check_rows(self, rendered: RenderedBatch, tokens: np.ndarray) -> None:
        too_big = rendered.lengths > self.max_bytes
        too_many = tokens > self.max_tokens if self.max_tokens is not None else too_big
        bad = np.flatnonzero(too_big | too_many)
        if len(bad):
            i = int(bad[0])
            custom_id = str(rendered.custom_ids[i].as_py())
            if too_big[i]:
                raise self._too_big(custom_id, int(rendered.lengths[i]))
            raise self._too_many_tokens(custom_id, int(tokens[i]))

    def _room(self, writer: ShardWriter, lengths: np.ndarray, tokens: np.ndarray) -> int:
        """How many of the next lines fit in the open shard."""
        take = min(self.max_lines - writer.lines, len(lengths))
        if take <= 0:
            return 0
        fits = np.cumsum(lengths[:take]) <= self.max_bytes - writer.bytes
        take = int(np.argmin(fits)) if not fits.all() else take
        if self.max_tokens is not None and take:
            fits = np.cumsum(tokens[:take]) <= self.max_tokens - writer.input_tokens
            take = int(np.argmin(fits)) if not fits.all() else take
        return take

    def finish(self) -> list[Shard]:
        try:
            self._close()
        finally:
            if self._behind is not None:
                self._behind.close()
        self.shards = [writer.shard() for writer in self._closed]  # their digests are complete
        return self.shards

    def abort(self) -> None:
        if self._behind is not None:
            with contextlib.suppress(Exception):  # the original error is the one to report
                self._behind.close()
        if self._writer is not None:
            self._context.__exit__(BadInputError, BadInputError("aborted"), None)
            self._writer = None


@dataclass
class PrepareResult:
    shards: list[Shard]
    rows: int
    tokens_exact: bool = True  # False: shard input_tokens are sampled estimates (see tasks.tokens)
    cache_hits: int = 0  # rows served from the result cache: recorded in hits_uri, not in any shard
    refused: int = 0  # rows not sent: they cannot succeed (tasks.rowgate), in refused_uri
    refused_uri: str | None = None


def _duplicate_ids(hashes: np.ndarray) -> np.ndarray:
    ordered = np.sort(hashes)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def sampled_token_counting(job: JobSpec, dataset: ds.Dataset, expr: ds.Expression | None) -> bool:
    """Whether prepare estimates tokens from a sample (limits.token_counting) rather than counting
    every request exactly."""
    mode = job.limits.token_counting
    if mode != "auto":
        return mode == "sampled"
    return count_selected(dataset, expr) > job.limits.exact_token_counting_rows


class RequestTokens:
    """Input tokens of rendered batches, by the rule of `tasks.tokens`: on the framed path a
    constant (everything but the row's text, counted once) plus the text's tokens, counted on a
    thread pool, exactly or by sample; on the per-row path, each body counted exactly."""

    def __init__(self, renderer: RequestRenderer, sampled: bool) -> None:
        self.renderer = renderer
        self.counter = TextTokenCounter(renderer.spec.model, sampled)
        self._base: int | None = None

    def base(self) -> int:
        if self._base is None:
            body = self.renderer.body_for_text("")
            self._base = count_request_tokens(self.renderer.endpoint, body)
        return self._base

    def submit(self, rendered: RenderedBatch) -> Callable[[], np.ndarray]:
        """Start counting; the returned function waits for and returns each line's tokens."""
        if rendered.bodies is not None:
            bodies = rendered.bodies
            endpoint = self.renderer.endpoint
            future = self.counter.pool.submit(
                lambda: np.array(count_requests_tokens(endpoint, bodies, threads=1), np.int64)
            )
            return future.result
        assert rendered.texts is not None and rendered.text_lengths is not None
        texts = self.counter.submit(rendered.texts, rendered.text_lengths)
        return lambda: texts() + self.base()

    def close(self) -> None:
        self.counter.close()


class MissBuffer:
    """The rows a cache lookup left to send, gathered (in order) into batches of RENDER_BATCH_ROWS
    before their tokens are counted: a sampled count of the misses' own population stays within
    its bound whichever rows missed, and a batch of a few rows would be counted row by row."""

    def __init__(
        self, tokens: RequestTokens, pack: Callable[[RenderedBatch, np.ndarray], None]
    ) -> None:
        self.tokens = tokens
        self.pack = pack
        self.held: list[RenderedBatch] = []
        self.rows = 0
        self.counting: deque[tuple[RenderedBatch, Callable[[], np.ndarray]]] = deque()

    def add(self, rendered: RenderedBatch) -> None:
        if len(rendered):
            self.held.append(rendered)
            self.rows += len(rendered)
        if self.rows >= RENDER_BATCH_ROWS:
            self._count()
        while len(self.counting) > 1:  # one batch counting while the one before is packed
            self._pack()

    def finish(self) -> None:
        self._count()
        while self.counting:
            self._pack()

    def _count(self) -> None:
        if self.held:
            merged = concat_rendered(self.held)
            self.counting.append((merged, self.tokens.submit(merged)))
            self.held, self.rows = [], 0

    def _pack(self) -> None:
        rendered, counted = self.counting.popleft()
        self.pack(rendered, counted())


def _id_hashes(custom_ids: pa.Array) -> np.ndarray:
    values = custom_ids.to_pylist()
    return np.fromiter(map(hash, values), np.int64, len(values))


def write_shards(
    job: JobSpec,
    store: ObjectStore,
    layout: RunLayout,
    attempt: int = 1,
    cache_index: CacheIndex | None = None,
) -> PrepareResult:
    """Validate, render and pack every selected row. Raises BadInputError on bad input.

    A small pipeline, in source order: the scanner decodes batches (Arrow threads), RENDER_THREADS
    render them (Arrow kernels, GIL released), tokens are counted on the counter's threads, and the
    packer writes shards behind, on its own thread. At most RENDER_AHEAD batches are in flight."""
    source = checked_source(job, store)
    dataset, columns, expression = source.dataset, source.columns, source.expression
    renderer = RequestRenderer(job.request)
    sampled = sampled_token_counting(job, dataset, expression)
    tokens = RequestTokens(renderer, sampled)
    packer = ShardPacker(job, store, layout, attempt)
    gate = RowGate(job, renderer, sampled)

    def pack(rendered: RenderedBatch, counted: np.ndarray) -> None:
        packer.add_rendered(*gate.split(rendered, counted))

    render_pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="nightbatch-render")
    id_column = job.source.id_column
    hashes: list[np.ndarray] = []
    rows = 0
    in_flight: deque[Future[tuple[RenderedBatch, Callable[[], np.ndarray] | None, pa.Array]]]
    in_flight = deque()
    hits_file = contextlib.ExitStack()
    hits: HitRecorder | None = None
    misses: MissBuffer | None = None
    if cache_index is not None and len(cache_index):
        hits = HitRecorder(
            cache_index, hits_file.enter_context(store.open_atomic(layout.cache_hits))
        )
        misses = MissBuffer(tokens, pack)

    def render(
        batch: pa.RecordBatch,
    ) -> tuple[RenderedBatch, Callable[[], np.ndarray] | None, pa.Array]:
        rendered = renderer.render_batch(batch, id_column)
        every_id = rendered.custom_ids
        if hits is None:
            return rendered, tokens.submit(rendered), every_id
        # rows whose exact request succeeded before are not sent
        return hits.misses(rendered), None, every_id

    def pack_oldest() -> None:
        rendered, counted, every_id = in_flight.popleft().result()
        hashes.append(_id_hashes(every_id))
        if counted is not None:
            pack(rendered, counted())
        else:
            assert misses is not None
            misses.add(rendered)

    try:
        scan = iter_source_batches(dataset, columns, expression, source.filter_on)
        for batch in read_ahead(merge_small_batches(scan), SCAN_AHEAD):
            check_ids(batch, id_column)
            in_flight.append(render_pool.submit(render, batch))
            rows += batch.num_rows
            if len(in_flight) > RENDER_AHEAD:
                pack_oldest()
        while in_flight:
            pack_oldest()
        if misses is not None:
            misses.finish()
        dupes = _duplicate_ids(np.concatenate(hashes)) if hashes else np.array([])
        if len(dupes):
            raise _duplicate_error(dataset, id_column, expression, set(dupes.tolist()), job)
        shards = packer.finish()
        if hits is not None:
            hits.close()
        refused_uri = gate.write(store, layout.refused)
    except BaseException as exc:
        for future in in_flight:
            future.cancel()
        packer.abort()
        render_pool.shutdown(wait=True, cancel_futures=True)
        hits_file.__exit__(type(exc), exc, exc.__traceback__)  # discards the partial hits file
        raise
    finally:
        render_pool.shutdown(wait=True, cancel_futures=True)
        tokens.close()
    hits_file.close()
    return PrepareResult(
        shards=shards,
        rows=rows,
        tokens_exact=not sampled,
        cache_hits=hits.hits if hits else 0,
        refused=gate.refused,
        refused_uri=refused_uri,
    )


def _duplicate_error(
    dataset: ds.Dataset,
    id_column: str,
    expression: ds.Expression | None,
    suspects: set[int],
    job: JobSpec | None = None,
) -> BadInputError:
    """Second pass over the ids only, to name the duplicated values exactly."""
    seen: set[str] = set()
    duplicated: list[str] = []
    filter_on = filter_columns(job) if job is not None else None
    for batch in iter_source_batches(dataset, [id_column], expression, filter_on):
        for value in batch.column(0).to_pylist():
            cid = custom_id_for(value)
            if hash(cid) in suspects:
                if cid in seen and str(value) not in duplicated:
                    duplicated.append(str(value))
                seen.add(cid)
    shown = ", ".join(repr(v) for v in duplicated[:5])
    return BadInputError(
        f"source.id_column {id_column!r} is not unique: {len(duplicated)} value(s) occur more than "
        f"once (e.g. {shown}). Each row needs its own id: deduplicate the source or choose a unique "
        "id column."
    )
