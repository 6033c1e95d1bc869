"""Synthetic tables and Batch API output for the benchmarks and the token-estimate tests.

Deterministic (seeded) and fast: rows are word-aligned slices of a generated corpus, so a million rows
with realistic text lengths take seconds to make. Several text *shapes* exercise the token estimator:
English product prose, SKU/number-heavy catalogue text, accented European text, CJK, emoji-rich
social text, and very short strings."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

_ENGLISH = """the a and of with for to in is on this that it your you our from by as at be are or
an can will all more its has have one new not use their which up out into also other than only
design designed perfect ideal easy quick quickly simple everyday daily home office travel outdoor
kitchen garden sport gaming work study professional premium compact portable wireless lightweight
durable rugged ergonomic adjustable rechargeable waterproof stainless steel aluminium cotton leather
bamboo glass ceramic silicone battery charging cable adapter screen display keyboard mouse headset
speaker camera lens tripod lamp light bulb chair desk table shelf drawer bottle cup mug pan pot knife
board bag backpack jacket shoe sock shirt watch band strap case cover stand mount holder hook clip
feature features includes including comes fits works supports offers provides delivers keeps makes
helps lets protects reduces improves lasts holds stays built made crafted tested certified rated
long-lasting high-quality soft smooth strong stable quiet silent bright warm cool fresh clean safe
smart fast powerful efficient reliable comfortable stylish modern classic elegant natural eco-friendly
noise cancellation pairing bluetooth USB-C HDMI Wi-Fi app control mode modes setting settings timer
temperature speed power capacity size sizes colour colours black white grey blue green red silver
warranty guarantee package box manual instructions care wash dishwasher-safe machine-washable
customers reviews love recommend gift family kids adults pets people hours minutes days weeks months
years times every each any most best better great good excellent amazing""".split()  # noqa: SIM905

_EUROPEAN = """der die das und mit für ein eine ist nicht auch sehr gut Qualität Größe Farbe schön
le la les et avec pour un une est pas très bien qualité taille couleur élégant pratique léger
el los las con para muy bueno calidad tamaño también diseño cómodo fácil función garantía
über während Gerät Zubehör Lieferumfang Oberfläche Geräuschpegel Akku Ladegerät Stück
été à où ça déjà façon matériau écran réglable étanche économique""".split()  # noqa: SIM905

_CJK = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跑"

_EMOJI = "😀😂🥰😍🤩🙌👍🔥✨💯🎉❤️💙🌟🚀📦🛒💡⭐️🤔😅🙏👏💪🎁🏆📱💻🎧"

_NUMBERY = """SKU ref model ver rev pack qty lot no. mm cm kg g ml l W V mAh GB TB Hz dB x
#""".split()  # noqa: SIM905


def _zipf_weights(n: int, s: float = 1.05) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def _english_words(rng: np.random.Generator, n: int) -> list[str]:
    vocab = np.array(_ENGLISH, dtype=object)
    idx = rng.choice(len(vocab), size=n, p=_zipf_weights(len(vocab)))
    words: list[str] = vocab[idx].tolist()
    # sprinkle numbers, measurements with inch marks (JSON escapes), accents and dashes
    extras = rng.random(n)
    for i in np.flatnonzero(extras < 0.04):
        words[i] = str(int(rng.integers(2, 5000)))
    for i in np.flatnonzero((extras >= 0.04) & (extras < 0.05)):
        words[i] = f'{int(rng.integers(10, 80))}"'
    for i in np.flatnonzero((extras >= 0.05) & (extras < 0.055)):
        words[i] = rng.choice(["café", "naïve", "–", "×", "™", "°C", "½", "résumé"])
    return words


def _sentences(words: list[str], rng: np.random.Generator) -> str:
    """Words into capitalised sentences with commas, full stops and the odd paragraph break."""
    out: list[str] = []
    start = True
    marks = rng.random(len(words))
    for word, mark in zip(words, marks, strict=True):
        out.append(word.capitalize() if start else word)
        start = False
        if mark < 0.07:
            out[-1] += "."
            start = True
            if mark < 0.008:
                out[-1] += "\n"
        elif mark < 0.12:
            out[-1] += ","
    return " ".join(out).replace("\n ", "\n")


