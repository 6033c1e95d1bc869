"""The per-row result cache: content-addressed, in object storage under `{root}/cache/`.

The key of a row is a hash of exactly what would be sent and how it is read back: the endpoint, the
whole rendered body (model, messages or input, every parameter, the structured-output schema) and the
version of the parsing rules. Any change to the template, model, parameters or schema changes the key of
exactly the rows it affects, so nothing stale is ever served.

Entries live in Parquet segments, one per collected shard, grouped in a namespace per API (schemas.lineage:
results of one API are never served to a run against another), endpoint, model, schema and parse
version (all entries of a namespace share one Arrow schema). Namespaces are shared by the jobs of a
storage root on purpose: two jobs that send the very same request get the answer once.

    {root}/cache/{namespace}/segment-{run_id}-{shard_id}.parquet   # cache_key, created_at, run_id, result columns

Lookups are batched: prepare loads the keys of the namespace once (16 bytes each) into a sorted array and
tests a whole record batch of keys against it with one vectorised search — no per-row round trips. The
keys it computes go to the shards' id sidecars, so collect files the results under them without reading
the request files again. load reads the entries of its hits a segment at a time (`served_entries`)."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.job import JobSpec
from schemas.lineage import slug
from schemas.tables import USAGE_FIELDS, results_schema
from tasks.layout import join_uri
from tasks.storage import ObjectStore

PARSE_RULES_VERSION = "1"
SEGMENT_READERS = 8  # cache segments read at once
SEGMENT_ATTEMPTS = 3  # reads of the segments, when one is removed (pruned, compacted) meanwhile
COMPACT_SEGMENT_ROWS = 50_000  # about a shard's worth: a merged segment's size
KEY_BYTES = 16


def namespace(job: JobSpec, api: str | None) -> str:
    """Entries of one namespace come from one API and share a result schema: endpoint, model,
    schema, parse rules."""
    spec = orjson.dumps(
        {
            "api": api,
            "endpoint": job.request.endpoint,
            "model": job.request.model,
            "schema": job.request.output_schema,
            "parse": PARSE_RULES_VERSION,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    name = job.request.model.replace("/", "_")
    return f"{slug(api or 'unknown')}--{name}-{hashlib.sha256(spec).hexdigest()[:16]}"


def cache_key(endpoint: str, body_json: bytes | memoryview) -> bytes:
    """16-byte key of one request: endpoint + the exact body bytes + parse rules version."""
    digest = hashlib.sha256()  # sha256 runs on the CPU's SHA extensions: faster here than blake2b
    digest.update(endpoint.encode())
    digest.update(b"\x00" + PARSE_RULES_VERSION.encode() + b"\x00")
    digest.update(body_json)
    return digest.digest()[:KEY_BYTES]


_KEY_PREFIX = hashlib.sha256(b"\x00" + PARSE_RULES_VERSION.encode() + b"\x00")  # cache_key("", ...)


LINE_PREFIX = b'{"custom_id":"'


def custom_id_of_line(line: bytes) -> str:
    if line.startswith(LINE_PREFIX):
        return line[len(LINE_PREFIX) : line.index(b'"', len(LINE_PREFIX))].decode()
    return str(orjson.loads(line)["custom_id"])


def cache_key_from_line(line: bytes) -> bytes:
    """The key of a request line as written to a shard: everything after its custom_id (the first
    field; custom_ids hold no quotes), so the same request has the same key whatever row it came from."""
    if not line.startswith(LINE_PREFIX):
        raise ValueError("a request line must start with its custom_id")
    end = line.index(b'",', len(LINE_PREFIX)) + 2
    return cache_key("", line[end:].rstrip(b"\n"))


def keys_of_rendered(rendered: Any) -> list[bytes]:
    """cache_key_from_line of every line of a rendered batch, without copying the lines: the key
    covers what follows `{"custom_id":"<id>",` up to the newline."""
    from tasks.render import value_offsets

    if rendered.lines is not None:
        return [cache_key_from_line(line) for line in rendered.lines]
    offsets = value_offsets(rendered.data)
    skip = len(LINE_PREFIX) + 2  # the prefix, then the closing quote and comma after the id
    starts = (offsets[:-1] + skip + np.diff(value_offsets(rendered.custom_ids))).tolist()
    ends = (offsets[1:] - 1).tolist()  # the newline is not part of the key
    buffer = memoryview(rendered.data.buffers()[2])
    fresh = _KEY_PREFIX.copy
    keys = []
    for start, end in zip(starts, ends, strict=True):
        digest = fresh()
        digest.update(buffer[start:end])
        keys.append(digest.digest()[:KEY_BYTES])
    return keys


def key_array(keys: list[bytes]) -> pa.Array:
    return pa.array(keys, pa.binary(KEY_BYTES))


def _key_words(keys: pa.ChunkedArray) -> np.ndarray:
    """Keys (binary(16), no nulls) as rows of two 64-bit words, for comparing whole keys."""
    array = keys.combine_chunks()
    data = np.frombuffer(array.buffers()[1], np.uint8)
    rows = data[array.offset * KEY_BYTES : (array.offset + len(array)) * KEY_BYTES]
    return rows.reshape(-1, KEY_BYTES).view(np.uint64)


def _as_u64(keys: list[bytes] | pa.Array) -> np.ndarray:
    """The first 8 bytes of each key as an unsigned integer (the index compares these)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if isinstance(keys, pa.FixedSizeBinaryArray) and keys.null_count == 0:
        width = keys.type.byte_width
        data = np.frombuffer(keys.buffers()[1], dtype=np.uint8)
        rows = data[keys.offset * width : (keys.offset + len(keys)) * width].reshape(-1, width)
        return np.ascontiguousarray(rows[:, :8]).view(">u8").ravel().astype(np.uint64)
    if isinstance(keys, pa.Array):
        keys = keys.to_pylist()
    raw = b"".join(k[:8] for k in keys)  # type: ignore[union-attr]
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


