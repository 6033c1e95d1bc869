"""The run manifest: the one contract between stages. Lives in object storage next to the run's data;
stages read it, advance it with the pure transitions in `tasks.transitions`, and write it back atomically."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from schemas.job import JobSpec

BatchStatus = Literal[
    "validating", "in_progress", "finalizing", "cancelling",
    "completed", "failed", "expired", "cancelled",
]  # fmt: skip
TERMINAL_BATCH_STATUSES: frozenset[str] = frozenset({"completed", "failed", "expired", "cancelled"})
OPEN_BATCH_STATUSES: frozenset[str] = frozenset(
    {"validating", "in_progress", "finalizing", "cancelling"}
)

ShardState = Literal[
    "prepared",  # request file written, nothing sent
    "submitting",  # intent recorded: an upload and a batch may exist remotely
    "submitted",  # batch created; batch_status follows the remote batch
    "terminal",  # batch reached a terminal status, results not yet collected
    "collected",  # output and error files parsed into results/errors Parquet
]

RunStatus = Literal[
    "prepared", "submitting", "waiting", "collected", "loaded", "abandoned"
]  # fmt: skip


class ShardCounts(BaseModel):
    lines: int = 0
    succeeded: int = 0
    failed: int = 0
    retryable: int = 0
    missing: int = 0


class Shard(BaseModel):
    shard_id: str  # "a{attempt}-s{index:05d}", unique within a run
    attempt: int
    index: int
    request_uri: str
    lines: int
    bytes: int
    input_tokens: int
    embedding_inputs: int = 0
    sha256: str
    state: ShardState = "prepared"
    submit_started_at: str | None = None
    # The submit lease: only its owner may upload or create a batch for this shard attempt, and only
    # before lease_expires_at (epoch seconds); renewed before each create. See tasks/leases.py.
    submit_owner: str | None = None
    lease_expires_at: float | None = None
    file_id: str | None = None
    batch_id: str | None = None
    batch_status: BatchStatus | None = None
    request_counts: dict[str, int] = Field(default_factory=dict)
    batch_errors: list[dict[str, Any]] = Field(default_factory=list)
    expires_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    submitted_at: str | None = None
    terminal_at: str | None = None
    results_uri: str | None = None
    errors_uri: str | None = None
    counts: ShardCounts = Field(default_factory=ShardCounts)
    provider_files_deleted: bool = False  # its input, output and error files, once collected


class CostEstimate(BaseModel):
    requests: int
    input_tokens: int
    output_tokens: int
    batch_usd: float
    standard_usd: float
    price_table_version: str


class StrayBatch(BaseModel):
    """A batch at the provider that carries this run's metadata but is not a shard's batch (left by
    an older version or by hand): cancelled if open, and its usage counted in the cost record."""

    batch_id: str
    shard_id: str
    attempt: int
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    found_at: str
    usage_counted: bool = False
    usage: dict[str, dict[str, int]] = Field(default_factory=dict)  # per model, as the cost record
    provider_files_deleted: bool = False


class Approval(BaseModel):
    """An over-budget run waiting for an operator: one request per run, held by one flow run."""

    requested_at: str
    requested_by: str  # the flow run (or process) that asked
    expires_at: float  # epoch seconds; after it, the request is void and the run stays unsubmitted
    decision: Literal["pending", "approved", "rejected"] = "pending"
    decided_by: str | None = None


class RunManifest(BaseModel):
    """The run. `_version` is the stored object's version (ETag on S3, content hash on disk) when the
    manifest was read; saving it is a compare-and-swap against that version (tasks.runs)."""

    _version: str | None = PrivateAttr(default=None)

    run_id: str
    job_name: str
    run_date: str
    job: JobSpec
    api: str | None = None  # the API the run is sent to (schemas.lineage); None: before it was kept
    status: RunStatus = "prepared"
    rows_selected: int = 0
    shards: list[Shard] = Field(default_factory=list)
    estimate: CostEstimate | None = None
    created_at: str
    updated_at: str
    loaded_at: str | None = None
    output_file_uri: str | None = None
    cost_record_uri: str | None = None
    dead_letter_uri: str | None = None
    dead_lettered: int = 0
    cache_hits: int = 0  # rows served from the result cache instead of being sent
    cache_hits_uri: str | None = None  # requests/cache-hits.parquet: custom_id, cache_key
    rows_refused: int = 0  # rows prepare did not send: they cannot succeed (tasks.rowgate)
    refused_uri: str | None = None  # requests/refused.parquet: their error rows, attempt 0
    budget_approved_by: str | None = None
    budget_approved_at: str | None = None
    approval: Approval | None = None
    stray_batches: list[StrayBatch] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    went_badly: str | None = None  # loaded, but with more dead letters than the job allows

    def shard(self, shard_id: str) -> Shard:
        for shard in self.shards:
            if shard.shard_id == shard_id:
                return shard
        raise KeyError(f"run {self.run_id} has no shard {shard_id}")

    @property
    def current_attempt(self) -> int:
        return max((s.attempt for s in self.shards), default=1)
