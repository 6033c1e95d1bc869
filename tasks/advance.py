"""What an open run needs next. Pure: the scheduled poller asks this of every run's manifest."""

from __future__ import annotations

import hashlib
from typing import Literal

from schemas.manifest import RunManifest

Step = Literal["submit", "wait", "collect", "finish", "retry", "load", "done"]


def next_step(manifest: RunManifest) -> Step:
    """submit: shards wait to be submitted; collect: batches are terminal and not yet parsed;
    wait: batches are still open; finish: everything is collected (retry-failures, then load)."""
    if manifest.status in ("loaded", "abandoned"):
        return "done"
    states = {s.state for s in manifest.shards}
    if states & {"prepared", "submitting"}:
        return "submit"
    if "terminal" in states:
        return "collect"
    if "submitted" in states:
        return "wait"
    return "finish"


def step_key(manifest: RunManifest, step: Step) -> str:
    """An idempotency key for launching `step` on this run: the same while the run has not moved,
    different once it has, so a repeated poll never starts a stage twice."""
    shards = ",".join(f"{s.shard_id}:{s.state}" for s in manifest.shards)
    digest = hashlib.sha256(shards.encode()).hexdigest()[:16]
    return f"{step}:{manifest.run_id}:{digest}"
