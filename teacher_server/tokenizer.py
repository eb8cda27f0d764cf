"""The teacher's tokenizer: text -> token ids + character offsets, raw vocabulary and fingerprint; and the
thread lanes that tokenize requests without letting one client's huge texts stall everyone else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protos.vocabulary import raw_vocab, tokenizer_fingerprint


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray      # (n,) int64
    offsets: np.ndarray  # (n, 2) int64, [start, end) code-point offsets into the text


class TeacherTokenizer:
    """Wraps a transformers tokenizer; encodes without special tokens (BOS is the backend's business)."""

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; "
                "character offsets need one (save it with a tokenizer.json)"
            )
        self.hf = tokenizer
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.size = len(tokenizer)
        self.bos_id: int | None = tokenizer.bos_token_id
        self.special_ids: list[int] = sorted(set(tokenizer.all_special_ids))

    def encode(self, texts: list[str]) -> list[Encoded]:
        batch = self.hf(texts, add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False)
        return [
            Encoded(np.asarray(ids, dtype=np.int64), np.asarray(offs, dtype=np.int64).reshape(-1, 2))
            for ids, offs in zip(batch["input_ids"], batch["offset_mapping"], strict=True)
        ]

    def vocab(self, vocab_size: int) -> list[str]:
        """Raw token strings for ids 0..vocab_size-1 ("" for output rows the tokenizer has no token for)."""
        return raw_vocab(self.hf, vocab_size)


CHUNK_CHARS = 16_384
"""Texts are tokenized in chunks of at most this many characters (a longer text is a chunk of its own)."""


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> list[Encoded]: ...


def chunks(texts: Sequence[str], max_chars: int = CHUNK_CHARS) -> list[tuple[int, int]]:
    """``[start, end)`` index ranges of consecutive texts of at most ``max_chars`` characters together."""
    out: list[tuple[int, int]] = []
    start, chars = 0, 0
    for i, text in enumerate(texts):
        if i > start and chars + len(text) > max_chars:
            out.append((start, i))
            start, chars = i, 0
        chars += len(text)
    if start < len(texts):
        out.append((start, len(texts)))
    return out


class TokenizerLanes:
    """Two lanes of ``threads`` threads each: chunks up to CHUNK_CHARS on the short lane, single longer texts
    on the long lane. A request submits its chunks one after another, so requests take turns on a lane and a
    huge request neither holds every thread nor queues ahead of other clients' small ones."""

    def __init__(self, tokenizer: Encoder, threads: int) -> None:
        self.tokenizer = tokenizer
        self._short = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        self._long = ThreadPoolExecutor(threads, thread_name_prefix="tokenize-long")

    async def encode(self, texts: Sequence[str]) -> AsyncIterator[tuple[int, list[Encoded]]]:
        """Yields ``(index of the chunk's first text, its encodings)`` chunk by chunk, in order."""
        loop = asyncio.get_running_loop()
        for start, end in chunks(texts):
            part = list(texts[start:end])
            lane = self._short if sum(map(len, part)) <= CHUNK_CHARS else self._long
            yield start, await loop.run_in_executor(lane, self.tokenizer.encode, part)

    def close(self) -> None:
        self._short.shutdown(wait=False, cancel_futures=True)
        self._long.shutdown(wait=False, cancel_futures=True)
