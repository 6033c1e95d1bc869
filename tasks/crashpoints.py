"""Named points where a test can make the process die with SIGKILL, to prove that every stage can be
rerun after a crash at any boundary. Inert unless NIGHTBATCH_CRASH_AT names the point (read when the
point is reached, never at import). With NIGHTBATCH_CRASH_ONCE naming a file, only the first process
to reach the point dies (it creates the file first): for a worker whose every flow run shares one
environment."""

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
    "before-collect-record",  # a shard's results written, the manifest not yet updated
    "after-collect",  # a shard's results written and recorded
    "after-retry",  # retry shards written and recorded
    "before-load-commit",  # output and dead letter written, cost record and manifest not yet
)


def crash_point(name: str) -> None:
    if os.environ.get("NIGHTBATCH_CRASH_AT") != name:
        return
    once = os.environ.get("NIGHTBATCH_CRASH_ONCE")
    if once:
        try:
            with open(once, "x"):
                pass
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