@dataclass
class CacheIndex:
    """Sorted 64-bit key prefixes of a namespace's live entries. A false hit needs two different
    requests to share 64 bits of a 128-bit hash (about 1 in 10^8 per billion entries); the entry read
    back at load is matched on the full 16-byte key, and a mismatch is resent, never served."""

    sorted_keys: np.ndarray

    @classmethod
    def empty(cls) -> CacheIndex:
        return cls(np.empty(0, dtype=np.uint64))

    @classmethod
    def from_keys(cls, keys: list[bytes]) -> CacheIndex:
        return cls(np.unique(_as_u64(keys))) if keys else cls.empty()

    def __len__(self) -> int:
        return len(self.sorted_keys)

    def contains(self, keys: list[bytes] | pa.Array) -> np.ndarray:
        if not len(self.sorted_keys) or not len(keys):
            return np.zeros(len(keys), dtype=bool)
        probe = _as_u64(keys)
        pos = np.searchsorted(self.sorted_keys, probe)
        pos[pos == len(self.sorted_keys)] = 0
        return self.sorted_keys[pos] == probe


class HitRecorder:
    """Splits rendered batches into cache hits (recorded to a Parquet file of custom_id + key, for
    load to splice in) and misses (to be sent). Thread-safe: render threads call `misses`."""

    def __init__(self, index: CacheIndex, handle: Any) -> None:
        import threading

        import pyarrow.parquet as pq

        from schemas.tables import CACHE_HITS_SCHEMA

        self.index = index
        self.schema = CACHE_HITS_SCHEMA
        self.writer = pq.ParquetWriter(handle, CACHE_HITS_SCHEMA, compression="zstd")
        self.lock = threading.Lock()
        self.hits = 0

    def misses(self, rendered: Any) -> Any:
        """The rows of a rendered batch to send, with their cache keys (which go on to the shards'
        sidecars, for collect); the rows whose request is cached are recorded as hits instead."""
        keys = key_array(keys_of_rendered(rendered))
        rendered = replace(rendered, keys=keys)
        hit = self.index.contains(keys)
        if not hit.any():
            return rendered
        hits = pa.array(hit)
        table = pa.table(
            {"custom_id": rendered.custom_ids.filter(hits), "cache_key": keys.filter(hits)},
            schema=self.schema,
        )
        with self.lock:
            self.writer.write_table(table)
            self.hits += table.num_rows
        return rendered.select(~hit)

    def close(self) -> None:
        self.writer.close()


