"""Estimates before paying and cost records after loading. Pure: callers pass the numbers in."""

from __future__ import annotations

from typing import Any

from schemas.job import JobSpec
from schemas.manifest import CostEstimate, RunManifest
from schemas.pricing import PriceTable, load_price_table
from tasks.costing import TokenUsage, estimate_output_tokens, price_usage
from tasks.errors import BudgetExceededError


def price_table_for(job: JobSpec) -> PriceTable:
    return load_price_table(job.price_table_path, job.prices or None)


def max_output_tokens(job: JobSpec) -> int | None:
    params = job.request.params
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if isinstance(params.get(key), int):
            return int(params[key])
    return None


def estimate_cost(
    job: JobSpec, requests: int, input_tokens: int, past_output_mean: float | None = None
) -> CostEstimate:
    """Exact input tokens (counted at prepare) and output tokens bounded by the request's max tokens,
    or this job's mean from past runs where there is one. Embeddings have no output tokens."""
    table = price_table_for(job)
    price = table.price_for(job.request.model)
    if job.request.endpoint == "/v1/embeddings":
        per_request_out = 0
    else:
        per_request_out = estimate_output_tokens(max_output_tokens(job), past_output_mean)
    usage = TokenUsage(input_tokens=input_tokens, output_tokens=per_request_out * requests)
    cost = price_usage(usage, price)
    return CostEstimate(
        requests=requests,
        input_tokens=input_tokens,
        output_tokens=usage.output_tokens,
        batch_usd=float(cost.batch_usd),
        standard_usd=float(cost.standard_usd),
        price_table_version=table.version,
    )


def cost_records(
    manifest: RunManifest,
    usage_by_model: dict[str, dict[str, int]],
    succeeded: int,
    failed: int,
    dead_lettered: int,
    loaded_at: str,
    cached_usage_by_model: dict[str, dict[str, int]] | None = None,
) -> list[dict[str, Any]]:
    """One row per run and model (a run with nothing billed still gets one row, at $0). Rows served
    from the result cache are not billed; what sending them again would have cost is `cache_avoided_*`."""
    from datetime import datetime

    job = manifest.job
    table = price_table_for(job)
    attempts = max((s.attempt for s in manifest.shards), default=0)
    started = datetime.fromisoformat(manifest.created_at)
    duration = (datetime.fromisoformat(loaded_at) - started).total_seconds()
    cached = cached_usage_by_model or {}
    models = sorted(set(usage_by_model) | set(cached)) or [job.request.model]
    rows = []
    for model in models:
        totals = usage_by_model.get(model, {})
        avoided = price_usage(_usage(cached.get(model, {})), table.price_for(model))
        usage = _usage(totals)
        cost = price_usage(usage, table.price_for(model))
        estimate = manifest.estimate
        rows.append(
            {
                "run_id": manifest.run_id,
                "job": job.name,
                "run_date": manifest.run_date,
                "tags": list(job.tags.items()),
                "model": model,
                "endpoint": job.request.endpoint,
                "attempts": attempts,
                "requests": manifest.rows_selected,
                "requests_succeeded": succeeded,
                "requests_failed": failed,
                "requests_dead_lettered": dead_lettered,
                "billed_lines": totals.get("lines", 0),
                "input_tokens": usage.input_tokens,
                "cached_tokens": usage.cached_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
                "output_tokens": usage.output_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
                "cost_batch_usd": float(cost.batch_usd),
                "cost_standard_usd": float(cost.standard_usd),
                "savings_usd": float(cost.savings_usd),
                "requests_cached": cached.get(model, {}).get("lines", 0),
                "cache_avoided_batch_usd": float(avoided.batch_usd),
                "cache_avoided_standard_usd": float(avoided.standard_usd),
                "estimated_cost_batch_usd": estimate.batch_usd if estimate else None,
                "estimated_input_tokens": estimate.input_tokens if estimate else None,
                "price_table_version": table.version,
                "started_at": manifest.created_at,
                "loaded_at": loaded_at,
                "duration_seconds": duration,
            }
        )
    return rows


def check_budget(manifest: RunManifest) -> None:
    """Stop before submit when the estimate is above the job's budget."""
    budget = manifest.job.limits.max_cost_usd
    estimate = manifest.estimate
    if budget is None or estimate is None or estimate.batch_usd <= budget:
        return
    if manifest.budget_approved_at is not None:
        return  # an operator approved this run's estimate
    raise BudgetExceededError(
        f"run {manifest.run_id} is estimated at ${estimate.batch_usd:.2f} at batch prices, above "
        f"limits.max_cost_usd = ${budget:.2f}; nothing was submitted. Raise the budget, or select "
        "fewer rows (source.filter) or lower the request's max tokens."
    )


def _usage(totals: dict[str, int]) -> TokenUsage:
    return TokenUsage(
        input_tokens=totals.get("input_tokens", 0),
        cached_tokens=totals.get("cached_tokens", 0),
        cache_write_tokens=totals.get("cache_write_tokens", 0),
        output_tokens=totals.get("output_tokens", 0),
        reasoning_tokens=totals.get("reasoning_tokens", 0),
    )
