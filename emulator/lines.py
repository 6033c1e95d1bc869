"""One batch line, from input to result record, and the output/error file contents built from them.

A result record is what `results.jsonl` keeps for a finished line:
`{"k": index, "custom_id", "ok": bool, "line": "<the output/error file line, serialized>",
"usage": billed usage | null, "forced": bool}`. The serialized line is stored as is, so output files
rebuilt after a restart are byte-identical.
"""

from __future__ import annotations

from typing import Any

import orjson

from emulator.config import EmulatorConfig
from emulator.faults import FaultCounters, choose_line_fault, fault_outcome
from emulator.ids import LineIds, hex_id
from emulator.models import BatchRecord
from emulator.responders import LineContext, Reply, respond
from emulator.validation import InputLine


def line_id(batch: BatchRecord, custom_id: str) -> str:
    return "batch_req_" + LineIds(batch.seed, batch.seq, custom_id).line


def _dump(line: dict[str, Any]) -> str:
    return orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def process_line(
    batch: BatchRecord,
    k: int,
    line: InputLine,
    prompt_tokens: int,
    config: EmulatorConfig,
    counters: FaultCounters,
) -> dict[str, Any]:
    """Run line `k` of a batch (fault injection first, then the responder) into a result record."""
    ids = LineIds(batch.seed, batch.seq, line.custom_id)
    kind, forced = choose_line_fault(config.faults, counters, batch.seed, batch.seq, line.custom_id)
    outcome: Reply | dict[str, str]
    if kind is not None:
        model = str(line.body.get("model"))
        outcome = fault_outcome(
            kind, batch.endpoint, model, prompt_tokens, config.context_window_tokens
        )
    else:
        created = int(batch.time_when_done(k + 1))
        outcome = respond(
            batch.endpoint, line.body, prompt_tokens, LineContext(ids, created, config)
        )
    if isinstance(outcome, Reply):
        response: dict[str, Any] | None = {
            "status_code": outcome.status,
            "request_id": ids.request,
            "body": outcome.body,
        }
        error = None
        ok = outcome.status == 200
    else:
        response, error, ok = None, outcome, False
    output: dict[str, Any] = {
        "id": "batch_req_" + ids.line,
        "custom_id": line.custom_id,
        "response": response,
        "error": error,
    }
    return {
        "k": k,
        "custom_id": line.custom_id,
        "ok": ok,
        "line": _dump(output),
        "usage": outcome.usage if ok and isinstance(outcome, Reply) else None,
        "forced": forced,
    }


def unfinished_line(batch: BatchRecord, custom_id: str, error: dict[str, str]) -> str:
    """An error-file line for a request that never ran (batch_expired / batch_cancelled)."""
    line = {"id": line_id(batch, custom_id), "custom_id": custom_id, "response": None}
    return _dump(line | {"error": dict(error)})


def file_content(lines: list[tuple[str, str]], batch: BatchRecord, shuffle: bool) -> bytes:
    """JSONL bytes of (custom_id, serialized line) pairs; a deterministic shuffle when asked."""
    if shuffle:
        lines = sorted(lines, key=lambda item: hex_id(batch.seed, batch.seq, item[0], "order"))
    return "".join(text + "\n" for _, text in lines).encode()
