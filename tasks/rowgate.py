"""Rows that cannot succeed, found at prepare so they are never sent (and never paid for): an empty
embedding input, a request over the model's context window, a request that no shard or queue can
hold. Each goes to the dead letter with its reason; the rest of the run goes on. Pure: arrays in,
which rows to refuse and why out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMPTY_INPUT = "empty_input"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
TOO_LARGE = "too_large"


@dataclass(frozen=True)
class RowLimits:
    """What one request of a job may be."""

    refuse_empty: bool  # embeddings: OpenAI rejects an empty input
    max_line_bytes: int  # limits.max_bytes_per_shard
    max_queue_tokens: int | None = None  # limits.max_enqueued_tokens
    max_input_tokens: int | None = None  # the model's (price table), else its context window
    context_window: int | None = None  # the model's: input + requested output
    max_output_tokens: int | None = None  # what the request asks for (params)

    @property
    def input_ceiling(self) -> int | None:
        """The most input tokens a request may have."""
        ceilings = [c for c in (self.max_input_tokens, self.context_window) if c is not None]
        if self.context_window is not None and self.max_output_tokens is not None:
            ceilings.append(self.context_window - self.max_output_tokens)
        return min(ceilings) if ceilings else None


@dataclass(frozen=True)
class Refusal:
    row: int  # index in the batch
    code: str
    message: str


def refused_rows(
    limits: RowLimits, line_bytes: np.ndarray, tokens: np.ndarray, empty: np.ndarray
) -> list[Refusal]:
    """The rows of a rendered batch that must not be sent: `line_bytes` each request line's size,
    `tokens` its input tokens (exact for any row near a ceiling: see `near_ceiling`), `empty` whether
    its input text is empty."""
    ceiling = limits.input_ceiling
    over = tokens > ceiling if ceiling is not None else np.zeros(len(tokens), bool)
    queue = limits.max_queue_tokens
    unqueueable = tokens > queue if queue is not None else np.zeros(len(tokens), bool)
    too_big = line_bytes > limits.max_line_bytes
    blank = empty if limits.refuse_empty else np.zeros(len(tokens), bool)
    refusals = []
    for i in np.flatnonzero(blank | over | unqueueable | too_big):
        row = int(i)
        if blank[row]:
            refusals.append(
                Refusal(row, EMPTY_INPUT, "the input text is empty (an embedding needs text)")
            )
        elif over[row]:
            refusals.append(
                Refusal(row, CONTEXT_LENGTH_EXCEEDED, _over_message(limits, tokens[row]))
            )
        elif too_big[row]:
            refusals.append(
                Refusal(
                    row,
                    TOO_LARGE,
                    f"the request is {int(line_bytes[row]):,} bytes, more than a whole shard may "
                    f"hold (limits.max_bytes_per_shard {limits.max_line_bytes:,})",
                )
            )
        else:
            refusals.append(
                Refusal(
                    row,
                    TOO_LARGE,
                    f"the request has {int(tokens[row]):,} input tokens, more than the batch queue "
                    f"holds (limits.max_enqueued_tokens {queue:,})",
                )
            )
    return refusals


def near_ceiling(limits: RowLimits, estimated: np.ndarray, margin: float = 0.2) -> np.ndarray:
    """Rows whose estimated tokens come within `margin` of a ceiling: count them exactly before
    deciding (a sampled estimate may be off either way for one row)."""
    ceilings = [c for c in (limits.input_ceiling, limits.max_queue_tokens) if c is not None]
    if not ceilings:
        return np.zeros(len(estimated), bool)
    return estimated >= (1 - margin) * min(ceilings)


def _over_message(limits: RowLimits, tokens: int) -> str:
    fix = "; shorten the row's text or filter it out"
    accepted = min(c for c in (limits.max_input_tokens, limits.context_window) if c is not None)
    if tokens > accepted:
        return f"the request has {int(tokens):,} input tokens, more than the model accepts ({accepted:,}){fix}"
    return (
        f"the request has {int(tokens):,} input tokens plus {limits.max_output_tokens:,} requested "
        f"output tokens, more than the model's context window ({limits.context_window:,}){fix}"
    )
