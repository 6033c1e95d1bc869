"""The manifest's compare-and-swap and the submit leases: many writers on one run, on local disk and
on the moto S3 server; objects on S3 whole or absent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from schemas.manifest import Shard
from tasks import transitions as tr
from tasks.errors import LeaseLostError, WriteConflictError
from tasks.leases import new_owner, owner_is_gone
from tasks.runs import layout_for, load_manifest, new_manifest, save_manifest, update_manifest
from tasks.storage import ObjectStore
from tests.integration.helpers import chat_job


def _root(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return str(tmp_path) if kind == "local" else f"s3://{request.getfixturevalue('s3_env')}"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_stale_write_is_refused_and_a_new_object_is_created_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = ObjectStore()
    uri = f"{_root(kind, tmp_path, request)}/runs/m.json"
    first = store.write_if_version(uri, b"one", None)
    with pytest.raises(WriteConflictError):
        store.write_if_version(uri, b"two", None)  # it exists now
    data, version = store.read_versioned(uri)
    assert (data, version) == (b"one", first)
    second = store.write_if_version(uri, b"two", version)
    with pytest.raises(WriteConflictError):
        store.write_if_version(uri, b"three", first)  # read before "two" was written
    assert store.read_versioned(uri) == (b"two", second)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_updates_of_one_manifest_lose_nothing(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = _root(kind, tmp_path, request)
    job = chat_job(tmp_path / "t.parquet", tmp_path, storage_root=f"{root}/state")
    store = ObjectStore()
    save_manifest(store, new_manifest(job, "2026-11-26", "2026-11-26T00:00:00+00:00"))
    layout = layout_for(job, "2026-11-26")
    writers = 6 if kind == "s3" else 12

    def add_note(i: int) -> None:
        stale = load_manifest(store, layout)  # everyone starts from the same version
        barrier.wait()
        update_manifest(store, stale, lambda m: m.model_copy(update={"notes": [*m.notes, f"n{i}"]}))

    barrier = threading.Barrier(writers)
    threads = [threading.Thread(target=add_note, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    notes = load_manifest(store, layout).notes
    assert sorted(notes) == sorted(f"n{i}" for i in range(writers))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_write_that_fails_midway_leaves_the_old_object_whole(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = ObjectStore()
    root = _root(kind, tmp_path, request)
    uri = f"{root}/output/run_date=2026-11-26/part-0.parquet"
    yesterday = pa.table({"id": list(range(1000)), "text": ["x" * 50] * 1000})
    store.write_table(uri, yesterday)
    with pytest.raises(RuntimeError), store.open_atomic(uri) as handle:
        handle.write(b"PAR1" + os.urandom(6 * 2**20))  # past s3fs's first multipart block
        raise RuntimeError("the load failed while writing")
    assert store.read_table(uri).equals(yesterday)
    fresh = f"{root}/shards/shard-00000.jsonl"
    with pytest.raises(RuntimeError), store.open_atomic(fresh) as handle:
        handle.write(b'{"custom_id": "r-1"}\n')
        raise RuntimeError("interrupted")
    assert not store.exists(fresh)


def _shard(state: str = "prepared", **extra: object) -> Shard:
    fields: dict[str, object] = {
        "shard_id": "a1-s00000", "attempt": 1, "index": 0, "request_uri": "x.jsonl",
        "lines": 10, "bytes": 100, "input_tokens": 50, "sha256": "abc", "state": state,
    }  # fmt: skip
    return Shard.model_validate(fields | extra)


def test_the_submit_lease_has_one_holder_until_it_expires_or_its_process_is_gone() -> None:
    now = 1_000_000.0
    mine = tr.start_submit(_shard(), "t", owner="a:1:x", now_epoch=now, lease_seconds=900)
    assert (mine.state, mine.submit_owner, mine.lease_expires_at) == (
        "submitting",
        "a:1:x",
        now + 900,
    )
    with pytest.raises(LeaseLostError):  # a second submitter while the lease runs
        tr.start_submit(mine, "t", owner="b:2:y", now_epoch=now + 10, lease_seconds=900)
    taken = tr.start_submit(mine, "t", owner="b:2:y", now_epoch=now + 901, lease_seconds=900)
    assert taken.submit_owner == "b:2:y"
    gone = tr.start_submit(mine, "t", owner="c:3:z", now_epoch=now + 10, lease_seconds=900, holder_gone=True)  # fmt: skip
    assert gone.submit_owner == "c:3:z"
    with pytest.raises(LeaseLostError):  # the first holder learns it lost the lease before create
        tr.renew_lease(taken, "a:1:x", now + 902, 900)
    assert tr.renew_lease(taken, "b:2:y", now + 950, 900).lease_expires_at == now + 1850


def test_a_shard_transition_another_process_made_first_is_adopted_not_repeated() -> None:
    job = chat_job(Path("t.parquet"), Path("/tmp"))
    manifest = new_manifest(job, "2026-11-26", "t").model_copy(
        update={"shards": [_shard("collected")]}
    )
    same = tr.advance_shards(
        manifest, {"a1-s00000": lambda s: tr.start_submit(s, "t", owner="me")}, "t2"
    )
    assert same is manifest  # nothing to write


def test_lease_owners_on_this_host_are_gone_when_their_process_is() -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)  # fmt: skip
    dead_pid = int(done.stdout)
    host = socket.gethostname()
    assert owner_is_gone(f"{host}:{dead_pid}:abcd")
    assert not owner_is_gone(new_owner())  # this process
    assert not owner_is_gone(f"{host}:{os.getppid()}:abcd")  # alive
    assert not owner_is_gone(f"another-host-{host}:{dead_pid}:abcd")  # never guessed


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_the_index_of_open_runs_lists_open_and_lately_closed_runs_only(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The poller and submit read the open runs, not every manifest ever written."""
    from datetime import UTC, datetime, timedelta

    from tasks.runs import list_open_manifests

    root = _root(kind, tmp_path, request)
    store = ObjectStore()
    job = chat_job(Path("/src.parquet"), tmp_path).model_copy(update={"storage_root": root})
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)

    def run(day: str, status: str, closed_ago: timedelta) -> None:
        manifest = save_manifest(store, new_manifest(job, day, now.isoformat()))
        at = (now - closed_ago).isoformat()
        save_manifest(store, manifest.model_copy(update={"status": status, "updated_at": at}))

    run("2026-12-01", "loaded", timedelta(days=5))
    run("2026-12-06", "loaded", timedelta(minutes=10))  # its batches count in the past hour
    run("2026-12-07", "waiting", timedelta(0))
    run("2026-12-02", "abandoned", timedelta(hours=2))

    listed = {m.run_date for m in list_open_manifests(store, root, now, tidy=False)}
    assert listed == {"2026-12-06", "2026-12-07"}
    assert len(store.list_files(f"{root}/runs-open")) == 4  # tidy=False wrote and removed nothing
    listed = {m.run_date for m in list_open_manifests(store, root, now)}
    assert listed == {"2026-12-06", "2026-12-07"}
    assert sorted(u.rsplit("/", 1)[-1] for u in store.list_files(f"{root}/runs-open")) == [
        "triage__2026-12-06", "triage__2026-12-07",
    ]  # fmt: skip

    # a root from before the index: indexed once from its manifests
    for marker in store.list_files(f"{root}/runs-open"):
        store.remove(marker)
    store.remove(f"{root}/runs-open/.indexed")
    assert {m.run_date for m in list_open_manifests(store, root, now)} == listed
    assert store.exists(f"{root}/runs-open/.indexed")
