"""The bundled Batch API emulator for a command: started in-process, the OpenAI settings pointed at
it while the command runs (`--emulator`, and the demo)."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def emulator_env(state_dir: Path, clock_scale: float | None = None) -> Iterator[str]:
    """Start the bundled Batch API emulator in-process and point the OpenAI settings at it."""
    from emulator.config import EmulatorConfig
    from emulator.server import EmulatorServer

    config = EmulatorConfig() if clock_scale is None else EmulatorConfig(clock_scale=clock_scale)
    names = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "NIGHTBATCH_API_IDENTITY")
    saved = {k: os.environ.get(k) for k in names}
    with EmulatorServer(state_dir, config=config) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        os.environ["OPENAI_API_KEY"] = "emulator-key"
        os.environ["NIGHTBATCH_API_IDENTITY"] = "emulator"  # its results stay in its own namespace
        try:
            yield server.base_url
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def maybe_emulator(args: argparse.Namespace, root: str) -> Iterator[None]:
    """The bundled emulator, when asked for; its state is kept per storage root (so a rerun
    resumes against the same batches, and dry runs of other roots never meet)."""
    if not getattr(args, "emulator", False):
        yield
        return
    from tasks.layout import root_digest

    default = Path(tempfile.gettempdir()) / f"nightbatch-emulator-{root_digest(root)}"
    state = Path(args.emulator_state or default)
    with emulator_env(state) as url:
        print(f"using the bundled Batch API emulator at {url} (state in {state})")
        yield