class ResultCache:
    """Reads and writes one namespace of the cache."""

    def __init__(self, store: ObjectStore, root: str, job: JobSpec, api: str | None) -> None:
        self.store = store
        self.job = job
        self.dir = join_uri(root, "cache", namespace(job, api))
        self.schema = pa.schema(
            [
                pa.field("cache_key", pa.binary(KEY_BYTES)),
                pa.field("created_at", pa.string()),
                pa.field("run_id", pa.string()),
                *[f for f in results_schema(job.request) if f.name not in ("custom_id", "attempt")],
            ]
        )

    def segments(self) -> list[str]:
        return self.store.list_files(self.dir, suffix=".parquet")

    def _read(self, uris: list[str], columns: list[str] | None) -> Iterator[pa.Table]:
        """The segments' `columns`, in order, read SEGMENT_READERS at a time: a namespace gains a
        segment or two a night, and on S3 each read is a few round trips."""
        with ThreadPoolExecutor(SEGMENT_READERS, thread_name_prefix="nightbatch-cache") as pool:
            pending: deque[Future[pa.Table]] = deque()
            for uri in uris:
                pending.append(pool.submit(self.store.read_table, uri, columns))
                if len(pending) >= 2 * SEGMENT_READERS:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _live(self, table: pa.Table, max_age_days: float | None, now: datetime) -> pa.Table:
        if max_age_days is None:
            return table
        cutoff = (now - timedelta(days=max_age_days)).isoformat()
        return table.filter(pc.greater_equal(table.column("created_at"), cutoff))

    def index(self, max_age_days: float | None, now: datetime) -> CacheIndex:
        for attempt in range(SEGMENT_ATTEMPTS):
            try:
                return self._index(max_age_days, now)
            except FileNotFoundError:  # a segment pruned or compacted meanwhile: list them again
                if attempt == SEGMENT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _index(self, max_age_days: float | None, now: datetime) -> CacheIndex:
        parts = []
        for table in self._read(self.segments(), ["cache_key", "created_at"]):
            table = self._live(table, max_age_days, now)
            if table.num_rows:
                parts.append(_as_u64(table.column("cache_key")))
        if not parts:
            return CacheIndex.empty()
        return CacheIndex(np.unique(np.concatenate(parts)))

    def write_segment(
        self, name: str, keys: list[bytes] | pa.Array, results: pa.Table, run_id: str, now: str
    ) -> str | None:
        """Add succeeded results (rows aligned with `keys`) as one segment; returns its URI."""
        if results.num_rows == 0:
            return None
        columns: dict[str, Any] = {
            "cache_key": keys if isinstance(keys, pa.Array) else key_array(keys),
            "created_at": pa.array([now] * results.num_rows, pa.string()),
            "run_id": pa.array([run_id] * results.num_rows, pa.string()),
        }
        for field in self.schema:
            if field.name not in columns:
                columns[field.name] = results.column(field.name)
        uri = join_uri(self.dir, f"segment-{name}.parquet")
        self.store.write_table(uri, pa.table(columns, schema=self.schema))
        return uri

    def served_entries(
        self,
        hits: pa.Table,
        max_age_days: float | None,
        now: datetime,
        columns: list[str] | None = None,
    ) -> Iterator[pa.Table]:
        """For hit rows (custom_id, cache_key): the newest live entry of each one's key (a full
        16-byte match), with its `columns` (default all) and the hit's custom_id, one segment at a
        time. A hit without a live entry is left out. Two passes, neither holding more than one
        segment's entries: which segment row wins for each key (key and time columns only), then
        the winning rows of each segment. A segment pruned or compacted meanwhile: the hits not
        served yet are looked up again."""
        left = hits.select(["custom_id", "cache_key"])
        for attempt in range(SEGMENT_ATTEMPTS):
            served: list[pa.Array] = []
            try:
                for table in self._served_entries(left, max_age_days, now, columns):
                    served += table.column("custom_id").chunks
                    yield table
                return
            except FileNotFoundError:
                if attempt == SEGMENT_ATTEMPTS - 1:
                    raise
                if served:
                    done = pa.concat_arrays(served)
                    left = left.filter(
                        pc.invert(pc.is_in(left.column("custom_id"), value_set=done))
                    )

    def _served_entries(
        self,
        hits: pa.Table,
        max_age_days: float | None,
        now: datetime,
        columns: list[str] | None,
    ) -> Iterator[pa.Table]:
        uris = self.segments()
        winners = self._newest_rows(uris, hits.column("cache_key"), max_age_days, now)
        plan = hits.join(winners, "cache_key", join_type="inner")
        plan = plan.sort_by([("segment", "ascending"), ("row", "ascending")])
        if not plan.num_rows:
            return
        segment = plan.column("segment").to_numpy()
        bounds = np.flatnonzero(np.diff(segment)) + 1
        names = None if columns is None else ["cache_key", "created_at", *columns]
        starts = [0, *bounds]
        tables = self._read([uris[segment[start]] for start in starts], names)
        for start, stop, entries in zip(starts, [*bounds, len(segment)], tables, strict=True):
            part = plan.slice(start, stop - start)
            entries = entries.take(part.column("row")).drop_columns(["cache_key"])
            yield entries.append_column("custom_id", part.column("custom_id")).append_column(
                "cache_key", part.column("cache_key")
            )

    def _newest_rows(
        self, uris: list[str], keys: pa.ChunkedArray, max_age_days: float | None, now: datetime
    ) -> pa.Table:
        """(cache_key, segment, row): where the newest live entry of each of these keys is."""
        wanted = np.unique(_as_u64(keys))
        found = [
            pa.table({"cache_key": pa.array([], pa.binary(KEY_BYTES)), "created_at": pa.array([], pa.string()),
                      "row": pa.array([], pa.int64()), "segment": pa.array([], pa.int64())})
        ]  # fmt: skip
        tables = self._read(uris if len(wanted) else [], ["cache_key", "created_at"])
        for number, table in enumerate(tables):
            table = table.append_column("row", pa.array(np.arange(table.num_rows)))
            table = self._live(table, max_age_days, now)
            probe = _as_u64(table.column("cache_key"))
            at = np.minimum(np.searchsorted(wanted, probe), len(wanted) - 1)
            table = table.filter(pa.array(wanted[at] == probe))  # the 8-byte prefix: candidates
            found.append(table.append_column("segment", pa.array(np.full(table.num_rows, number))))
        merged = pa.concat_tables(found).sort_by(
            [("cache_key", "ascending"), ("created_at", "descending")]
        )
        key_words = _key_words(merged.column("cache_key"))
        first = np.ones(len(key_words), bool)
        first[1:] = (key_words[1:] != key_words[:-1]).any(axis=1)  # the newest entry of each key
        return merged.filter(pa.array(first)).select(["cache_key", "segment", "row"])

    def compact(self, now: datetime, max_rows: int = COMPACT_SEGMENT_ROWS) -> tuple[int, int]:
        """Merge the namespace's small segments (fewer than `max_rows` entries: a night that sent few
        rows adds a small one) into segments of about `max_rows` entries, one segment read at a time;
        returns (segments before, segments after). Merged segments are committed before the small
        ones are removed, so a reader sees every entry at any moment (some twice, which the
        newest-entry rule reads once). Segments stay about a shard's size, which bounds what load
        reads at once."""
        uris = self.segments()
        small = [uri for uri in uris if self.store.row_count(uri) < max_rows]
        if len(small) < 2:
            return len(uris), len(uris)
        stamp = _fresh_stamp(now)
        written: list[str] = []
        with contextlib.ExitStack() as stack:
            writer: pq.ParquetWriter | None = None
            rows = 0
            for table in self._read(small, None):
                if writer is None or rows >= max_rows:
                    stack.close()  # commits the merged segment before it, if any
                    written.append(
                        join_uri(self.dir, f"segment-compacted-{stamp}-{len(written):04d}.parquet")
                    )
                    handle = stack.enter_context(self.store.open_atomic(written[-1]))
                    writer = pq.ParquetWriter(handle, self.schema, compression="zstd")
                    stack.callback(writer.close)
                    rows = 0
                writer.write_table(table.select(self.schema.names).cast(self.schema))
                rows += table.num_rows
        for uri in set(small) - set(written):
            self.store.remove(uri)
        return len(uris), len(uris) - len(small) + len(written)

    def prune(self, older_than_days: float, now: datetime) -> int:
        """Remove the entries older than the cutoff; returns how many segments held some. A segment
        of only such entries is deleted; one that also holds younger entries (a merged segment) is
        written again without them, under a new name (segments never change under a reader that
        found its rows in them), and then deleted."""
        cutoff = (now - timedelta(days=older_than_days)).isoformat()
        stamp = _fresh_stamp(now)
        touched = 0
        uris = self.segments()
        for uri, table in zip(uris, self._read(uris, ["created_at"]), strict=True):
            if pc.min(table.column(0)).as_py() >= cutoff:
                continue
            if pc.max(table.column(0)).as_py() >= cutoff:
                entries = self.store.read_table(uri)
                young = entries.filter(pc.greater_equal(entries.column("created_at"), cutoff))
                new_uri = join_uri(self.dir, f"segment-pruned-{stamp}-{touched:04d}.parquet")
                self.store.write_table(new_uri, young.select(self.schema.names).cast(self.schema))
            self.store.remove(uri)
            touched += 1
        return touched


