"""Ids (random for files and batches, as the real API) and deterministic hashing for everything else."""

from __future__ import annotations

import hashlib
import secrets
import string
import uuid

_BASE62 = string.digits + string.ascii_letters


def new_file_id() -> str:
    return "file-" + "".join(secrets.choice(_BASE62) for _ in range(22))


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


def digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def hex_id(*parts: object, length: int = 32) -> str:
    return digest(*parts).hex()[:length]


def base62_id(*parts: object, length: int = 24) -> str:
    number = int.from_bytes(digest(*parts), "big")
    chars = []
    for _ in range(length):
        number, rest = divmod(number, 62)
        chars.append(_BASE62[rest])
    return "".join(chars)


def seed_int(*parts: object) -> int:
    return int.from_bytes(digest(*parts)[:8], "big")


def seed_of_bytes(label: str, data: bytes) -> int:
    """`seed_int` for a label and a (large) byte string, hashed as they are."""
    return int.from_bytes(hashlib.sha256(label.encode() + b"\x1f" + data).digest()[:8], "big")


def unit(*parts: object) -> float:
    """A deterministic number in [0, 1)."""
    return seed_int(*parts) / 2**64
