"""What an operator sees in the Prefect UI: artifacts per run, events on batch state changes and run
completion. Counts, ids and costs only — never prompts, outputs or keys."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
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


def shard_states(manifest: RunManifest) -> dict[str, int]:
    """How many shards are in each state, with a batch's own status while it has one."""
    return dict(Counter(_shard_status(s) for s in manifest.shards))


def run_markdown(
    manifest: RunManifest, reasons: Counter[str], records: list[dict[str, Any]] | None = None
) -> str:
    states = shard_states(manifest)
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
    if manifest.cache_hits or manifest.rows_refused:
        lines.append(
            f"- served from the cache: **{manifest.cache_hits}**; not sent (they cannot succeed, "
            f"in the dead letter): **{manifest.rows_refused}**"
        )
    if manifest.estimate:
        lines.append(
            f"- estimate: **${manifest.estimate.batch_usd:.4f}** at batch prices "
            f"(${manifest.estimate.standard_usd:.4f} standard), {manifest.estimate.input_tokens} input tokens"
        )
    if records:
        cost = sum(r["cost_batch_usd"] for r in records)
        standard = sum(r["cost_standard_usd"] for r in records)
        saved = sum(r["savings_usd"] for r in records)
        share = f" ({100 * saved / standard:.0f}%)" if standard else ""
        lines.append(
            f"- actual cost: **${cost:.4f}**, ${standard:.4f} at standard prices: "
            f"saved **${saved:.4f}**{share}"
        )
    if manifest.stray_batches:
        lines.append(
            f"- stray batches found and counted: {', '.join(s.batch_id for s in manifest.stray_batches)}"
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


def publish_run(
    manifest: RunManifest, store: ObjectStore, records: list[dict[str, Any]] | None = None
) -> None:
    """The run's markdown artifact (versioned under one key per job and date), and its progress;
    with the cost records once loaded (the actual cost and saving, not the estimate)."""
    publish_progress(manifest)
    create_markdown_artifact(
        markdown=run_markdown(manifest, error_reasons(manifest, store), records),
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
            "not_sent": manifest.rows_refused,
            "dead_letter_fraction": manifest.dead_lettered / manifest.rows_selected
            if manifest.rows_selected
            else 0.0,
            "went_badly": manifest.went_badly,
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


def publish_progress(manifest: RunManifest) -> None:
    """The run's progress (share of its request lines finished by their batches), as a progress
    artifact of the current flow run: whichever stage, poller or pipeline is working on the run."""
    create_progress_artifact(
        progress=progress_percent(manifest),
        key=artifact_key("progress", manifest.job_name),
        description=f"share of {manifest.run_id}'s request lines finished by their batches",
    )


def stage_failed(run_id: str, job: str, stage: str, flow_run_id: str, state: str, why: str) -> None:
    """A stage run of a run failed, crashed or was cancelled (the poller starts it again)."""
    _run_event("nightbatch.stage.failed", run_id, job, {"stage": stage, "flow_run_id": flow_run_id, "state": state, "reason": why})  # fmt: skip


def run_stuck(run_id: str, job: str, stage: str, why: str) -> None:
    """A run does not move: a stage run ran past its timeout, or failed more often than allowed."""
    _run_event("nightbatch.run.stuck", run_id, job, {"stage": stage, "reason": why})


def _run_event(event: str, run_id: str, job: str, payload: dict[str, Any]) -> None:
    emit_event(
        event=event,
        resource={"prefect.resource.id": f"nightbatch.run.{run_id}", "nightbatch.job": job},
        payload={"run_id": run_id, **payload},
    )
