"""Where a run's files live. Pure string building on URIs (local paths or s3://)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


OPEN_RUNS_DIR = "runs-open"


def root_digest(root: str) -> str:
    """A short stable name of a storage root (for batch metadata and upload names)."""
    return hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:12]


def run_id_for(job_name: str, run_date: str) -> str:
    return f"{job_name}-{run_date}"


@dataclass(frozen=True)
class RunLayout:
    root: str
    job_name: str
    run_date: str

    @property
    def run_dir(self) -> str:
        return join_uri(self.root, "runs", self.job_name, self.run_date)

    @property
    def manifest(self) -> str:
        return join_uri(self.run_dir, "manifest.json")

    @property
    def open_marker(self) -> str:
        """The run's entry in the index of open runs (tasks.runs.list_open_manifests)."""
        return join_uri(self.root, OPEN_RUNS_DIR, f"{self.job_name}__{self.run_date}")

    def request_file(self, attempt: int, index: int) -> str:
        return join_uri(self.run_dir, "requests", f"attempt-{attempt}", f"shard-{index:05d}.jsonl")

    def ids_file(self, attempt: int, index: int) -> str:
        return join_uri(
            self.run_dir, "requests", f"attempt-{attempt}", f"shard-{index:05d}.ids.parquet"
        )

    def results_file(self, attempt: int, index: int) -> str:
        return join_uri(self.run_dir, "results", f"attempt-{attempt}", f"shard-{index:05d}.parquet")

    def errors_file(self, attempt: int, index: int) -> str:
        return join_uri(self.run_dir, "errors", f"attempt-{attempt}", f"shard-{index:05d}.parquet")

    @property
    def cache_hits(self) -> str:
        return join_uri(self.run_dir, "requests", "cache-hits.parquet")

    @property
    def refused(self) -> str:
        return join_uri(self.run_dir, "requests", "refused.parquet")

    @property
    def dead_letter(self) -> str:
        return join_uri(self.run_dir, "dead_letter.parquet")

    @property
    def cost_record(self) -> str:
        return join_uri(self.root, "costs", f"{self.job_name}__{self.run_date}.parquet")

    @property
    def costs_dir(self) -> str:
        return join_uri(self.root, "costs")


def output_file(output_uri: str, run_date: str) -> str:
    return join_uri(output_uri, f"run_date={run_date}", "part-0.parquet")
