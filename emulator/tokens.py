"""Prompt tokens of whole input files, as `tasks.tokens.count_request_tokens` counts each request.

Counting is most of what validating a large file costs. Small files are counted here; large ones go,
in pieces of raw bytes, to helper processes (started on first use, ended with the engine) that parse
and count them while validation parses and checks the same lines here, so that counting neither
holds this process's GIL nor waits for it while the worker runs lines of other batches.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import orjson

from tasks.tokens import count_distinct_texts, count_requests_tokens

log = logging.getLogger("emulator")

HELPER_MIN_LINES = 4096  # fewer bodies are counted in this process
HELPER_MIN_BYTES = 4 << 20  # smaller files are counted in this process
HELPER_PROCESSES = 2
HELPER_CHUNK_TEXTS = 2048  # texts per task sent to a helper
HELPER_CHUNK_BYTES = 2 << 20  # bytes of a file per task sent to a helper


def count_jsonl_tokens(endpoint: str, chunk: bytes) -> list[int]:
    """Prompt tokens of each non-blank line of a piece of an input file (0 for a line that is not a
    request: such a file fails validation, and its counts are not used)."""
    bodies: list[dict[str, Any]] = []
    for raw in chunk.split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        body = obj.get("body") if isinstance(obj, dict) else None
        bodies.append(body if isinstance(body, dict) else {})
    try:
        return count_requests_tokens(endpoint, bodies, threads=1)
    except Exception:  # a malformed request (e.g. a message that is not an object)
        return [0] * len(bodies)


class PromptTokenCounter:
    """Counts prompt tokens for the engine; owns the helper processes (`close` ends them)."""

    def __init__(
        self,
        min_lines: int = HELPER_MIN_LINES,
        processes: int = HELPER_PROCESSES,
        min_bytes: int = HELPER_MIN_BYTES,
        chunk_bytes: int = HELPER_CHUNK_BYTES,
    ) -> None:
        self.min_lines = min_lines
        self.min_bytes = min_bytes
        self.chunk_bytes = chunk_bytes
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def count(self, endpoint: str, bodies: Sequence[dict[str, Any]]) -> list[int]:
        """`count_request_tokens(endpoint, body)` of each body."""
        if len(bodies) >= self.min_lines and self.processes >= 1:
            try:
                return count_requests_tokens(endpoint, bodies, count_distinct=self._in_helpers)
            except (BrokenProcessPool, OSError):
                self._broken()
        return count_requests_tokens(endpoint, bodies, threads=1)

    def start_file(self, endpoint: str, data: bytes) -> Callable[[], list[int] | None] | None:
        """Start counting the prompt tokens of every non-blank line of an input file in the helpers;
        the returned function waits for them (None if the helpers failed). None for a small file:
        count its bodies with `count`."""
        if len(data) < self.min_bytes or self.processes < 1:
            return None
        try:
            pool = self._helpers()
        except OSError:
            self._broken()
            return None
        parts: list[Future[list[int]]] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", min(start + self.chunk_bytes, len(data)))
            end = len(data) if end < 0 else end + 1
            parts.append(pool.submit(count_jsonl_tokens, endpoint, data[start:end]))
            start = end

        def result() -> list[int] | None:
            try:
                return [n for part in parts for n in part.result()]
            except BrokenProcessPool:
                self._broken()
                return None

        return result

    def _broken(self) -> None:
        """Helpers that cannot start or died (e.g. a __main__ that spawned processes cannot import):
        count in this process from now on."""
        log.warning("emulator token helpers failed; counting tokens in-process from now on")
        self.processes = 0
        self.close()

    def _in_helpers(self, encoding_name: str, texts: list[str]) -> list[int]:
        pool = self._helpers()
        parts: list[Future[list[int]]] = [
            pool.submit(count_distinct_texts, encoding_name, texts[i : i + HELPER_CHUNK_TEXTS])
            for i in range(0, len(texts), HELPER_CHUNK_TEXTS)
        ]
        return [n for part in parts for n in part.result()]

    def _helpers(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
