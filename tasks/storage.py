"""Object storage by URI through fsspec: local paths and s3:// (s3fs honours AWS_ENDPOINT_URL and the
usual AWS variables). The only module besides the Parquet readers that touches storage."""

from __future__ import annotations

import errno
import fcntl
import hashlib
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

from tasks.errors import BadInputError, TransientError, WriteConflictError

try:  # s3fs raises botocore's own error when no credentials are found at all
    from botocore.exceptions import NoCredentialsError
except ImportError:  # pragma: no cover - botocore comes with s3fs

    class NoCredentialsError(Exception):  # type: ignore[no-redef]
        pass


def access_refused(uri: str, exc: Exception) -> BadInputError:
    """Object storage refused nightbatch's credentials for `uri`: a message that names where to
    look (the AWS variables), never the credentials."""
    why = "no credentials were found" if isinstance(exc, NoCredentialsError) else "access denied"
    return BadInputError(
        f"cannot access {uri!r}: {why}. Check the credentials nightbatch runs with: "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_ENDPOINT_URL for an "
        "S3-compatible store, and that they may read and write this bucket."
    )


VERSION_READ_ATTEMPTS = 5


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is a failed condition (412) or a concurrent conditional write (409)."""
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None) or getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
        return True
    return "pre-conditions you specified did not hold" in str(exc)


LINE_CHUNK_BYTES = 16 << 20


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

    def read_versioned(self, uri: str) -> tuple[bytes, str]:
        """An object's bytes with the version they are: the ETag on S3, a content hash on local
        disk. `write_if_version` replaces the object only if it is still at that version."""
        fs, path = self.fs(uri)
        if self.is_local(fs):
            data = _read_local(path)
            return data, _content_version(data)
        fs.invalidate_cache(path)
        for _ in range(VERSION_READ_ATTEMPTS):
            try:
                with fs.open(path, "rb") as handle:  # s3fs reads with If-Match on the ETag it saw
                    etag = str(handle.details.get("ETag", ""))
                    data = handle.read()
                return data, etag
            except FileNotFoundError:
                raise
            except OSError as exc:
                # s3fs reports an ETag that changed between its HEAD and GET as EBUSY
                if exc.errno != errno.EBUSY and not _precondition_failed(exc):
                    raise TransientError(f"could not read {uri}: {exc}") from exc
                fs.invalidate_cache(path)  # changed between the HEAD and the GET: read again
        raise WriteConflictError(f"{uri} kept changing while it was read")

    def write_if_version(self, uri: str, data: bytes, version: str | None) -> str:
        """Compare-and-swap: write `data` only if the object is still at `version` (None: only if
        it does not exist yet). Returns the new version; raises WriteConflictError otherwise."""
        fs, path = self.fs(uri)
        if self.is_local(fs):
            return _write_local_if_version(path, data, version)
        bucket, key, _ = fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except FileExistsError as exc:
            raise WriteConflictError(f"{uri} was created by another writer") from exc
        except OSError as exc:
            if _precondition_failed(exc):
                raise WriteConflictError(f"{uri} changed since it was read") from exc
            raise TransientError(f"could not write {uri}: {exc}") from exc
        fs.invalidate_cache(path)
        return str(response["ETag"])

    @contextmanager
    def open_atomic(self, uri: str) -> Iterator[IO[bytes]]:
        """Write to a temporary name, then move into place (local disk); on S3, an upload that is
        committed only when the block succeeds and aborted otherwise: whole or absent, never half."""
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
            handle = fs.open(path, "wb", autocommit=False)
            try:
                yield handle
                handle.close()
                handle.commit()
            except BaseException:
                handle.discard()
                raise

    @contextmanager
    def open_read(self, uri: str) -> Iterator[IO[bytes]]:
        fs, path = self.fs(uri)
        with fs.open(path, "rb") as handle:
            yield handle

    def iter_lines(self, uri: str, chunk_bytes: int = LINE_CHUNK_BYTES) -> Iterator[bytes]:
        """The lines of an object, each with its newline (the last maybe without), read in ranges of
        `chunk_bytes`: never a request, nor a Python-level readline, per line (on S3 a line by line
        read through fsspec's read-ahead cache took minutes for a few hundred MB)."""
        fs, path = self.fs(uri)
        with fs.open(path, "rb", block_size=chunk_bytes) as handle:
            tail = b""
            while chunk := handle.read(chunk_bytes):
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    yield line + b"\n"
            if tail:
                yield tail

    def size(self, uri: str) -> int:
        fs, path = self.fs(uri)
        return int(fs.size(path))

    def remove(self, uri: str, recursive: bool = False) -> None:
        fs, path = self.fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    def list_files(self, uri: str, suffix: str = "", prefix: str = "") -> list[str]:
        """The files under `uri` (not hidden ones), those whose name ends with `suffix` and, with
        `prefix`, those directly under `uri` whose name starts with it (on S3 the listing itself
        is narrowed to the prefix: its cost does not grow with the other files there)."""
        fs, path = self.fs(uri)
        local = self.is_local(fs)
        if not local:
            fs.invalidate_cache()
        if not fs.exists(path):
            return []
        protocol = "s3://" if uri.startswith("s3://") else ""
        found = fs.find(path, prefix=prefix) if prefix and not local else fs.find(path)
        return sorted(
            protocol + p
            for p in found
            if p.endswith(suffix)
            and not p.rsplit("/", 1)[-1].startswith(".")
            and (not prefix or p.rsplit("/", 1)[-1].startswith(prefix))
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


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_local(path: str) -> bytes:
    with open(path, "rb") as handle:  # replaced by os.replace: whole old or whole new
        return handle.read()


def _write_local_if_version(path: str, data: bytes, version: str | None) -> str:
    """The local-disk compare-and-swap: an exclusive lock on a sidecar lock file around the version
    check and the atomic replace (every writer of the object takes the same lock)."""
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{name}.lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = _read_local(path) if os.path.exists(path) else None
            if (None if current is None else _content_version(current)) != version:
                state = "exists" if version is None else "changed since it was read"
                raise WriteConflictError(f"{path} {state}")
            tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _content_version(data)