@cache
def corpus(shape: str, seed: int, words: int = 400_000) -> str:
    """A long text of one shape; rows are slices of it (cached: a corpus is reused by many chunks)."""
    rng = np.random.default_rng(seed)
    if shape == "english":
        return _sentences(_english_words(rng, words), rng)
    if shape == "catalogue":  # SKU- and number-heavy listing text
        parts: list[str] = []
        eng = _english_words(rng, words)
        for i, word in enumerate(eng):
            r = rng.random()
            if r < 0.25:
                parts.append(f"{rng.choice(_NUMBERY)}-{int(rng.integers(0, 10**6)):06d}")
            elif r < 0.4:
                parts.append(f"{rng.uniform(0, 999):.1f}{rng.choice(['mm', 'kg', 'W', 'V', '%'])}")
            else:
                parts.append(word)
            if i % 9 == 8:
                parts[-1] += ";"
        return " ".join(parts)
    if shape == "european":
        vocab = np.array(_EUROPEAN + _ENGLISH[:60], dtype=object)
        idx = rng.choice(len(vocab), size=words, p=_zipf_weights(len(vocab), 0.8))
        return _sentences(vocab[idx].tolist(), rng)
    if shape == "cjk":
        chars = np.array(list(_CJK), dtype=object)
        idx = rng.choice(len(chars), size=words * 2, p=_zipf_weights(len(chars), 0.9))
        text = chars[idx].tolist()
        for i in range(0, len(text), int(rng.integers(12, 30))):
            text[i] += rng.choice(["，", "。", "！", "、", " 5G ", " USB "])
        return "".join(text)
    if shape == "social":  # emoji-rich, mixed case, hashtags
        eng = _english_words(rng, words)
        emoji = list(_EMOJI)
        out = []
        for word in eng:
            r = rng.random()
            out.append(word.upper() if r < 0.05 else f"#{word}" if r < 0.09 else word)
            if r > 0.9:
                out.append(str(rng.choice(emoji)) * int(rng.integers(1, 4)))
        return " ".join(out)
    raise ValueError(f"unknown shape {shape!r}")


BIG_CORPUS = 3_000_000  # words: ~18 MB of text, so rows rarely overlap within a Parquet page
SHAPES = ("english", "catalogue", "european", "cjk", "social")


def texts(
    shape: str,
    rows: int,
    seed: int,
    mean_chars: float,
    sigma: float = 0.5,
    min_chars: int = 1,
    max_chars: int = 12_000,
    corpus_seed: int | None = None,
    corpus_words: int = 400_000,
) -> list[str]:
    """`rows` slices of a `shape` corpus with log-normal lengths around `mean_chars`."""
    rng = np.random.default_rng(seed + 1)
    text = corpus(shape, corpus_seed if corpus_seed is not None else seed, corpus_words)
    mu = math.log(mean_chars) - sigma**2 / 2
    lengths = np.clip(rng.lognormal(mu, sigma, rows), min_chars, max_chars).astype(np.int64)
    lengths = np.minimum(lengths, len(text) - 1)
    starts = (rng.random(rows) * (len(text) - lengths)).astype(np.int64)
    out = []
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        begin = text.find(" ", start) + 1 if start else 0  # start on a word boundary
        out.append(text[begin : begin + length].strip())
    return out


def product_chunk(
    start: int, rows: int, seed: int, mean_chars: float = 1800.0, corpus_words: int = BIG_CORPUS
) -> pa.Table:
    """Rows `start`.. of the products table: sku, title, category, description (≈ mean_chars), price."""
    rng = np.random.default_rng(seed * 1_000_003 + start)
    descriptions = texts(
        "english",
        rows,
        seed * 7919 + start,
        mean_chars,
        corpus_seed=seed,
        corpus_words=corpus_words,
    )
    titles = texts(
        "english", rows, seed * 104729 + start, 40.0, sigma=0.3, max_chars=120,
        corpus_seed=seed, corpus_words=corpus_words,
    )  # fmt: skip
    categories = np.array(
        ["electronics", "home", "kitchen", "garden", "sport", "toys", "fashion", "office"]
    )[rng.integers(0, 8, rows)]
    skus = pa.array([f"SKU-{i:09d}" for i in range(start, start + rows)], pa.string())
    return pa.table(
        {
            "sku": skus,
            "title": pa.array(titles, pa.string()),
            "category": pa.array(categories.tolist(), pa.string()),
            "description": pa.array(descriptions, pa.string()),
            "price": pa.array(np.round(rng.uniform(1, 999, rows), 2)),
            "in_stock": pa.array(rng.random(rows) < 0.9),
        }
    )


