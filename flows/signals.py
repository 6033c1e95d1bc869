"""Stopping a command cleanly on SIGTERM or Ctrl-C: the signal is raised in the main thread as
`Terminated`, so what the command started (the emulator, Prefect's temporary server, worker threads)
is stopped on the way out rather than orphaned."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(BaseException):
    """SIGTERM or SIGINT, raised in the main thread so that what the command started is stopped on
    the way out (the emulator, Prefect's temporary server, worker threads) rather than orphaned."""

    received: int | None = None  # the first signal this process was stopped by

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    def terminate(signum: int, frame: Any) -> None:
        if Terminated.received is not None:
            return  # stopping already: let the way out finish
        Terminated.received = signum
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