def _fresh_stamp(now: datetime) -> str:
    """A part for the name of a segment written from others: the time and a random part, so that it
    is never the name of an existing segment."""
    return f"{now.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"


def keys_of_request_file(
    store: ObjectStore, request_uri: str, wanted: set[str]
) -> dict[str, bytes]:
    """custom_id -> cache key of the wanted lines of a shard's request file (read in large ranges)."""
    keys: dict[str, bytes] = {}
    for line in store.iter_lines(request_uri):
        if line.strip():
            custom_id = custom_id_of_line(line)
            if custom_id in wanted:
                keys[custom_id] = cache_key_from_line(line)
    return keys


@dataclass(frozen=True)
class CacheWrite:
    """Results collected for a run go to the cache as produced by that run, at that time."""

    run_id: str
    created_at: str
    api: str | None  # the API the run's results come from


def cache_shard_results(
    cache: ResultCache,
    store: ObjectStore,
    results_uri: str,
    sidecar: pa.Table,
    request_uri: str,
    name: str,
    run_id: str,
    now: str,
) -> int:
    """Add a collected shard's succeeded results to the cache (failures are never cached). The keys
    come from the shard's id sidecar when prepare recorded them there, else from its request file,
    read again."""
    results = store.read_table(results_uri)
    if results.num_rows == 0:
        return 0
    custom_ids = results.column("custom_id")
    if "cache_key" in sidecar.column_names:
        where = pc.index_in(custom_ids, value_set=sidecar.column("custom_id"))
        if where.null_count:
            raise ValueError(f"the id sidecar of {request_uri} lacks the key of a collected result")
        keys = sidecar.column("cache_key").take(where).combine_chunks()
    else:
        ids = [str(c) for c in custom_ids.to_pylist()]
        by_id = keys_of_request_file(store, request_uri, set(ids))
        keys = key_array([by_id[c] for c in ids])
    cache.write_segment(name, keys, results, run_id, now)
    return results.num_rows


