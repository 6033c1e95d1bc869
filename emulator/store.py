"""Persistence: every piece of emulator state lives in the state directory.

    {state_dir}/clock.json                       emulated clock anchor
    {state_dir}/files/{file_id}.json             file record (kept, marked deleted, after DELETE)
    {state_dir}/files/{file_id}.blob             file content
    {state_dir}/batches/{batch_id}/batch.json    batch record (status, timestamps, fault decisions)
    {state_dir}/batches/{batch_id}/input.jsonl   hard link to (or copy of) the input blob, taken when
                                                 validation passes, so deleting the input file is harmless
    {state_dir}/batches/{batch_id}/results.jsonl one record per finished line, appended in line order

JSON documents are replaced atomically; results are append-only and a torn last line (a crash mid-write)
is dropped on load, so a restart resumes exactly where the last complete record left off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson

from emulator.models import BatchRecord, FileRecord


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.batches_dir = root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)

    # files

    def load_files(self) -> list[FileRecord]:
        records = [
            FileRecord.model_validate(json.loads(p.read_text()))
            for p in self.files_dir.glob("*.json")
        ]
        return sorted(records, key=lambda r: r.seq)

    def save_file(self, record: FileRecord) -> None:
        write_json_atomic(self.files_dir / f"{record.id}.json", record.model_dump())

    def blob_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.blob"

    def write_blob(self, file_id: str, data: bytes) -> None:
        tmp = self.files_dir / f".{file_id}.blob.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.blob_path(file_id))

    def delete_blob(self, file_id: str) -> None:
        self.blob_path(file_id).unlink(missing_ok=True)

    # batches

    def load_batches(self) -> list[BatchRecord]:
        records = [
            BatchRecord.model_validate(json.loads(p.read_text()))
            for p in self.batches_dir.glob("*/batch.json")
        ]
        return sorted(records, key=lambda r: r.seq)

    def save_batch(self, record: BatchRecord) -> None:
        write_json_atomic(self.batches_dir / record.id / "batch.json", record.model_dump())

    def input_path(self, batch_id: str) -> Path:
        return self.batches_dir / batch_id / "input.jsonl"

    def keep_input(self, batch_id: str, file_id: str, data: bytes) -> None:
        """Pin the validated input for this batch: a hard link to the blob, else a copy of `data`."""
        target = self.input_path(batch_id)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(self.blob_path(file_id), target)
        except OSError:  # another device, or the file was deleted meanwhile
            tmp = target.with_name(".input.jsonl.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)

    def results_path(self, batch_id: str) -> Path:
        return self.batches_dir / batch_id / "results.jsonl"

    def append_results(self, batch_id: str, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        payload = b"".join(orjson.dumps(r) + b"\n" for r in records)
        with self.results_path(batch_id).open("ab") as fh:
            fh.write(payload)
            fh.flush()

    def read_results(self, batch_id: str) -> list[dict[str, Any]]:
        """The complete result records of a batch, in line order; a torn tail is cut off the file."""
        path = self.results_path(batch_id)
        if not path.exists():
            return []
        data = path.read_bytes()
        records: list[dict[str, Any]] = []
        offset = 0
        while (end := data.find(b"\n", offset)) != -1:
            try:
                record = orjson.loads(data[offset:end])
            except orjson.JSONDecodeError:
                break
            if record.get("k") != len(records):
                break
            records.append(record)
            offset = end + 1
        if offset < len(data):
            with path.open("r+b") as fh:
                fh.truncate(offset)
        return records
