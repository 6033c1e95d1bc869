from __future__ import annotations

from pathlib import Path

import pytest

from tasks.storage import ObjectStore


def test_listing_skips_temporary_files_but_not_hidden_folders(tmp_path: Path) -> None:
    root = tmp_path / ".nightbatch" / "state"
    store = ObjectStore()
    store.write_bytes(str(root / "costs" / "a.parquet"), b"x")
    (root / "costs" / ".a.parquet.1234.tmp").write_bytes(b"half")
    assert store.list_files(str(root / "costs"), suffix=".parquet") == [
        str(root / "costs" / "a.parquet")
    ]
    assert store.list_files(str(root / "missing")) == []


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = ObjectStore()
    target = tmp_path / "m.json"
    store.write_bytes(str(target), b"1")
    store.write_bytes(str(target), b"2")
    assert target.read_bytes() == b"2" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.parametrize("storage", ["local", "s3"])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"one\n",
        b"one\ntwo",
        b'{"custom_id": "r-1"}\n\n{"custom_id": "r-2"}\n' * 50,
        b"x" * 70 + b"\n" + b"y" * 3 + b"\n",  # a line longer than a chunk, then a short one
    ],
)
def test_iter_lines_reads_in_ranges_and_gives_every_line_whole(
    tmp_path: Path, storage: str, data: bytes, request: pytest.FixtureRequest
) -> None:
    root = f"s3://{request.getfixturevalue('s3_env')}" if storage == "s3" else str(tmp_path)
    store = ObjectStore()
    uri = f"{root}/requests/shard.jsonl"
    store.write_bytes(uri, data)
    lines = list(store.iter_lines(uri, chunk_bytes=16))
    assert b"".join(lines) == data
    assert lines == data.splitlines(keepends=True)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_list_files_with_a_prefix_lists_only_the_names_that_start_with_it(
    tmp_path: Path, storage: str, request: pytest.FixtureRequest
) -> None:
    root = f"s3://{request.getfixturevalue('s3_env')}" if storage == "s3" else str(tmp_path)
    store = ObjectStore()
    for name in (
        "a__1.parquet",
        "a__2.parquet",
        "a__b__1.parquet",
        "ab__1.parquet",
        "b__1.parquet",
    ):
        store.write_bytes(f"{root}/costs/{name}", b"x")
    found = store.list_files(f"{root}/costs", ".parquet", prefix="a__")
    assert [uri.rsplit("/", 1)[-1] for uri in found] == [
        "a__1.parquet", "a__2.parquet", "a__b__1.parquet",
    ]  # fmt: skip
