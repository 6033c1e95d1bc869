"""Speed: with the default settings a 1,000-line batch goes through its whole lifecycle in about a second."""

from __future__ import annotations

import time

from openai import OpenAI

from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer


def test_thousand_chat_requests_default_config_well_under_five_seconds(kit, tmp_path) -> None:
    lines = [
        kit.chat_line(f"row-{i:04d}", f"Classify the sentiment of review {i}: loved it")
        for i in range(1000)
    ]
    with EmulatorServer(tmp_path / "state", config=EmulatorConfig()) as server:
        client = OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0)
        started = time.monotonic()
        batch = kit.submit(client, lines)
        seen = {batch.status}
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.05)
            batch = client.batches.retrieve(batch.id)
            seen.add(batch.status)
        output = kit.read(client, batch.output_file_id)
        elapsed = time.monotonic() - started
        client.close()

    print(f"1,000-line chat batch, default config: {elapsed:.2f}s")
    assert batch.status == "completed"
    assert {"validating", "in_progress", "completed"} <= seen
    assert batch.request_counts is not None and batch.request_counts.completed == 1000
    assert len(output) == 1000
    assert elapsed < 5.0
