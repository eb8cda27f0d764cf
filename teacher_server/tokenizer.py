"""The teacher's tokenizer: text -> token ids + character offsets, raw vocabulary and fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

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
