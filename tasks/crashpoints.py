"""Named points where a test can make the process die with SIGKILL, to prove that every stage can be
rerun after a crash at any boundary. Inert unless NIGHTBATCH_CRASH_AT names the point (read when the
point is reached, never at import)."""

from __future__ import annotations

import os
import signal

POINTS = (
    "after-prepare",  # manifest written, nothing submitted
    "after-intent",  # submit intent recorded, nothing uploaded
    "after-upload",  # input file uploaded, batch not created
    "after-create",  # batch created, manifest not yet updated
    "after-submit",  # every batch recorded
    "after-poll",  # batch statuses recorded
    "after-collect",  # a shard's results written and recorded
    "after-retry",  # retry shards written and recorded
    "before-load-commit",  # output and dead letter written, cost record and manifest not yet
)


def crash_point(name: str) -> None:
    if os.environ.get("NIGHTBATCH_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
