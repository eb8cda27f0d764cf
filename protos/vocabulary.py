"""What both sides must agree on about a tokenizer: its fingerprint and its raw vocabulary.

The teacher reports both (``TeacherInfo.tokenizer_fingerprint``, ``GetVocab``); the trainer computes the
same two for its target tokenizer and keys its vocabulary-map cache by the pair of fingerprints. One
definition, so a fingerprint computed on either side of the wire names the same tokenizer.
"""

from __future__ import annotations

import hashlib
import json


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


def raw_vocab(tokenizer, vocab_size: int) -> list[str]:
    """Raw token strings (as the tokenizer stores them) for ids 0..vocab_size-1.

    ``""`` for output rows the tokenizer has no token for (padded output layers).
    """
    size = min(len(tokenizer), vocab_size)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    tokens = [t if t is not None else "" for t in tokens]
    return tokens + [""] * (vocab_size - len(tokens))
