"""The rows prepare refuses to send (the rule is tasks.rowgate): split off each rendered batch
before it is packed, counted exactly when a sampled estimate is near a ceiling, and written to the
run's refused file in the errors schema (attempt 0), from where load puts them in the dead letter."""

from __future__ import annotations

import difflib

import numpy as np
import pyarrow as pa

from schemas.job import JobSpec
from schemas.pricing import UnknownModelPriceError
from schemas.tables import ERRORS_SCHEMA
from tasks.costrecord import max_output_tokens, price_table_for
from tasks.errors import BadInputError
from tasks.render import RenderedBatch, RequestRenderer
from tasks.rowgate import RowLimits, near_ceiling, refused_rows
from tasks.storage import ObjectStore
from tasks.tokens import count_request_tokens


def row_limits(job: JobSpec) -> RowLimits:
    """What one request of `job` may be (the model's window from the price table)."""
    try:
        price = price_table_for(job).price_for(job.request.model)
    except UnknownModelPriceError as exc:
        known = list(price_table_for(job).models)
        close = difflib.get_close_matches(job.request.model, known, n=1, cutoff=0.8)
        hint = f"Did you mean {close[0]!r}? Else: " if close else ""
        raise BadInputError(f"{hint}{exc}") from None
    limits = job.limits
    return RowLimits(
        refuse_empty=job.request.endpoint == "/v1/embeddings",
        max_line_bytes=limits.max_bytes_per_shard,
        max_queue_tokens=limits.max_enqueued_tokens,
        max_input_tokens=price.max_input_tokens,
        context_window=price.context_window,
        max_output_tokens=max_output_tokens(job),
    )


class RowGate:
    """Refuses, batch by batch, the rows that cannot succeed; keeps their error rows."""

    def __init__(self, job: JobSpec, renderer: RequestRenderer, sampled: bool) -> None:
        self.limits = row_limits(job)
        self.renderer = renderer
        self.sampled = sampled
        self.model = job.request.model
        self.tables: list[pa.Table] = []
        self.refused = 0

    def split(
        self, rendered: RenderedBatch, tokens: np.ndarray
    ) -> tuple[RenderedBatch, np.ndarray]:
        """The rows to send, and their tokens."""
        if self.sampled:
            tokens = self._exact_near_ceiling(rendered, tokens)
        refusals = refused_rows(self.limits, rendered.lengths, tokens, _empty_inputs(rendered))
        if not refusals:
            return rendered, tokens
        at = [r.row for r in refusals]
        n = len(at)
        self.tables.append(
            pa.table(
                {
                    "custom_id": rendered.custom_ids.take(pa.array(at)),
                    "attempt": pa.array([0] * n, pa.int32()),
                    "kind": pa.array(["refused"] * n),
                    "code": pa.array([r.code for r in refusals]),
                    "message": pa.array([r.message for r in refusals]),
                    "retryable": pa.array([False] * n),
                    "billed": pa.array([False] * n),
                    "model": pa.array([self.model] * n),
                }
            )
        )
        self.refused += n
        keep = np.ones(len(rendered), bool)
        keep[at] = False
        return rendered.select(keep), tokens[keep]

    def _exact_near_ceiling(self, rendered: RenderedBatch, tokens: np.ndarray) -> np.ndarray:
        near = np.flatnonzero(near_ceiling(self.limits, tokens))
        if not len(near):
            return tokens
        tokens = tokens.copy()
        endpoint = self.renderer.endpoint
        for i in near:
            if rendered.bodies is not None:
                body = rendered.bodies[i]
            else:
                assert rendered.texts is not None
                body = self.renderer.body_for_text(rendered.texts[int(i)].as_py())
            tokens[i] = count_request_tokens(endpoint, body)
        return tokens

    def write(self, store: ObjectStore, uri: str) -> str | None:
        """The refused rows' error rows at `uri` (None when no row was refused)."""
        if not self.refused:
            return None
        table = pa.concat_tables(self.tables)
        columns = {
            f.name: table.column(f.name) if f.name in table.column_names else pa.nulls(len(table))
            for f in ERRORS_SCHEMA
        }
        store.write_table(uri, pa.table(columns).cast(ERRORS_SCHEMA))
        return uri


def _empty_inputs(rendered: RenderedBatch) -> np.ndarray:
    if rendered.text_lengths is not None:
        return rendered.text_lengths == 0
    assert rendered.bodies is not None
    return np.array([body.get("input") in ("", None) for body in rendered.bodies], bool)
