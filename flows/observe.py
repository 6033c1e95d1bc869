"""What an operator sees in the Prefect UI: artifacts per run, events on batch state changes and run
completion. Counts, ids and costs only — never prompts, outputs or keys."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event

from schemas.manifest import RunManifest, Shard
from tasks.storage import ObjectStore


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow only [a-z0-9-]."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def error_reasons(manifest: RunManifest, store: ObjectStore) -> Counter[str]:
    reasons: Counter[str] = Counter()
    for shard in manifest.shards:
        if shard.errors_uri and shard.counts.failed:
            codes = store.read_table(shard.errors_uri, columns=["code"]).column(0).to_pylist()
            reasons.update(str(c) for c in codes)
    return reasons


def progress_percent(manifest: RunManifest) -> float:
    """Share of this run's request lines whose batch has finished them."""
    total = sum(s.lines for s in manifest.shards) or 1
    done = 0
    for shard in manifest.shards:
        if shard.state in ("terminal", "collected"):
            done += shard.lines
        elif shard.request_counts:
            done += shard.request_counts.get("completed", 0) + shard.request_counts.get("failed", 0)
    return round(100.0 * done / total, 1)


def run_markdown(manifest: RunManifest, reasons: Counter[str]) -> str:
    states = Counter(_shard_status(s) for s in manifest.shards)
    counts = Counter[str]()
    for shard in manifest.shards:
        counts["succeeded"] += shard.counts.succeeded
        counts["failed (all attempts)"] += shard.counts.failed
        counts["retryable"] += shard.counts.retryable
        counts["missing"] += shard.counts.missing
    lines = [
        f"# {manifest.run_id}: {manifest.status}",
        "",
        f"- rows selected: **{manifest.rows_selected}**, shards: **{len(manifest.shards)}**, "
        f"attempts: **{manifest.current_attempt if manifest.shards else 0}**",
    ]
    if manifest.estimate:
        lines.append(
            f"- estimate: **${manifest.estimate.batch_usd:.4f}** at batch prices "
            f"(${manifest.estimate.standard_usd:.4f} standard), {manifest.estimate.input_tokens} input tokens"
        )
    if manifest.status == "loaded":
        lines.append(
            f"- enriched rows: `{manifest.output_file_uri}`; dead-lettered: **{manifest.dead_lettered}**"
        )
    lines += ["", "| shard state | shards |", "|---|---|"]
    lines += [f"| {state} | {n} |" for state, n in sorted(states.items())]
    lines += ["", "| lines | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    if reasons:
        lines += ["", "| top error reasons | lines |", "|---|---|"]
        lines += [f"| {code} | {n} |" for code, n in reasons.most_common(10)]
    lines += [
        "",
        "| shard | attempt | batch | status | lines | ok | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.shard_id} | {s.attempt} | {s.batch_id or '-'} | {_shard_status(s)} | {s.lines} | "
        f"{s.counts.succeeded} | {s.counts.failed} |"
        for s in manifest.shards[:200]
    ]
    return "\n".join(lines)


def _shard_status(shard: Shard) -> str:
    if shard.state in ("submitted", "terminal") and shard.batch_status:
        return shard.batch_status
    return shard.state


def publish_run(manifest: RunManifest, store: ObjectStore) -> None:
    """The run's markdown artifact (versioned under one key per job and date)."""
    create_markdown_artifact(
        markdown=run_markdown(manifest, error_reasons(manifest, store)),
        key=artifact_key("run", manifest.job_name, manifest.run_date),
        description=f"nightbatch run {manifest.run_id}",
    )


def publish_loaded(manifest: RunManifest, records: list[dict[str, Any]]) -> None:
    table = [
        {k: r[k] for k in ("run_id", "model", "requests", "requests_succeeded", "requests_dead_lettered",
                           "input_tokens", "cached_tokens", "output_tokens", "cost_batch_usd",
                           "cost_standard_usd", "savings_usd", "estimated_cost_batch_usd")}
        for r in records
    ]  # fmt: skip
    create_table_artifact(
        table=table,
        key=artifact_key("cost", manifest.job_name),
        description=f"cost record of {manifest.run_id}",
    )
    if manifest.output_file_uri:
        create_link_artifact(
            link=manifest.output_file_uri,
            link_text=f"enriched rows of {manifest.run_id}",
            key=artifact_key("output", manifest.job_name),
        )
    cost = sum(r["cost_batch_usd"] for r in records)
    emit_event(
        event="nightbatch.run.loaded",
        resource={
            "prefect.resource.id": f"nightbatch.run.{manifest.run_id}",
            "nightbatch.job": manifest.job_name,
        },
        payload={
            "run_id": manifest.run_id,
            "rows": manifest.rows_selected,
            "dead_lettered": manifest.dead_lettered,
            "cost_batch_usd": cost,
            "savings_usd": sum(r["savings_usd"] for r in records),
            "over_budget": bool(
                manifest.job.limits.max_cost_usd is not None
                and cost > manifest.job.limits.max_cost_usd
            ),
        },
    )


def batch_changed(manifest: RunManifest, shard: Shard, old_status: str | None) -> None:
    """An event per batch state change, so an automation can alert on an expired or failed batch."""
    emit_event(
        event=f"nightbatch.batch.{shard.batch_status}",
        resource={
            "prefect.resource.id": f"openai.batch.{shard.batch_id}",
            "nightbatch.job": manifest.job_name,
        },
        related=[
            {
                "prefect.resource.id": f"nightbatch.run.{manifest.run_id}",
                "prefect.resource.role": "run",
            }
        ],
        payload={
            "run_id": manifest.run_id,
            "shard": shard.shard_id,
            "batch_id": shard.batch_id,
            "from": old_status,
            "to": shard.batch_status,
            "request_counts": shard.request_counts,
        },
    )


def over_budget(manifest: RunManifest) -> None:
    emit_event(
        event="nightbatch.run.over-budget",
        resource={
            "prefect.resource.id": f"nightbatch.run.{manifest.run_id}",
            "nightbatch.job": manifest.job_name,
        },
        payload={
            "run_id": manifest.run_id,
            "estimated_cost_batch_usd": manifest.estimate.batch_usd if manifest.estimate else None,
            "max_cost_usd": manifest.job.limits.max_cost_usd,
        },
    )


class Progress:
    """A progress artifact for the current flow run, updated as batches finish."""

    def __init__(self, manifest: RunManifest) -> None:
        self.id: UUID = create_progress_artifact(  # type: ignore[assignment]
            progress=progress_percent(manifest),
            key=artifact_key("progress", manifest.job_name),
            description=f"share of {manifest.run_id}'s request lines finished by their batches",
        )

    def update(self, manifest: RunManifest) -> None:
        update_progress_artifact(artifact_id=self.id, progress=progress_percent(manifest))
