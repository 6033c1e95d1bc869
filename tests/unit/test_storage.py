from __future__ import annotations

from pathlib import Path

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
