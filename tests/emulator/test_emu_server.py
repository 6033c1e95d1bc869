"""EmulatorServer as a component: ports, base_url, start/stop, restart of the same object, no leaked
threads."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer


def _emulator_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("emulator-")]


def test_context_manager_serves_and_cleans_up(tmp_path: Path) -> None:
    assert _emulator_threads() == []
    with EmulatorServer(tmp_path / "s") as server:
        assert server.port > 0
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert sorted(_emulator_threads()) == [
            "emulator-engine",
            "emulator-http",
            "emulator-validate",
        ]
        with OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as client:
            assert client.batches.list().data == []
    assert _emulator_threads() == []
    with (
        OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as client,
        pytest.raises(openai.APIConnectionError),
    ):
        client.batches.list()


def test_explicit_port_and_restart_of_the_same_object(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = EmulatorServer(tmp_path / "s", port=port, config=EmulatorConfig(seed=4))
    server.start()
    try:
        assert server.port == port
        server.configure(clock_scale=900.0)
        with OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as client:
            file_id = client.files.create(file=("a.jsonl", b"{}"), purpose="batch").id
        with pytest.raises(RuntimeError):
            server.start()
    finally:
        server.stop()
    server.start()  # same state dir, same port, the config as it was at stop()
    try:
        assert server.config.clock_scale == 900.0 and server.config.seed == 4
        with OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as client:
            assert client.files.retrieve(file_id).filename == "a.jsonl"
    finally:
        server.stop()
    assert _emulator_threads() == []


def test_configure_before_start(tmp_path: Path) -> None:
    server = EmulatorServer(tmp_path / "s")
    assert server.configure(seed=11).seed == 11
    with server:
        assert server.stats()["batches"]["created"] == 0
        assert server.config.seed == 11
