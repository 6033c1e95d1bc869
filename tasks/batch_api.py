"""The Batch API adapter: the only module that talks to the `openai` SDK.

Every call maps SDK exceptions onto our hierarchy: connection errors, timeouts, 429 and 5xx become
`BatchApiUnavailable` (after the SDK's own retries); other API errors become `BatchApiError`.
Empty-string file ids are treated as absent."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import openai
from pydantic import BaseModel, Field

from tasks.errors import BatchApiError, BatchApiUnavailable, ProviderFileGoneError

T = TypeVar("T")


class BatchInfo(BaseModel):
    """What nightbatch keeps of a remote batch."""

    id: str
    status: str
    input_file_id: str
    endpoint: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int | None = None
    expires_at: int | None = None
    request_counts: dict[str, int] = Field(default_factory=dict)
    errors: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_sdk(cls, batch: Any) -> BatchInfo:
        counts = batch.request_counts
        errors = batch.errors.data if batch.errors and batch.errors.data else []
        return cls(
            id=batch.id,
            status=batch.status,
            input_file_id=batch.input_file_id,
            endpoint=batch.endpoint,
            output_file_id=batch.output_file_id or None,
            error_file_id=batch.error_file_id or None,
            created_at=batch.created_at,
            expires_at=batch.expires_at,
            request_counts=(
                {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
                if counts
                else {}
            ),
            errors=[e.model_dump() for e in errors],
            metadata=dict(batch.metadata or {}),
        )


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def redact(text: str, secret: str | None) -> str:
    """Remove a secret (and any echo of its tail, as APIs print "sk-...wxyz") from a message."""
    if not secret:
        return text
    text = text.replace(secret, "***")
    return text.replace(secret[-4:], "***") if len(secret) >= 12 else text


def _translate(exc: Exception, what: str, secret: str | None = None) -> Exception:
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return BatchApiUnavailable(f"{what}: Batch API unreachable ({type(exc).__name__})")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = redact(str(exc.message), secret)
        if status == 429 or status >= 500 or status == 408:
            return BatchApiUnavailable(f"{what}: HTTP {status}: {message}", _retry_after(exc))
        return BatchApiError(f"{what}: HTTP {status}: {message}", status)
    return exc


# The provider's own retention of our files, a second line of defence behind deleting them once
# collected (tasks/providerfiles.py): a week covers the 24-hour window, the wait and a late resume.
FILE_RETENTION: Any = {"anchor": "created_at", "seconds": 7 * 24 * 3600}
SDK_RETRIES = 4  # of an idempotent call (retrieve, list, download, delete, cancel), by the SDK


class BatchApi:
    """Files + Batches operations over an injected `openai.OpenAI` client.

    One retry layer per concern: the SDK retries idempotent calls (`SDK_RETRIES`, set where the
    client is built, with backoff that honours Retry-After); uploads and `batches.create` are never
    retried here — they carry no idempotency key, so the submit task is retried instead, and looks
    the batch up (and deletes orphaned uploads) before creating again; Prefect retries a task on a
    transient failure only."""

    def __init__(
        self,
        client: openai.OpenAI,
        *,
        client_factory: Callable[[], openai.OpenAI] | None = None,
    ) -> None:
        self.client = client
        self.client_factory = client_factory

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (for process-based task runners such as Dask) when built with a client factory:
        the client is rebuilt on the other side, never serialised."""
        if self.client_factory is None:
            raise TypeError("a BatchApi built from a bare client cannot be sent to another process")
        state = dict(self.__dict__)
        state["client"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        assert self.client_factory is not None
        self.client = self.client_factory()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """One call (the SDK retries it, when the client allows), its errors translated."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = _translate(exc, what, getattr(self.client, "api_key", None))
            if isinstance(exc, openai.APIStatusError):
                raise translated from None  # its message may echo the key; ours is redacted
            raise translated from exc

    def upload(self, handle: IO[bytes], filename: str) -> str:
        """One upload, not retried here: a retried upload whose first answer was lost leaves a
        second file; the submit task is retried instead, and deletes orphaned uploads first."""
        client = self.client.with_options(max_retries=0)

        def do() -> str:
            handle.seek(0)
            return client.files.create(
                file=(filename, handle), purpose="batch", expires_after=FILE_RETENTION
            ).id

        return self._call(f"upload {filename}", do)

    def create_batch(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> BatchInfo:
        """One create, no retries here: after a failure the caller must look the batch up by its
        metadata before trying again."""
        client = self.client.with_options(max_retries=0)
        batch = self._call(
            f"create batch for {file_id}",
            lambda: client.batches.create(
                input_file_id=file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window="24h",
                metadata=metadata,
                output_expires_after=FILE_RETENTION,
            ),
        )
        return BatchInfo.from_sdk(batch)

    def retrieve(self, batch_id: str) -> BatchInfo:
        return BatchInfo.from_sdk(
            self._call(f"retrieve {batch_id}", lambda: self.client.batches.retrieve(batch_id))
        )

    def cancel(self, batch_id: str) -> BatchInfo:
        return BatchInfo.from_sdk(
            self._call(f"cancel {batch_id}", lambda: self.client.batches.cancel(batch_id))
        )

    def iter_batches(self, since: float | None = None) -> Iterator[BatchInfo]:
        """The organisation's batches, newest first; with `since` (epoch seconds), the listing stops
        after a whole page created before it (so the cost of a look-up does not grow with history;
        a page of margin, as the API does not promise its order)."""
        page = self._call("list batches", lambda: self.client.batches.list(limit=100))
        while True:
            batches = [BatchInfo.from_sdk(batch) for batch in page.data]
            yield from batches
            if _all_before(batches, since) or not page.has_next_page():
                return
            page = self._call("list batches", page.get_next_page)

    def find_batches(
        self,
        metadata: dict[str, str],
        since: float | None = None,
        if_present: dict[str, str] | None = None,
    ) -> list[BatchInfo]:
        """Batches whose metadata contains every pair of `metadata` and, of `if_present`, every
        pair whose key it has (batches made before that key existed), created after `since` (the
        API cannot filter: the listing is scanned back to `since`)."""
        optional = if_present or {}
        return [
            b
            for b in self.iter_batches(since)
            if all(b.metadata.get(k) == v for k, v in metadata.items())
            and all(b.metadata.get(k, v) == v for k, v in optional.items())
        ]

    def iter_files(self, since: float | None = None) -> Iterator[Any]:
        """The organisation's batch files, newest first, back to `since` (as `iter_batches`)."""
        page = self._call(
            "list files", lambda: self.client.files.list(purpose="batch", order="desc", limit=1000)
        )
        while True:
            yield from page.data
            if _all_before(page.data, since) or not page.has_next_page():
                return
            page = self._call("list files", page.get_next_page)

    def delete_file(self, file_id: str) -> None:
        with contextlib.suppress(BatchApiError):  # already gone
            self._call(f"delete {file_id}", lambda: self.client.files.delete(file_id))

    def download(self, file_id: str, sink: IO[bytes]) -> int:
        """Stream a file's content into `sink`; returns the bytes written. Retried whole on failure."""

        def do() -> int:
            sink.seek(0)
            sink.truncate()
            written = 0
            with self.client.files.with_streaming_response.content(file_id) as response:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
                    written += len(chunk)
            return written

        try:
            return self._call(f"download {file_id}", do)
        except BatchApiError as exc:
            if exc.status == 404:
                raise ProviderFileGoneError(str(exc), 404) from None
            raise


def _all_before(items: list[Any], since: float | None) -> bool:
    """Whether a whole non-empty page was created before `since`."""
    return (
        since is not None and bool(items) and all((item.created_at or 0) < since for item in items)
    )
