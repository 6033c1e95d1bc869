"""The emulated clock: unix seconds that run `scale` times faster than the wall clock.

The anchor (an emulated instant, the wall-clock instant it corresponds to, the scale) is persisted in the
state directory, so emulated time carries on across restarts; time spent stopped counts at the old scale,
as it would for a real API that kept working while the client was away.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from emulator.store import write_json_atomic


class EmulatedClock:
    def __init__(self, path: Path, scale: float) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._last = 0.0
        real = time.time()
        if path.exists():
            data = json.loads(path.read_text())
            emulated = data["emulated"] + (real - data["real"]) * data["scale"]
        else:
            emulated = real
        self._emulated, self._real, self._scale = emulated, real, scale
        self._save()

    @property
    def scale(self) -> float:
        return self._scale

    def now(self) -> float:
        """Current emulated unix time (never goes backwards within a process)."""
        with self._lock:
            value = self._emulated + (time.time() - self._real) * self._scale
            self._last = max(self._last, value)
            return self._last

    def set_scale(self, scale: float) -> None:
        with self._lock:
            real = time.time()
            self._emulated += (real - self._real) * self._scale
            self._real, self._scale = real, scale
            self._save()

    def advance(self, seconds: float) -> None:
        """Jump emulated time forward (e.g. past a batch's expires_at)."""
        with self._lock:
            self._emulated += max(0.0, seconds)
            self._save()

    def _save(self) -> None:
        write_json_atomic(
            self._path, {"emulated": self._emulated, "real": self._real, "scale": self._scale}
        )
