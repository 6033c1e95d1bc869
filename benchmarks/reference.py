"""A minimal sequential reference pipeline for the end-to-end benchmark: what a plain script does with
the Batch API on the same table and job — read the source, make one request line per row
(`json.dumps`), upload files of up to the job's lines per shard, create a batch for each, poll until
all are done, download the outputs, and write the answers as Parquet next to the source rows. No
validation, cache, retries, dead letter or cost record: the least work, done the obvious way."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import openai
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.storage import ObjectStore


def reference_run(job: Any, store: ObjectStore, poll_seconds: float = 1.0) -> dict[str, Any]:
    client = openai.OpenAI()
    source = store.read_table(job.source.uri)
    ids = [str(v) for v in source.column(job.source.id_column).to_pylist()]
    columns = {name: source.column(name).to_pylist() for name in job.request.template_fields()}
    body: dict[str, Any] = {"model": job.request.model, **job.request.params}
    per_file = job.limits.max_lines_per_shard
    batches = []
    for start in range(0, len(ids), per_file):
        lines = io.BytesIO()
        for i in range(start, min(start + per_file, len(ids))):
            text = job.request.template.format(**{k: v[i] for k, v in columns.items()})
            messages = [{"role": "system", "content": job.request.system_prompt},
                        {"role": "user", "content": text}]  # fmt: skip
            request = {"custom_id": ids[i], "method": "POST", "url": job.request.endpoint,
                       "body": {**body, "messages": messages}}  # fmt: skip
            lines.write(json.dumps(request).encode() + b"\n")
        lines.seek(0)
        upload = client.files.create(file=(f"ref-{start}.jsonl", lines), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint=job.request.endpoint, completion_window="24h"
        )
        batches.append(batch.id)
    done: dict[str, Any] = {}
    while len(done) < len(batches):
        for batch_id in batches:
            if batch_id not in done:
                batch = client.batches.retrieve(batch_id)
                if batch.status in ("completed", "failed", "expired", "cancelled"):
                    done[batch_id] = batch
        time.sleep(poll_seconds)
    answers: dict[str, str | None] = {}
    for batch in done.values():
        if batch.output_file_id:
            for line in client.files.content(batch.output_file_id).text.splitlines():
                record = json.loads(line)
                choices = record["response"]["body"].get("choices") or [{}]
                answers[record["custom_id"]] = choices[0].get("message", {}).get("content")
    out = source.append_column("answer", pa.array([answers.get(i) for i in ids], pa.string()))
    with store.open_atomic(f"{job.output_uri.rstrip('/')}-reference/part-0.parquet") as handle:
        pq.write_table(out, handle)
    return {"rows": len(ids), "answered": sum(a is not None for a in answers.values())}
