"""The emulator's engine: state (loaded from and saved to the state directory), the Files and Batches
operations the API calls, the worker thread that moves batches along (see `lifecycle`), and the admin
controls. One lock guards all state; the worker processes lines in chunks so that API calls stay
responsive. Input files are validated outside the lock by a second thread, so that one batch's
validation (mostly token counting, which runs without the GIL) overlaps another's lines.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emulator.clock import EmulatedClock
from emulator.config import EmulatorConfig, RouteFault, apply_changes, changed_paths
from emulator.errors import ApiError
from emulator.faults import FaultCounters, take_route_fault
from emulator.ids import new_batch_id, new_file_id
from emulator.lifecycle import ACTIVE, CHUNK_LINES, Lifecycle, RunningBatch
from emulator.models import BatchRecord, FileRecord, Usage
from emulator.stats import build_stats
from emulator.store import StateStore
from emulator.tokens import PromptTokenCounter

log = logging.getLogger("emulator")


class Engine(Lifecycle):
    """The emulator's state, its API operations, the worker thread and the admin controls."""

    def __init__(self, state_dir: Path, config: EmulatorConfig) -> None:
        self.config = config
        self.store = StateStore(state_dir)
        self.clock = EmulatedClock(state_dir / "clock.json", config.clock_scale)
        self.lock = threading.RLock()
        self.counters = FaultCounters()
        self.tokens = PromptTokenCounter()
        self.api_calls: Counter[str] = Counter()
        self.files: dict[str, FileRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        self._running: dict[str, RunningBatch] = {}
        self._wake = threading.Event()
        self._wake_validator = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._validator: threading.Thread | None = None
        self._load()

    # ------------------------------------------------------------------ startup / worker

    def _load(self) -> None:
        self.files = {f.id: f for f in self.store.load_files()}
        self.batches = {b.id: b for b in self.store.load_batches()}
        for batch in self.batches.values():
            if batch.status in ACTIVE and batch.in_progress_t is not None:
                batch.done, batch.completed, batch.failed, batch.usage = 0, 0, 0, Usage()
                for record in self.store.read_results(batch.id):
                    self._count(batch, record)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(self._advance_open, self._wake), name="emulator-engine"
        )
        self._validator = threading.Thread(
            target=self._loop,
            args=(self._validate_due, self._wake_validator),
            name="emulator-validate",
        )
        for thread in (self._thread, self._validator):
            thread.daemon = True
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._wake_validator.set()
        for thread in (self._thread, self._validator):
            if thread is not None:
                thread.join()
        self._thread = self._validator = None
        self.tokens.close()

    def _loop(self, step: Callable[[float], None], wake: threading.Event) -> None:
        while not self._stop.is_set():
            try:
                step(self.clock.now())
            except Exception:  # keep the thread alive; the failing batch is retried next time
                log.exception("emulator worker failed")
            wake.wait(self.config.tick_seconds)
            wake.clear()

    def _validated(self) -> None:
        """A batch has become in_progress (or failed): the worker takes it up at once."""
        self._wake.set()

    def _advance_open(self, now: float) -> None:
        with self.lock:
            open_ids = [b.id for b in self._ordered() if not b.terminal]
        for batch_id in open_ids:
            if self._stop.is_set():
                return
            while True:
                with self.lock:
                    if not self._advance(self.batches[batch_id], now, CHUNK_LINES):
                        break

    # ------------------------------------------------------------------ files

    def create_file(
        self, filename: str, purpose: str, data: bytes, ttl: int | None = None
    ) -> FileRecord:
        file_id = new_file_id()
        self.store.write_blob(file_id, data)  # outside the lock: uploads can be large
        with self.lock:
            return self._new_file(file_id, filename, purpose, data, ttl, blob_written=True)

    def get_file(self, file_id: str) -> FileRecord:
        with self.lock:
            record = self.files.get(file_id)
            if record is None or record.deleted:
                raise ApiError(404, f"No such File object: {file_id}", param="id")
            return record

    def list_files(
        self, after: str | None, limit: int, order: str, purpose: str | None
    ) -> tuple[list[FileRecord], bool]:
        with self.lock:
            items = [
                f
                for f in sorted(self.files.values(), key=lambda f: f.seq, reverse=order == "desc")
                if not f.deleted and (purpose is None or f.purpose == purpose)
            ]
        return _page(items, after, limit)

    def file_path(self, file_id: str) -> Path:
        self.get_file(file_id)
        return self.store.blob_path(file_id)

    def delete_file(self, file_id: str) -> FileRecord:
        with self.lock:
            record = self.get_file(file_id)
            record.deleted = True
            self.store.save_file(record)
            self.store.delete_blob(file_id)
            return record

    # ------------------------------------------------------------------ batches

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        metadata: dict[str, str] | None,
        output_ttl: int | None,
    ) -> BatchRecord:
        with self.lock:
            source = self.files.get(input_file_id)
            if source is None or source.deleted:
                raise ApiError(
                    400,
                    f"Cannot find file {input_file_id}, or organization org-emulator does not "
                    "have access to it.",
                    param="file_id",
                )
            if source.purpose != "batch":
                raise ApiError(
                    400,
                    f"File {input_file_id} has purpose '{source.purpose}'; batch input files must "
                    "be uploaded with purpose 'batch'.",
                    param="input_file_id",
                )
            now = self.clock.now()
            batch = BatchRecord(
                id=new_batch_id(),
                seq=max((b.seq for b in self.batches.values()), default=0) + 1,
                seed=self.config.seed,
                input_file_id=input_file_id,
                endpoint=endpoint,
                metadata=metadata,
                output_expires_after=output_ttl,
                created_t=now,
                expires_t=math.floor(now) + 86400,
                validation_due_t=now + self.config.validating_seconds,
            )
            self.batches[batch.id] = batch
            self.store.save_batch(batch)
        self._wake_validator.set()
        return batch

    def get_batch(self, batch_id: str) -> BatchRecord:
        with self.lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
            return batch.model_copy(deep=True)

    def list_batches(self, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        with self.lock:
            page, has_more = _page(list(reversed(self._ordered())), after, limit)
            return [b.model_copy(deep=True) for b in page], has_more

    def cancel_batch(self, batch_id: str) -> BatchRecord:
        with self.lock:
            self.get_batch(batch_id)
            batch = self.batches[batch_id]
            now = self.clock.now()
            while self._advance(batch, now, CHUNK_LINES):
                pass
            if batch.status in ("completed", "failed", "expired"):
                raise ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.")
            if batch.status in ("validating", "in_progress", "finalizing"):
                batch.status = "cancelling"
                batch.cancelling_t = max(now, batch.created_t)
                batch.cancel_due_t = batch.cancelling_t + self.config.cancelling_seconds
                self.store.save_batch(batch)
            self._wake.set()
            return batch.model_copy(deep=True)

    # ------------------------------------------------------------------ admin

    def configure(self, config: EmulatorConfig | None = None, **changes: Any) -> EmulatorConfig:
        with self.lock:
            if config is not None:
                changes = {**config.model_dump(), **changes}
                paths = {"faults"}  # a whole new config: every fault counter starts again
            else:
                paths = changed_paths(changes)
            new = apply_changes(self.config, changes)
            if new.clock_scale != self.clock.scale:
                self.clock.set_scale(new.clock_scale)
            if new.lines_per_second != self.config.lines_per_second:
                self._repace(new.lines_per_second)
            self.counters.reset(paths)
            self.config = new
        self._wake.set()
        self._wake_validator.set()
        return new

    def advance_clock(self, seconds: float) -> float:
        self.clock.advance(seconds)
        self._wake.set()
        self._wake_validator.set()
        return self.clock.now()

    def route_call(self, route: str) -> RouteFault | None:
        """Record an API call; the route fault it triggers, if any."""
        with self.lock:
            self.api_calls[route] += 1
            return take_route_fault(self.config.faults, self.counters, route)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return build_stats(
                self.clock.now(),
                self.clock.scale,
                list(self.files.values()),
                self._ordered(),
                self.api_calls,
            )


def _page(items: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool]:
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = items[start : start + limit]
    return page, start + limit < len(items)
