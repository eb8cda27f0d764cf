"""The teacher's tokenizer: text -> token ids + character offsets, raw vocabulary and fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray      # (n,) int64
    offsets: np.ndarray  # (n, 2) int64, [start, end) code-point offsets into the text


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over everything that decides how text becomes ids (vocab, merges, normalizer, added tokens).

    Padding and truncation settings are left out: they do not change the ids of a text.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        payload = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    else:  # slow tokenizer: the vocabulary in id order and the class
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        payload = json.dumps([type(tokenizer).__name__, vocab], ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


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
        tokens = self.hf.convert_ids_to_tokens(list(range(min(self.size, vocab_size))))
        tokens = [t if t is not None else "" for t in tokens]
        return tokens + [""] * (vocab_size - len(tokens))
