"""Batch state transitions, applied to the Engine's state (the caller holds the Engine's lock).

    validating -> failed                                   (validation errors, token_limit_exceeded)
    validating -> in_progress -> finalizing -> completed
                  in_progress -> expired                    (expires_at passed, or the expiry fault)
    validating | in_progress | finalizing -> cancelling -> cancelled

Every transition happens at its scheduled emulated instant (line k of a batch finishes at
in_progress_at + (k + 1) / lines_per_second, re-anchored when the rate is changed at run time),
whenever the worker gets to it, so results and timestamps do not depend on how often the worker runs or
on restarts in between.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

from emulator.clock import EmulatedClock
from emulator.config import EmulatorConfig
from emulator.faults import CANCELLED_ERROR, EXPIRED_ERROR, FaultCounters
from emulator.ids import base62_id
from emulator.lines import file_content, process_line, unfinished_line
from emulator.models import BatchRecord, FileRecord
from emulator.store import StateStore
from emulator.tokens import PromptTokenCounter
from emulator.validation import InputLine, Validation, batch_error, parse_lines, validate_input

DEFAULT_FILE_TTL = 30 * 86400
CHUNK_LINES = 256
ACTIVE = ("in_progress", "finalizing", "cancelling")


@dataclass
class RunningBatch:
    """In-memory part of a started batch: its parsed lines, their prompt tokens and, when this process
    ran every finished line (no restart in between), their (custom_id, ok, serialized line) results,
    so the output files are written without reading results.jsonl back."""

    lines: list[InputLine]
    prompt_tokens: list[int] = field(default_factory=list)
    results: list[tuple[str, bool, str]] | None = None


class Lifecycle:
    """The state the transitions work on; `Engine` owns it and adds the API, the worker and admin."""

    config: EmulatorConfig
    store: StateStore
    clock: EmulatedClock
    lock: threading.RLock
    counters: FaultCounters
    tokens: PromptTokenCounter
    files: dict[str, FileRecord]
    batches: dict[str, BatchRecord]
    _running: dict[str, RunningBatch]

    def _validated(self) -> None:
        """Called after each validation (the Engine wakes its worker)."""

    def _ordered(self) -> list[BatchRecord]:
        return sorted(self.batches.values(), key=lambda b: b.seq)

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
            validation = (
                validate_input(data, endpoint, config, self.tokens) if data is not None else None
            )
            with self.lock:
                batch = self.batches[batch_id]
                if batch.status == "validating":
                    self._finish_validation(batch, validation, data)
            self._validated()

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
        self._running[batch.id] = RunningBatch(validation.lines, validation.prompt_tokens, [])
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
            if running.results is not None:
                running.results.extend((r["custom_id"], r["ok"], r["line"]) for r in records)
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

    def _runtime(self, batch: BatchRecord) -> RunningBatch:
        running = self._running.get(batch.id)
        if running is None:
            lines = parse_lines(self.store.input_path(batch.id).read_bytes())
            tokens = self.tokens.count(batch.endpoint, [line.body for line in lines])
            running = self._running[batch.id] = RunningBatch(lines, tokens)
        return running

    def _write_outputs(
        self, batch: BatchRecord, unfinished: dict[str, str] | None, when: float
    ) -> None:
        """Write the output and error files from the results (plus never-run lines, if any)."""
        good: list[tuple[str, str]] = []
        bad: list[tuple[str, str]] = []
        running = self._running.get(batch.id)
        if (
            running is not None
            and running.results is not None
            and len(running.results) == batch.done
        ):
            results = running.results
        else:
            results = [
                (r["custom_id"], r["ok"], r["line"]) for r in self.store.read_results(batch.id)
            ]
        for custom_id, ok, text in results:
            (good if ok else bad).append((custom_id, text))
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
