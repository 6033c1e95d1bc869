"""Per-model enqueued-token limit: a batch whose input tokens would push the model's queue over the limit
fails validation with `token_limit_exceeded`; finished batches no longer count."""

from __future__ import annotations

from tasks.tokens import count_request_tokens


def _tokens(lines: list[dict]) -> int:
    return sum(count_request_tokens(line["url"], line["body"]) for line in lines)


def test_queue_limit_counts_open_batches_of_the_same_model(kit) -> None:
    first = [kit.chat_line(f"a{i}", f"first batch line {i}") for i in range(10)]
    second = [kit.chat_line(f"b{i}", f"second batch line {i}") for i in range(10)]
    limit = _tokens(first) + _tokens(second) - 1
    # lines are slow so that the first batch is still in progress when the second is validated
    server = kit.server(lines_per_second=0.002, token_limits={"gpt-4o-mini": limit})
    client = kit.client(server)

    running = kit.submit(client, first)
    kit.wait(client, running.id, statuses=("in_progress",))
    rejected = kit.wait(client, kit.submit(client, second).id)

    assert rejected.status == "failed"
    assert rejected.errors is not None
    [error] = rejected.errors.data
    assert error.code == "token_limit_exceeded"
    assert error.line is None and error.param is None
    assert error.message == (
        f"Enqueued token limit reached for gpt-4o-mini in organization org-emulator. "
        f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress batches have "
        "been completed."
    )
    assert rejected.request_counts is not None and rejected.request_counts.total == 0

    # another model has its own queue
    other = [kit.chat_line(f"c{i}", model="gpt-4o") for i in range(3)]
    assert kit.wait(client, kit.submit(client, other).id, ("in_progress", "completed")).status in (
        "in_progress",
        "completed",
    )

    # once the first batch is terminal its tokens leave the queue
    client.batches.cancel(running.id)
    assert kit.wait(client, running.id).status == "cancelled"
    retried = kit.wait(client, kit.submit(client, second).id, ("in_progress", "failed"))
    assert retried.status == "in_progress"


def test_limit_is_inclusive_and_applies_to_a_single_batch(kit) -> None:
    lines = [kit.chat_line(f"r{i}", f"line {i}") for i in range(4)]
    exact = _tokens(lines)
    client = kit.client(kit.server(token_limits={"gpt-4o-mini": exact}))
    assert kit.run(client, lines)[0].status == "completed"

    client_low = kit.client(
        kit.server(kit.tmp_path / "low", token_limits={"gpt-4o-mini": exact - 1})
    )
    batch = kit.run(client_low, lines)[0]
    assert batch.status == "failed"
    assert batch.errors.data[0].code == "token_limit_exceeded"
    assert f"Limit: {exact - 1:,} enqueued tokens." in batch.errors.data[0].message


def test_default_limit_and_runtime_change(kit) -> None:
    server = kit.server(default_token_limit=1)
    client = kit.client(server)
    assert kit.run(client, [kit.chat_line("a")])[0].status == "failed"
    server.configure(default_token_limit=None, token_limits={"gpt-4o-mini": 10_000_000})
    assert kit.run(client, [kit.chat_line("a")])[0].status == "completed"
    server.configure(token_limits={"gpt-4o-mini": 2})
    batch = kit.run(client, [kit.chat_line("a")])[0]
    assert batch.status == "failed"
    assert "Limit: 2 enqueued tokens." in batch.errors.data[0].message
