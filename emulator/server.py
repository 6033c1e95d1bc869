"""EmulatorServer: the engine plus uvicorn, in background threads (in-process) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TextIO

import uvicorn

from emulator.app import create_app
from emulator.config import EmulatorConfig, apply_changes
from emulator.engine import Engine


class _UvicornServer(uvicorn.Server):
    """uvicorn, noticing `should_exit` within 10 ms instead of 100 ms (quicker stop() in tests), and
    exiting normally on SIGINT/SIGTERM (uvicorn re-raises the signal after a graceful shutdown)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            for _ in range(10):
                await asyncio.sleep(0.01)
                if self.should_exit:
                    return
            counter = (counter + 1) % 864000


class EmulatorServer:
    """An OpenAI-compatible Files + Batches server on 127.0.0.1, e.g.

        with EmulatorServer(state_dir, config=EmulatorConfig(clock_scale=600)) as emu:
            client = OpenAI(base_url=emu.base_url, api_key="test-key")

    `port=0` picks a free port. HTTP (uvicorn) and the batch engine each run in a background thread;
    `stop()` ends both. `serve_forever()` runs HTTP in the calling thread instead (the CLI).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int = 0,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self._requested_port = port
        self._initial_config = config or EmulatorConfig()
        self.engine: Engine | None = None
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = port

    # lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def url(self) -> str:
        """The server root, where /_emulator/* lives."""
        return f"http://{self.host}:{self.port}"

    def _prepare(self) -> uvicorn.Server:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.engine = Engine(self.state_dir, self._initial_config)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.listen(2048)  # connections queue from now on, before uvicorn starts accepting
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.engine),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = _UvicornServer(config)
        return self._server

    def start(self) -> EmulatorServer:
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        server = self._prepare()
        assert self.engine is not None and self._socket is not None
        self.engine.start()
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="emulator-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("emulator HTTP server failed to start")
            time.sleep(0.005)
        return self

    def serve_forever(self, announce: TextIO | None = None) -> None:
        """Run in the foreground until SIGINT/SIGTERM (uvicorn handles the signals)."""
        server = self._prepare()
        assert self.engine is not None and self._socket is not None
        self.engine.start()
        if announce is not None:
            print(f"emulator listening on {self.base_url} (state: {self.state_dir})", file=announce)
            announce.flush()
        try:
            server.run(sockets=[self._socket])
        finally:
            self._shutdown()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._shutdown()

    def _shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self._initial_config = self.engine.config  # a later start() carries on with it
            self.engine = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._server = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # control

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("emulator not started")
        return self.engine

    @property
    def config(self) -> EmulatorConfig:
        return self.engine.config if self.engine is not None else self._initial_config

    def configure(self, config: EmulatorConfig | None = None, **changes: Any) -> EmulatorConfig:
        """Change settings at run time: a whole EmulatorConfig, and/or fields (nested ones merge)."""
        if self.engine is None:
            base = config or self._initial_config
            self._initial_config = apply_changes(base, changes) if changes else base
            return self._initial_config
        return self.engine.configure(config, **changes)

    def stats(self) -> dict[str, Any]:
        return self._engine().stats()

    def advance_clock(self, seconds: float) -> float:
        """Jump emulated time forward; returns the new emulated unix time."""
        return self._engine().advance_clock(seconds)

    def now(self) -> float:
        """Current emulated unix time."""
        return self._engine().clock.now()
