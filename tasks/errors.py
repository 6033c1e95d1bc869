"""The exception hierarchy for operational errors.

Per-request failures (error lines, missing lines, expired or cancelled lines) are *data*, never
exceptions. Exceptions are for what stops a stage:

    NightbatchError
    ├── TransientError      retrying the same step may succeed (API 429/5xx/timeouts, storage hiccups);
    │   ├── BatchApiUnavailable   Prefect task retries are driven by this branch only
    │   └── WriteConflictError    a conditional write lost a race: re-read, re-apply, write again
    └── TerminalError       retrying will not help until something changes
        ├── BadInputError       the job spec or the source data is wrong; raised before anything is paid
        ├── BudgetExceededError the estimate is above the job's max_cost_usd
        ├── InvalidTransitionError  a manifest transition from the wrong state
        ├── RunNotFoundError    no manifest for the run
        ├── LeaseLostError      another process holds the submit lease of a shard: leave it to them
        ├── RunWentBadlyError   loaded, but with more dead letters than limits.max_dead_letter_fraction
        └── BatchApiError       the Batch API refused a request (400/401/404/409...)
            └── ProviderFileGoneError  an output or error file the provider no longer has
"""

from __future__ import annotations


class NightbatchError(Exception):
    """Base of every error nightbatch raises on purpose."""


class TransientError(NightbatchError):
    """A failure that may go away if the same step is retried later."""


class TerminalError(NightbatchError):
    """A failure that retrying the same step will not fix."""


class BatchApiUnavailable(TransientError):
    """The Batch API did not answer usefully (connection error, timeout, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WriteConflictError(TransientError):
    """An object changed between our read and our conditional write (another stage, poller or CLI
    wrote it). The caller re-reads and applies its change again; it never overwrites blindly."""


class BatchApiError(TerminalError):
    """The Batch API rejected a request (`status`: its HTTP status, when it answered)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ProviderFileGoneError(BatchApiError):
    """A batch's output or error file is no longer at the provider (its retention passed, or it was
    deleted by hand): its lines cannot be read, so they count as missing and are sent again."""


class BadInputError(TerminalError):
    """The job spec or its source data cannot be turned into requests; the message says how to fix it."""


class BudgetExceededError(TerminalError):
    """The run's estimated cost is above the job's budget."""


class InvalidTransitionError(TerminalError):
    """A manifest transition was asked of a shard or run in the wrong state."""


class RunNotFoundError(TerminalError):
    """There is no manifest for the requested run."""


class RunWentBadlyError(TerminalError):
    """The run loaded what succeeded, but more of its rows are in the dead letter than the job
    allows (limits.max_dead_letter_fraction). Carries the run's summary."""

    def __init__(self, message: str, summary: dict[str, object]) -> None:
        super().__init__(message)
        self.summary = summary


class LeaseLostError(TerminalError):
    """The submit lease of a shard is held by another process (or was taken over after it expired):
    this process must not upload or create anything for that shard."""