def iter_product_chunks(
    rows: int, seed: int = 1, chunk_rows: int = 100_000, mean_chars: float = 1800.0
) -> Iterator[pa.Table]:
    words = min(BIG_CORPUS, max(20_000, rows * 3))  # small tables: a small corpus, made quickly
    for start in range(0, rows, chunk_rows):
        yield product_chunk(start, min(chunk_rows, rows - start), seed, mean_chars, words)


def write_products(
    path: Path, rows: int, seed: int = 1, mean_chars: float = 1800.0, row_group_rows: int = 65_536
) -> Path:
    """A products Parquet file of `rows` rows (row groups of `row_group_rows`, zstd, as a Spark or
    pandas writer would make it), written chunk by chunk in bounded memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    writer: pq.ParquetWriter | None = None
    for chunk in iter_product_chunks(rows, seed, mean_chars=mean_chars):
        if writer is None:
            writer = pq.ParquetWriter(tmp, chunk.schema, compression="zstd")
        writer.write_table(chunk, row_group_size=row_group_rows)
    assert writer is not None
    writer.close()
    tmp.replace(path)
    return path


# ---- Batch API output and error lines ------------------------------------------------------------

_WORDS = _ENGLISH[:200]


def chat_output_lines(
    custom_ids: list[str],
    seed: int = 1,
    model: str = "gpt-4o-mini-2024-07-18",
    errors: float = 0.01,
) -> Iterator[bytes]:
    """Batch API output lines (newline-terminated) answering chat requests with a small structured
    output ({"summary", "audience", "score"}), as OpenAI writes them; a fraction `errors` are HTTP
    errors (429 and 500) instead."""
    rng = np.random.default_rng(seed)
    words = np.array(_WORDS, dtype=object)
    for i, custom_id in enumerate(custom_ids):
        request_id = f"req_{seed:04x}{i:028x}"
        if rng.random() < errors:
            status, code = (429, "rate_limit_exceeded") if rng.random() < 0.5 else (500, None)
            body: dict[str, object] = {
                "error": {
                    "message": "Rate limit reached" if code else "The server had an error",
                    "type": "requests" if code else "server_error",
                    "param": None,
                    "code": code,
                }
            }
        else:
            status = 200
            summary = " ".join(words[rng.integers(0, len(words), int(rng.integers(8, 30)))])
            content = orjson.dumps(
                {"summary": summary, "audience": str(words[int(rng.integers(0, 50))]),
                 "score": int(rng.integers(1, 10))}
            ).decode()  # fmt: skip
            prompt, completion = int(rng.integers(300, 700)), int(rng.integers(20, 60))
            body = {
                "id": f"chatcmpl-{seed:04x}{i:025x}",
                "object": "chat.completion",
                "created": 1_764_000_000 + i,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": content,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],  # fmt: skip
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {
                        "reasoning_tokens": 0,
                        "audio_tokens": 0,
                        "accepted_prediction_tokens": 0,
                        "rejected_prediction_tokens": 0,
                    },  # fmt: skip
                },
                "service_tier": "default",
                "system_fingerprint": "fp_b376dfbbd5",
            }
        line = {
            "id": f"batch_req_{seed:04x}{i:028x}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
        yield orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def embedding_output_lines(
    custom_ids: list[str], dimensions: int, seed: int = 1, model: str = "text-embedding-3-small"
) -> Iterator[bytes]:
    """Batch API output lines answering embedding requests with `dimensions`-float vectors."""
    rng = np.random.default_rng(seed)
    for i, custom_id in enumerate(custom_ids):
        vector = rng.standard_normal(dimensions).astype(np.float32)
        prompt = int(rng.integers(20, 200))
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
        line = {
            "id": f"batch_req_{seed:04x}{i:028x}",
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{i:032x}", "body": body},
            "error": None,
        }
        yield orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)
