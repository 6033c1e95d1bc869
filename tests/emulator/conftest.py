"""Fixtures for the emulator tests: servers on temporary state dirs, SDK clients, and a small kit of
helpers to build input files, submit batches, wait for them and read their files. Tests reach the emulator
only over HTTP through the real `openai` SDK (admin calls use the in-process methods or plain HTTP)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from openai.types import Batch

from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer

TERMINAL = ("completed", "failed", "expired", "cancelled")

# Fast but not instant: 6 emulated seconds of validating/finalizing/cancelling are 10 ms real time.
FAST: dict[str, Any] = {
    "clock_scale": 600.0,
    "validating_seconds": 6.0,
    "lines_per_second": 200.0,
    "finalizing_seconds": 6.0,
    "cancelling_seconds": 6.0,
    "tick_seconds": 0.005,
}


class Kit:
    """Helpers shared by the emulator tests."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._servers: list[EmulatorServer] = []
        self._clients: list[OpenAI] = []

    # servers and clients

    def server(self, state_dir: Path | None = None, **settings: Any) -> EmulatorServer:
        """A started server (stopped at teardown) with FAST settings overridden by `settings`."""
        config = EmulatorConfig.model_validate({**FAST, **settings})
        if state_dir is None:  # a fresh directory per server unless one is asked for
            state_dir = self.tmp_path / f"state-{len(self._servers)}"
        server = EmulatorServer(state_dir, config=config)
        server.start()
        self._servers.append(server)
        return server

    def client(self, server: EmulatorServer, **options: Any) -> OpenAI:
        options = {"api_key": "test-key", "max_retries": 0, **options}
        client = OpenAI(base_url=server.base_url, **options)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for server in self._servers:
            server.stop()

    # input files

    @staticmethod
    def chat_line(custom_id: str, content: str = "Hello there", **body: Any) -> dict[str, Any]:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }

    @staticmethod
    def responses_line(custom_id: str, prompt: str = "Hello there", **body: Any) -> dict[str, Any]:
        body = {"model": "gpt-4.1-mini", "input": prompt, **body}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": body}

    @staticmethod
    def embedding_line(custom_id: str, text: Any = "Hello there", **body: Any) -> dict[str, Any]:
        body = {"model": "text-embedding-3-small", "input": text, **body}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}

    @staticmethod
    def jsonl(lines: list[Any]) -> bytes:
        return "".join(
            (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
        ).encode()

    def upload(self, client: OpenAI, lines: list[Any], filename: str = "input.jsonl") -> str:
        return client.files.create(file=(filename, self.jsonl(lines)), purpose="batch").id

    def submit(
        self,
        client: OpenAI,
        lines: list[Any],
        endpoint: str = "/v1/chat/completions",
        metadata: dict[str, str] | None = None,
    ) -> Batch:
        file_id = self.upload(client, lines)
        return client.batches.create(
            input_file_id=file_id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
            metadata=metadata,
        )

    @staticmethod
    def wait(
        client: OpenAI,
        batch_id: str,
        statuses: tuple[str, ...] = TERMINAL,
        timeout: float = 15.0,
        interval: float = 0.01,
    ) -> Batch:
        deadline = time.monotonic() + timeout
        while True:
            batch = client.batches.retrieve(batch_id)
            if batch.status in statuses:
                return batch
            if time.monotonic() > deadline:
                raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")
            time.sleep(interval)

    @staticmethod
    def wait_until(predicate: Any, timeout: float = 15.0, interval: float = 0.01) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(interval)

    @staticmethod
    def read(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]

    def run(
        self,
        client: OpenAI,
        lines: list[Any],
        endpoint: str = "/v1/chat/completions",
        timeout: float = 15.0,
    ) -> tuple[Batch, list[dict[str, Any]], list[dict[str, Any]]]:
        """Submit, wait for a terminal status, return (batch, output lines, error lines)."""
        batch = self.wait(client, self.submit(client, lines, endpoint).id, timeout=timeout)
        return (
            batch,
            self.read(client, batch.output_file_id),
            self.read(client, batch.error_file_id),
        )


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    helpers = Kit(tmp_path)
    try:
        yield helpers
    finally:
        helpers.close()


@pytest.fixture
def emu(kit: Kit) -> EmulatorServer:
    return kit.server()


@pytest.fixture
def client(kit: Kit, emu: EmulatorServer) -> OpenAI:
    return kit.client(emu)
