"""`nightbatch plan`: what a run would do and cost — rows selected, served from the cache, refused at
prepare and why, shards, input tokens, the estimate at batch and standard prices, and what the batch
queue would admit now — computed by the same prepare as a real run, into a temporary local directory
that is deleted afterwards. Nothing is written to the storage root, nothing is uploaded or sent."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from tasks.admission import admit, queue_state
from tasks.cache import ResultCache
from tasks.costrecord import estimate_cost
from tasks.costreport import past_output_mean
from tasks.layout import RunLayout, run_id_for
from tasks.preflight import PreflightResult
from tasks.prepare import write_shards
from tasks.runs import list_open_manifests
from tasks.storage import ObjectStore


@dataclass
class Plan:
    run_id: str
    model: str
    endpoint: str
    api: str
    existing_run: str | None  # the status of the run this date already has: `run` resumes it
    rows_selected: int
    cache_hits: int
    not_sent: dict[str, int]  # refused at prepare, by reason (tasks.rowgate)
    rows_to_send: int
    shards: int
    input_tokens: int
    tokens_exact: bool
    output_tokens_estimated: int
    batch_usd: float
    standard_usd: float
    saving_usd: float
    price_table_version: str
    shards_admitted_now: int  # by the batch queue (limits.max_enqueued_tokens) and creation cap
    queued_tokens: int  # of this model, in nightbatch's open batches under the storage root
    max_enqueued_tokens: int | None
    max_cost_usd: float | None
    over_budget: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(checked: PreflightResult, store: ObjectStore) -> Plan:
    job, run_date, api = checked.job, checked.run_date, checked.api
    now = datetime.now(UTC)
    index = None
    if job.cache.enabled and not job.cache.refresh:
        index = ResultCache(store, job.storage_root, job, api).index(job.cache.max_age_days, now)
    with tempfile.TemporaryDirectory(prefix="nightbatch-plan-") as scratch:
        result = write_shards(job, store, RunLayout(scratch, job.name, run_date), cache_index=index)
        reasons: Counter[str] = Counter()
        if result.refused_uri:
            reasons.update(
                store.read_table(result.refused_uri, columns=["code"]).column(0).to_pylist()
            )
    to_send = result.rows - result.cache_hits - result.refused
    tokens = sum(s.input_tokens for s in result.shards)
    past = past_output_mean(store, job.storage_root, job.name, job.request.model, run_date)
    estimate = estimate_cost(job, to_send, tokens, past)
    open_runs = list_open_manifests(store, job.storage_root, now, tidy=False)
    queue = queue_state(open_runs, job.request.model, now)
    admitted = admit(result.shards, queue, job.limits.max_enqueued_tokens)
    budget = job.limits.max_cost_usd
    notes = []
    if checked.existing is not None:
        notes.append(
            f"run {checked.existing.run_id} exists ({checked.existing.status}): `nightbatch run` "
            "resumes it as prepared then; this plan is what a fresh prepare would do today"
        )
    if not result.rows:
        notes.append("no rows selected: check source.filter and source.uri")
    if len(admitted) < len(result.shards):
        notes.append(
            f"{len(result.shards) - len(admitted)} shard(s) would wait for room in the batch queue"
        )
    return Plan(
        run_id=run_id_for(job.name, run_date),
        model=job.request.model,
        endpoint=job.request.endpoint,
        api=api,
        existing_run=checked.existing.status if checked.existing else None,
        rows_selected=result.rows,
        cache_hits=result.cache_hits,
        not_sent=dict(reasons.most_common()),
        rows_to_send=to_send,
        shards=len(result.shards),
        input_tokens=tokens,
        tokens_exact=result.tokens_exact,
        output_tokens_estimated=estimate.output_tokens,
        batch_usd=estimate.batch_usd,
        standard_usd=estimate.standard_usd,
        saving_usd=estimate.standard_usd - estimate.batch_usd,
        price_table_version=estimate.price_table_version,
        shards_admitted_now=len(admitted),
        queued_tokens=queue.queued_tokens,
        max_enqueued_tokens=job.limits.max_enqueued_tokens,
        max_cost_usd=budget,
        over_budget=budget is not None and estimate.batch_usd > budget,
        notes=notes,
    )


def plan_lines(plan: Plan) -> list[str]:
    """The plan as a short table for people."""
    saving = 100 * plan.saving_usd / plan.standard_usd if plan.standard_usd else 0.0
    refused = sum(plan.not_sent.values())
    why = ", ".join(f"{code} {n:,}" for code, n in plan.not_sent.items())
    queue = f"{plan.shards_admitted_now} of {plan.shards} shard(s) admitted now"
    if plan.max_enqueued_tokens is not None:
        queue += (
            f" (limit {plan.max_enqueued_tokens:,} tokens; nightbatch's open batches of "
            f"{plan.model} hold {plan.queued_tokens:,})"
        )
    budget = "no limit (limits.max_cost_usd)"
    if plan.max_cost_usd is not None:
        verdict = "OVER: the run would stop before submitting" if plan.over_budget else "within"
        budget = f"${plan.max_cost_usd:,.2f}: {verdict}"
    lines = [
        f"plan for {plan.run_id}: {plan.model} on {plan.endpoint} via {plan.api} "
        "(nothing written, uploaded or sent)",
        f"  rows selected   : {plan.rows_selected:,}",
        f"  from the cache  : {plan.cache_hits:,}",
        f"  not sent        : {refused:,}" + (f" ({why}: they cannot succeed)" if refused else ""),
        f"  to send         : {plan.rows_to_send:,} in {plan.shards:,} shard(s)",
        f"  input tokens    : {plan.input_tokens:,} ({'exact' if plan.tokens_exact else 'sampled estimate'})",
        f"  output tokens   : {plan.output_tokens_estimated:,} (estimated)",
        f"  cost            : ${plan.batch_usd:,.4f} at batch prices, ${plan.standard_usd:,.4f} at "
        f"standard prices: saving ${plan.saving_usd:,.4f} ({saving:.1f}%)",
        f"  batch queue     : {queue}",
        f"  budget          : {budget}",
        f"  prices          : table {plan.price_table_version}",
    ]
    return lines + [f"  note: {note}" for note in plan.notes]
