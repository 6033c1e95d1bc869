"""The emulator's state and the batch lifecycle.

    validating -> failed                                   (validation errors, token_limit_exceeded)
    validating -> in_progress -> finalizing -> completed
                  in_progress -> expired                    (expires_at passed, or the expiry fault)
    validating | in_progress | finalizing -> cancelling -> cancelled

All times are emulated. Every transition happens at its scheduled instant (line k of a batch finishes at
in_progress_at + (k + 1) / lines_per_second, re-anchored when the rate is changed at run time),
whenever the worker gets to it, so results and timestamps do not depend on how often the worker runs or
on restarts in between. One lock guards all state; the worker works in chunks of lines so that API calls
stay responsive, and validates input files outside the lock.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulator.clock import EmulatedClock
from emulator.config import EmulatorConfig, RouteFault, apply_changes, changed_paths
from emulator.errors import ApiError
from emulator.faults import CANCELLED_ERROR, EXPIRED_ERROR, FaultCounters, take_route_fault
from emulator.ids import base62_id, new_batch_id, new_file_id
from emulator.lines import file_content, process_line, unfinished_line
from emulator.models import BatchRecord, FileRecord, Usage
from emulator.store import StateStore
from emulator.validation import InputLine, Validation, batch_error, parse_lines, validate_input
from tasks.tokens import count_request_tokens

log = logging.getLogger("emulator")

DEFAULT_FILE_TTL = 30 * 86400
CHUNK_LINES = 256
ACTIVE = ("in_progress", "finalizing", "cancelling")


@dataclass
class _Running:
    """In-memory part of a started batch: its parsed lines and their prompt tokens."""

    lines: list[InputLine]
    prompt_tokens: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, state_dir: Path, config: EmulatorConfig) -> None:
        self.config = config
        self.store = StateStore(state_dir)
        self.clock = EmulatedClock(state_dir / "clock.json", config.clock_scale)
        self.lock = threading.RLock()
        self.counters = FaultCounters()
        self.api_calls: Counter[str] = Counter()
        self.files: dict[str, FileRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        self._running: dict[str, _Running] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
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
        self._thread = threading.Thread(target=self._work, name="emulator-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep the worker alive; the failing batch is retried next tick
                log.exception("emulator worker tick failed")
            self._wake.wait(self.config.tick_seconds)
            self._wake.clear()

    def tick(self) -> None:
        """Bring every open batch up to the current emulated time."""
        now = self.clock.now()
        self._validate_due(now)
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

    def _new_file(
        self,
        file_id: str,
        filename: str,
        purpose: str,
        data: bytes,
        ttl: int | None,
        created_t: float | None = None,
        blob_written: bool = False,
    ) -> FileRecord:
        created = int(self.clock.now() if created_t is None else created_t)
        if ttl is None and purpose in ("batch", "batch_output"):
            ttl = DEFAULT_FILE_TTL
        seq = self.files[file_id].seq if file_id in self.files else len(self.files) + 1
        record = FileRecord(
            id=file_id,
            seq=seq,
            bytes=len(data),
            created_at=created,
            filename=filename,
            purpose=purpose,
            expires_at=None if ttl is None else created + ttl,
        )
        if not blob_written:
            self.store.write_blob(file_id, data)
        self.store.save_file(record)
        self.files[file_id] = record
        return record

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
        self._wake.set()
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

    def _ordered(self) -> list[BatchRecord]:
        return sorted(self.batches.values(), key=lambda b: b.seq)

    # ------------------------------------------------------------------ lifecycle

    def _validate_due(self, now: float) -> None:
        with self.lock:
            due = [
                (b.id, b.input_file_id, b.endpoint)
                for b in self._ordered()
                if b.status == "validating" and now >= b.validation_due_t
            ]
            config = self.config
        for batch_id, file_id, endpoint in due:
            path = self.store.blob_path(file_id)
            try:
                data: bytes | None = path.read_bytes()
            except FileNotFoundError:
                data = None
            validation = validate_input(data, endpoint, config) if data is not None else None
            with self.lock:
                batch = self.batches[batch_id]
                if batch.status == "validating":
                    self._finish_validation(batch, validation, data)

    def _finish_validation(
        self, batch: BatchRecord, validation: Validation | None, data: bytes | None
    ) -> None:
        when = batch.validation_due_t
        if validation is None or data is None:
            errors = [
                batch_error(
                    "invalid_request",
                    f"Cannot find file {batch.input_file_id}, or organization org-emulator does "
                    "not have access to it.",
                    "file_id",
                )
            ]
            return self._fail(batch, when, errors)
        batch.model = validation.model
        if validation.errors:
            return self._fail(batch, when, validation.errors)
        assert validation.model is not None
        limit = self.config.token_limit_for(validation.model)
        queued = sum(
            b.input_tokens
            for b in self.batches.values()
            if b.model == validation.model and b.status in ACTIVE
        )
        if limit is not None and queued + validation.input_tokens > limit:
            message = (
                f"Enqueued token limit reached for {validation.model} in organization "
                f"org-emulator. Limit: {limit:,} enqueued tokens. Please try again once some "
                "in_progress batches have been completed."
            )
            return self._fail(batch, when, [batch_error("token_limit_exceeded", message)])
        self.store.keep_input(batch.id, batch.input_file_id, data)
        batch.status = "in_progress"
        batch.in_progress_t = when
        batch.total = len(validation.lines)
        batch.input_tokens = validation.input_tokens
        batch.lines_per_second = self.config.lines_per_second
        batch.pace_t, batch.pace_done = when, 0
        expire = self.config.faults.expire_after_fraction
        if expire is not None and (
            expire.times is None or self.counters.expire_used < expire.times
        ):
            self.counters.expire_used += 1
            batch.expire_after_lines = math.floor(expire.fraction * batch.total)
        self._running[batch.id] = _Running(validation.lines, validation.prompt_tokens)
        self.store.save_batch(batch)

    def _fail(self, batch: BatchRecord, when: float, errors: list[dict[str, Any]]) -> None:
        batch.status = "failed"
        batch.failed_t = when
        batch.errors = errors
        self.store.save_batch(batch)

    def _advance(self, batch: BatchRecord, now: float, budget: int) -> bool:
        """Move one batch towards `now`; True if lines are left to do within the same instant."""
        if batch.status == "in_progress":
            return self._advance_lines(batch, now, budget)
        if batch.status == "finalizing" and batch.finalize_due_t is not None:
            if now >= batch.finalize_due_t and not (
                batch.stuck and self.config.faults.stuck_in_finalizing is not None
            ):
                when = max(batch.finalize_due_t, now) if batch.stuck else batch.finalize_due_t
                self._write_outputs(batch, None, when)
                batch.status, batch.completed_t = "completed", when
                self._close(batch)
        elif (
            batch.status == "cancelling"
            and batch.cancel_due_t is not None
            and now >= batch.cancel_due_t
        ):
            if batch.in_progress_t is not None:
                self._write_outputs(batch, CANCELLED_ERROR, batch.cancel_due_t)
            batch.status, batch.cancelled_t = "cancelled", batch.cancel_due_t
            self._close(batch)
        return False

    def _advance_lines(self, batch: BatchRecord, now: float, budget: int) -> bool:
        target = min(batch.total, batch.lines_due(min(now, batch.expires_t)))
        if batch.expire_after_lines is not None:
            target = min(target, batch.expire_after_lines)
        todo = min(max(target - batch.done, 0), budget)
        if todo:
            running = self._runtime(batch)
            records = [
                process_line(
                    batch,
                    k,
                    running.lines[k],
                    running.prompt_tokens[k],
                    self.config,
                    self.counters,
                )
                for k in range(batch.done, batch.done + todo)
            ]
            self.store.append_results(batch.id, records)
            for record in records:
                self._count(batch, record)
        if batch.done < target:
            self.store.save_batch(batch)
            return True
        if batch.done >= batch.total:
            batch.status = "finalizing"
            batch.finalizing_t = batch.time_when_done(batch.total)
            batch.finalize_due_t = batch.finalizing_t + self.config.finalizing_seconds
            stuck = self.config.faults.stuck_in_finalizing
            if stuck is not None and (
                stuck.times is None or self.counters.stuck_used < stuck.times
            ):
                self.counters.stuck_used += 1
                batch.stuck = True
            self._advance(batch, now, budget)
        elif batch.expire_after_lines is not None and batch.done >= batch.expire_after_lines:
            self._expire(batch, batch.time_when_done(batch.done))
        elif now >= batch.expires_t:
            self._expire(batch, batch.expires_t)
        if todo or batch.status != "in_progress":
            self.store.save_batch(batch)
        return False

    def _expire(self, batch: BatchRecord, when: float) -> None:
        self._write_outputs(batch, EXPIRED_ERROR, when)
        batch.status, batch.expired_t = "expired", when
        self._close(batch)

    def _close(self, batch: BatchRecord) -> None:
        self._running.pop(batch.id, None)
        self.store.save_batch(batch)

    def _count(self, batch: BatchRecord, record: dict[str, Any]) -> None:
        batch.done += 1
        if record["ok"]:
            batch.completed += 1
            batch.usage.add(record["usage"])
        else:
            batch.failed += 1

    def _runtime(self, batch: BatchRecord) -> _Running:
        running = self._running.get(batch.id)
        if running is None:
            lines = parse_lines(self.store.input_path(batch.id).read_bytes())
            tokens = [count_request_tokens(batch.endpoint, line.body) for line in lines]
            running = self._running[batch.id] = _Running(lines, tokens)
        return running

    def _write_outputs(
        self, batch: BatchRecord, unfinished: dict[str, str] | None, when: float
    ) -> None:
        """Write the output and error files from the results (plus never-run lines, if any)."""
        good: list[tuple[str, str]] = []
        bad: list[tuple[str, str]] = []
        for record in self.store.read_results(batch.id):
            (good if record["ok"] else bad).append((record["custom_id"], record["line"]))
        if unfinished is not None and batch.done < batch.total:
            lines = self._runtime(batch).lines
            for line in lines[batch.done :]:
                bad.append((line.custom_id, unfinished_line(batch, line.custom_id, unfinished)))
        shuffle = self.config.shuffle_output
        for kind, items in (("output", good), ("error", bad)):
            if not items:
                continue
            made = self._new_file(
                "file-" + base62_id(batch.id, kind, length=22),
                f"{batch.id}_{kind}.jsonl",
                "batch_output",
                file_content(items, batch, shuffle),
                batch.output_expires_after,
                when,
            )
            if kind == "output":
                batch.output_file_id = made.id
            else:
                batch.error_file_id = made.id

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
        return new

    def _repace(self, rate: float) -> None:
        """Running batches go on at a new rate from now on (lines due so far are done first)."""
        now = self.clock.now()
        for batch in self._ordered():
            if batch.status != "in_progress":
                continue
            while self._advance(batch, now, CHUNK_LINES):
                pass
            if batch.status == "in_progress":
                batch.pace_t, batch.pace_done, batch.lines_per_second = now, batch.done, rate
                self.store.save_batch(batch)

    def advance_clock(self, seconds: float) -> float:
        self.clock.advance(seconds)
        self._wake.set()
        return self.clock.now()

    def route_call(self, route: str) -> RouteFault | None:
        """Record an API call; the route fault it triggers, if any."""
        with self.lock:
            self.api_calls[route] += 1
            return take_route_fault(self.config.faults, self.counters, route)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            batches = self._ordered()
            files = sorted(self.files.values(), key=lambda f: f.seq)
            usage: dict[str, Usage] = {}
            for batch in batches:
                if batch.model is not None and batch.usage.requests:
                    usage.setdefault(batch.model, Usage()).add(batch.usage)
            return {
                "now": int(self.clock.now()),
                "clock_scale": self.clock.scale,
                "files": {
                    "created": len(files),
                    "by_purpose": dict(Counter(f.purpose for f in files)),
                    "items": {
                        f.id: {
                            "filename": f.filename,
                            "purpose": f.purpose,
                            "bytes": f.bytes,
                            "created_at": f.created_at,
                            "deleted": f.deleted,
                        }
                        for f in files
                    },
                },
                "batches": {
                    "created": len(batches),
                    "by_status": dict(Counter(b.status for b in batches)),
                    "items": [_batch_stats(b) for b in batches],
                },
                "batches_per_input_file": dict(Counter(b.input_file_id for b in batches)),
                "usage": {model: u.model_dump() for model, u in usage.items()},
                "api_calls": dict(self.api_calls),
            }


def _batch_stats(batch: BatchRecord) -> dict[str, Any]:
    return {
        "id": batch.id,
        "seq": batch.seq,
        "status": batch.status,
        "input_file_id": batch.input_file_id,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "metadata": batch.metadata,
        "endpoint": batch.endpoint,
        "model": batch.model,
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "input_tokens": batch.input_tokens,
        "usage": batch.usage.model_dump(),
        "errors": batch.errors,
    }


def _page(items: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool]:
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = items[start : start + limit]
    return page, start + limit < len(items)
