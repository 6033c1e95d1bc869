"""Object storage by URI through fsspec: local paths and s3:// (s3fs honours AWS_ENDPOINT_URL and the
usual AWS variables). The only module besides the Parquet readers that touches storage."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tasks.errors import TransientError


class ObjectStore:
    """Reads and writes whole objects and Parquet files by URI. Writes are atomic: a reader sees the
    old object or the new one, never a half-written one."""

    def __init__(self, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = storage_options or {}

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = fsspec.core.url_to_fs(uri, **self._options_for(uri))
        return fs, path

    def _options_for(self, uri: str) -> dict[str, Any]:
        return self.storage_options if uri.startswith("s3://") else {}

    @staticmethod
    def is_local(fs: fsspec.AbstractFileSystem) -> bool:
        return isinstance(fs, LocalFileSystem)

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        if not self.is_local(fs):
            fs.invalidate_cache()
        return bool(fs.exists(path))

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        try:
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            raise
        except OSError as exc:  # network or permission trouble on remote stores
            raise TransientError(f"could not read {uri}: {exc}") from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_atomic(uri) as handle:
            handle.write(data)

    @contextmanager
    def open_atomic(self, uri: str) -> Iterator[IO[bytes]]:
        """Write to a temporary name, then move into place. On S3 one PUT is already atomic."""
        fs, path = self.fs(uri)
        if self.is_local(fs):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as handle:
                    yield handle
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with fs.open(path, "wb") as handle:
                yield handle

    @contextmanager
    def open_read(self, uri: str) -> Iterator[IO[bytes]]:
        fs, path = self.fs(uri)
        with fs.open(path, "rb") as handle:
            yield handle

    def size(self, uri: str) -> int:
        fs, path = self.fs(uri)
        return int(fs.size(path))

    def remove(self, uri: str, recursive: bool = False) -> None:
        fs, path = self.fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    def list_files(self, uri: str, suffix: str = "") -> list[str]:
        fs, path = self.fs(uri)
        if not self.is_local(fs):
            fs.invalidate_cache()
        if not fs.exists(path):
            return []
        protocol = "s3://" if uri.startswith("s3://") else ""
        return sorted(
            protocol + p
            for p in fs.find(path)
            if p.endswith(suffix) and not p.rsplit("/", 1)[-1].startswith(".")
        )

    def write_table(self, uri: str, table: pa.Table) -> None:
        with self.open_atomic(uri) as handle:
            pq.write_table(table, handle, compression="zstd")

    def row_count(self, uri: str) -> int:
        """Rows of a Parquet file, from its footer."""
        fs, path = self.fs(uri)
        with fs.open(path, "rb") as handle:
            return int(pq.ParquetFile(handle).metadata.num_rows)

    def read_table(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        fs, path = self.fs(uri)
        return pq.read_table(path, filesystem=fs, columns=columns)

    def dataset(self, uri: str) -> ds.Dataset:
        fs, path = self.fs(uri)
        if not self.is_local(fs):
            fs.invalidate_cache()
        if not fs.exists(path):
            raise FileNotFoundError(uri)
        return ds.dataset(path, filesystem=fs, format="parquet")
