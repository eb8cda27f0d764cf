"""What both sides must agree on about a tokenizer: its fingerprint, its raw vocabulary, and how the raw
token strings spell text.

The teacher reports all three (``TeacherInfo.tokenizer_fingerprint``, ``GetVocab``,
``TeacherInfo.vocab_encoding``); the trainer computes the same for its target tokenizer and keys its
vocabulary-map cache by the pair of fingerprints. One definition, so both sides of the wire agree.

Conventions (SentencePiece ``▁``, byte-fallback ``<0x0A>``, GPT-2 byte-level ``Ġ``/``Ċ``) are detected
from the token strings alone, never from a tokenizer class name. This module is pure standard library:
the trainer's FuseLLM core imports the conventions from here (the only import it has of ``protos``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

SPM_MARKER = "\u2581"
BYTE_LEVEL_SPACE = "\u0120"  # "Ġ"
BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPECIAL = re.compile(r"^(<\|[^|<>]+\|>|\[[A-Z]+\d*\]|<unk>|<s>|</s>|<pad>|<mask>|<bos>|<eos>)$")


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


@cache
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode alphabet → byte (the inverse of ``bytes_to_unicode``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


@dataclass(frozen=True)
class Conventions:
    """How a vocabulary writes spaces and bytes, detected by :func:`detect_conventions`."""

    spm_marker: bool  # "▁" stands for a space
    byte_fallback: bool  # "<0xNN>" tokens stand for single bytes
    byte_level: bool  # every char is one of GPT-2's 256 byte characters ("Ġ" = space, "Ċ" = newline)


def is_special(token: str) -> bool:
    """Control tokens such as ``</s>``, ``<|endoftext|>``, ``[PAD50427]``."""
    return bool(_SPECIAL.match(token))


def detect_conventions(tokens: Sequence[str]) -> Conventions:
    """Detects the space marker and byte conventions from the token strings alone."""
    text = [t for t in tokens if t and not is_special(t)]
    if not text:
        return Conventions(False, False, False)
    alphabet = frozenset(byte_level_decoder())
    in_alphabet = sum(alphabet.issuperset(t) for t in text) / len(text)
    byte_level = in_alphabet >= 0.9 and any(BYTE_LEVEL_SPACE in t for t in text)
    spm = not byte_level and sum(t.startswith(SPM_MARKER) for t in text) / len(text) >= 0.02
    byte_fallback = len({t.upper() for t in text if BYTE_TOKEN.match(t)}) == 256
    return Conventions(spm_marker=spm, byte_fallback=byte_fallback, byte_level=byte_level)


def token_bytes(token: str, conv: Conventions) -> bytes:
    """The bytes a token stands for; a special token stands for its own name."""
    if conv.byte_fallback and (m := BYTE_TOKEN.match(token)):
        return bytes([int(m.group(1), 16)])
    if is_special(token):
        return token.encode("utf-8")
    if conv.byte_level:
        alphabet = byte_level_decoder()
        return b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8") for c in token)
    if conv.spm_marker:
        token = token.replace(SPM_MARKER, " ")
    return token.encode("utf-8")
