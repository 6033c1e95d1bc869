"""Reading the cost records table and totalling it by job, day or tag."""

from __future__ import annotations

import pandas as pd

from schemas.tables import COST_RECORD_SCHEMA
from tasks.layout import join_uri
from tasks.storage import ObjectStore

MONEY = ["cost_batch_usd", "cost_standard_usd", "savings_usd"]


HISTORY_RUNS = 30  # the estimate's output tokens come from the job's latest runs, at most this many


def read_cost_records(
    store: ObjectStore, root: str, files: list[str] | None = None
) -> pd.DataFrame:
    """The cost records under `root` (or just `files` of them)."""
    if files is None:
        files = store.list_files(join_uri(root, "costs"), suffix=".parquet")
    if not files:
        return COST_RECORD_SCHEMA.empty_table().to_pandas()
    return pd.concat([store.read_table(f).to_pandas() for f in files], ignore_index=True)


def cost_totals(records: pd.DataFrame, by: str) -> pd.DataFrame:
    """Totals with savings by `job`, `run_date` or `tag` (a run counts under each of its tags)."""
    frame = records
    if by == "tag":
        frame = records.assign(
            tag=records["tags"].map(lambda tags: [f"{k}={v}" for k, v in tags] or ["(none)"])
        )
        frame = frame.explode("tag")
    totals = (
        frame.groupby(by)
        .agg(runs=("run_id", "nunique"), requests=("requests", "sum"), input_tokens=("input_tokens", "sum"),
             output_tokens=("output_tokens", "sum"), **{m: (m, "sum") for m in MONEY})
        .reset_index()
    )  # fmt: skip
    totals["savings_pct"] = (
        100
        * totals["savings_usd"]
        / totals["cost_standard_usd"].where(totals["cost_standard_usd"] > 0)
    ).round(1)
    return totals.round({m: 6 for m in MONEY})


def past_output_mean(
    store: ObjectStore, root: str, job_name: str, model: str, exclude_run_date: str
) -> float | None:
    """Mean output tokens per billed line over this job's latest runs (HISTORY_RUNS of them) of the
    same model, if any: one listing and a bounded number of reads, whatever the history."""
    mine = [
        uri
        for uri in store.list_files(join_uri(root, "costs"), ".parquet", prefix=f"{job_name}__")
        if uri.rsplit("/", 1)[-1].rsplit("__", 1)[0] == job_name
        and not uri.endswith(f"__{exclude_run_date}.parquet")
    ]
    records = read_cost_records(store, root, sorted(mine)[-HISTORY_RUNS:])
    if records.empty:
        return None
    past = records[
        (records["job"] == job_name)
        & (records["model"].map(lambda m: m == model or _snapshot_of(m) == model))
        & (records["run_date"] != exclude_run_date)
    ]
    lines = int(past["billed_lines"].sum())
    return float(past["output_tokens"].sum()) / lines if lines else None


def _snapshot_of(model: str) -> str | None:
    """The base name of a dated snapshot (`gpt-4o-mini-2024-07-18` -> `gpt-4o-mini`), else None:
    `gpt-4o` never averages `gpt-4o-mini` runs."""
    base, dash, date = model[:-11], model[-11:-10], model[-10:]
    is_date = len(date) == 10 and date[4] == date[7] == "-" and date.replace("-", "").isdigit()
    return base if dash == "-" and is_date else None
