"""Prompt tokens of whole input files, as `tasks.tokens.count_request_tokens` counts each request.

Counting is most of what validating a large file costs. Small files are counted here; the texts of
large ones go to helper processes (started on first use, ended with the engine), so that counting
neither holds this process's GIL nor waits for it while the worker runs lines of other batches.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from tasks.tokens import count_distinct_texts, count_requests_tokens

HELPER_MIN_LINES = 4096  # smaller files are counted in this process
HELPER_PROCESSES = 2
HELPER_CHUNK_TEXTS = 2048  # texts per task sent to a helper


class PromptTokenCounter:
    def __init__(
        self, min_lines: int = HELPER_MIN_LINES, processes: int = HELPER_PROCESSES
    ) -> None:
        self.min_lines = min_lines
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def count(self, endpoint: str, bodies: Sequence[dict[str, Any]]) -> list[int]:
        """`count_request_tokens(endpoint, body)` of each body."""
        if len(bodies) < self.min_lines or self.processes < 1:
            return count_requests_tokens(endpoint, bodies, threads=1)
        return count_requests_tokens(endpoint, bodies, count_distinct=self._in_helpers)

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