def cache_report(store: ObjectStore, root: str) -> list[dict[str, Any]]:
    """Per namespace: segments, entries and bytes."""
    rows = []
    base = join_uri(root, "cache")
    by_namespace: dict[str, list[str]] = {}
    for uri in store.list_files(base, suffix=".parquet"):
        name = uri[len(base) :].strip("/").split("/")[0]
        by_namespace.setdefault(name, []).append(uri)
    for name, uris in sorted(by_namespace.items()):
        entries = sum(store.read_table(u, columns=["cache_key"]).num_rows for u in uris)
        size = sum(store.size(u) for u in uris)
        rows.append({"namespace": name, "segments": len(uris), "entries": entries, "bytes": size})
    return rows


def served_usage(
    cache: ResultCache, store: ObjectStore, hits_uri: str, now: datetime
) -> Iterator[pa.Table]:
    """custom_id, model and usage of the rows `served_results` serves, a segment at a time (no
    output columns read)."""
    usage = ["model", *(f.name for f in USAGE_FIELDS)]
    return cache.served_entries(store.read_table(hits_uri), None, now, usage)


def served_results(
    cache: ResultCache, store: ObjectStore, hits_uri: str, now: datetime
) -> Iterator[pa.Table]:
    """The cached results of a run's hits, as result rows (custom_id of this run, attempt 0) with the
    producing run in `cached_from_run`, a cache segment at a time. A hit whose entry has since been
    pruned is left out (load then dead-letters it as missing rather than serve something else)."""
    schema = results_schema(cache.job.request)
    for entries in cache.served_entries(store.read_table(hits_uri), None, now):
        n = entries.num_rows
        columns: dict[str, Any] = {}
        for field in schema:
            if field.name == "attempt":
                columns[field.name] = pa.array(np.zeros(n, np.int32))
            elif field.name == "batch_id":
                columns[field.name] = pa.nulls(n, pa.string())
            else:
                columns[field.name] = entries.column(field.name).cast(field.type)
        columns["cached_from_run"] = entries.column("run_id")
        yield pa.table(columns, schema=schema.append(pa.field("cached_from_run", pa.string())))
