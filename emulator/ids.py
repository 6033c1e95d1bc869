"""Ids (random for files and batches, as the real API) and deterministic hashing for everything else."""

from __future__ import annotations

import hashlib
import secrets
import string
import uuid

_BASE62 = string.digits + string.ascii_letters
_BASE62_BYTES = _BASE62.encode()


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


_BASE62_OF_BYTE = bytes(_BASE62_BYTES[b % 62] for b in range(248)).ljust(256, b"?")
_OVER_248 = bytes(range(248, 256))


class LineIds:
    """The deterministic ids of one batch line, all cut from one hash of (seed, batch seq, custom_id):
    hex ids and a base62 id, each from its own bytes."""

    __slots__ = ("_hash",)
    # bytes [0:16] line id, [16:32] request id, [32:80] base62 id, then 24 each for resp, msg, rs
    _HEX48 = {"resp": 80, "msg": 104, "rs": 128}
    _SIZE = 152

    def __init__(self, seed: int, seq: int, custom_id: str) -> None:
        key = f"{seed}\x1f{seq}\x1f{custom_id}".encode()
        self._hash = hashlib.shake_256(key).digest(self._SIZE)

    @property
    def line(self) -> str:
        """32 hex digits (the batch_req_ id)."""
        return self._hash[0:16].hex()

    @property
    def request(self) -> str:
        """32 hex digits (the request_id)."""
        return self._hash[16:32].hex()

    def base62(self, length: int) -> str:
        """Up to 29 base62 characters (uniform: hash bytes >= 248 are skipped)."""
        chars = self._hash[32:80].translate(_BASE62_OF_BYTE, _OVER_248)
        if len(chars) < length:  # about once in 10^10 lines
            return base62_id(self._hash.hex(), length=length)
        return chars[:length].decode()

    def hex48(self, kind: str) -> str:
        """48 hex digits for "resp", "msg" or "rs"."""
        start = self._HEX48[kind]
        return self._hash[start : start + 24].hex()


def seed_of_bytes(label: str, data: bytes) -> int:
    """`seed_int` for a label and a (large) byte string, hashed as they are."""
    return int.from_bytes(hashlib.sha256(label.encode() + b"\x1f" + data).digest()[:8], "big")


def unit(*parts: object) -> float:
    """A deterministic number in [0, 1)."""
    return seed_int(*parts) / 2**64
