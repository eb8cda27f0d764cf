"""Token strings → the bytes they stand for, and the MinED vocabulary map between two tokenizers.

Pure maths: vocabularies come in as ``list[str]`` (index = token id, raw strings as the tokenizer
stores them; ``""`` for ids past the tokenizer's size, as padded output layers have), maps go out as
numpy arrays. Conventions (SentencePiece ``▁``, byte-fallback ``<0x0A>``, GPT-2 byte-level
``Ġ``/``Ċ``) are detected from the vocabulary itself, never from a tokenizer class name
(``protos.vocabulary``, shared with the teacher, which reports them in ``TeacherInfo``).

A token's *canonical string* is the bytes it stands for, decoded as latin-1 (one char per byte), so
``"▁hello"``, ``"Ġhello"`` and ``" hello"`` all become ``" hello"`` and ``"<0x0A>"``/``"Ċ"`` become
``"\\n"``. Edit distances are then counted in bytes, the same way for every tokenizer family.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

# The token-string conventions are part of the wire contract (TeacherInfo.vocab_encoding): one definition,
# in protos.vocabulary (pure standard library; the core's only import of protos, see pyproject.toml).
from protos.vocabulary import (
    BYTE_TOKEN,
    Conventions,
    byte_level_decoder,
    detect_conventions,
    is_special,
    token_bytes,
)

# Special tokens map across tokenizers by role (never by edit distance to ordinary text tokens).
SPECIAL_ROLES: dict[str, str] = {
    "</s>": "eos", "<eos>": "eos", "<|endoftext|>": "eos", "<|end_of_text|>": "eos", "<|im_end|>": "eos",
    "<|eot_id|>": "eos", "<s>": "bos", "<bos>": "bos", "<|begin_of_text|>": "bos",
    "<|startoftext|>": "bos", "<unk>": "unk", "<pad>": "pad", "<|padding|>": "pad",
}
NO_TOKEN = -1  # map value of a source id with no target counterpart (padding ids, role-less specials)
_MINED_CHUNK = 1024


def canonical_strings(tokens: Sequence[str], conv: Conventions | None = None) -> list[str]:
    """Canonical string (bytes as latin-1) of each token; conventions detected if not given."""
    conv = detect_conventions(tokens) if conv is None else conv
    return [token_bytes(t, conv).decode("latin-1") for t in tokens]


def is_literal(token: str, conv: Conventions) -> bool:
    """A byte-level vocabulary's token written with characters outside the byte alphabet (e.g. MPT's and
    GPT-NeoX's whitespace runs ``"    "``): an added token, matched on the raw text before the byte-level
    BPE runs, so the tokenizer emits it wherever its byte-level twin (``"ĠĠĠĠ"``) would also fit."""
    alphabet = byte_level_decoder()
    return conv.byte_level and any(c not in alphabet for c in token)


def _emit_rank(token: str, conv: Conventions) -> int:
    """Which of several tokens with one canonical string the tokenizer produces for that text: the lowest
    rank — added literal tokens (matched first), then ordinary tokens, then byte-fallback tokens (used
    only where no ordinary token fits)."""
    if is_literal(token, conv):
        return 0
    return 2 if conv.byte_fallback and BYTE_TOKEN.match(token) else 1


def _preferred_ids(tokens: Sequence[str], canon: Sequence[str], conv: Conventions) -> dict[str, int]:
    """Canonical string → the target id that receives its mass: the one the tokenizer emits for that text
    (:func:`_emit_rank`; the lowest id among equals)."""
    best: dict[str, tuple[int, int]] = {}
    for i, (tok, c) in enumerate(zip(tokens, canon, strict=True)):
        if tok and not is_special(tok):
            key = (_emit_rank(tok, conv), i)
            if c not in best or key < best[c]:
                best[c] = key
    return {c: i for c, (_, i) in best.items()}


def _special_targets(tokens: Sequence[str]) -> dict[str, int]:
    """Role → first target id holding a special token of that role."""
    roles: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in SPECIAL_ROLES:
            roles.setdefault(SPECIAL_ROLES[tok], i)
    return roles


def min_edit_distance_ids(queries: Sequence[str], choices: Sequence[str], workers: int = -1) -> np.ndarray:
    """Index of the choice at minimum Levenshtein distance for each query (first minimum wins).

    Returns ``(len(queries),) int64``; compiled (rapidfuzz ``cdist``), in row chunks to bound memory.
    """
    out = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), _MINED_CHUNK):
        d = process.cdist(queries[s:s + _MINED_CHUNK], choices, scorer=Levenshtein.distance,
                          dtype=np.int32, workers=workers)
        out[s:s + _MINED_CHUNK] = d.argmin(axis=1)
    return out


def build_vocab_map(source: Sequence[str], target: Sequence[str], workers: int = -1) -> np.ndarray:
    """MinED map of every source id to a target id: ``(len(source),) int64``, ``NO_TOKEN`` = none.

    Identical canonical string → that target token; otherwise the target token at minimum edit
    distance (first minimum in target-id order). Special tokens map by role (eos → eos, ...) or to
    nothing; empty strings (padded output rows) map to nothing, so their mass is dropped.
    """
    tgt_conv = detect_conventions(target)
    src_canon, tgt_canon = canonical_strings(source), canonical_strings(target, tgt_conv)
    exact, roles = _preferred_ids(target, tgt_canon, tgt_conv), _special_targets(target)
    out = np.full(len(source), NO_TOKEN, dtype=np.int64)
    pending: list[int] = []
    for i, (tok, c) in enumerate(zip(source, src_canon, strict=True)):
        if not tok:
            continue
        if is_special(tok):
            out[i] = roles.get(SPECIAL_ROLES.get(tok, ""), NO_TOKEN)
        elif c in exact:
            out[i] = exact[c]
        else:
            pending.append(i)
    if pending and exact:
        choices = sorted(exact, key=exact.__getitem__)  # target-id order, so the first minimum wins
        picked = min_edit_distance_ids([src_canon[i] for i in pending], choices, workers)
        out[pending] = np.array([exact[choices[k]] for k in picked], dtype=np.int64)
    return out


def counterpart_map(source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """The other direction, exact only: each *target* id's source id with the same canonical string (the one
    the source tokenizer emits for that text), special tokens by role; ``NO_TOKEN`` where the source has no
    such token — never the nearest one. ``(len(target),) int64``.

    On-policy fusion asks each teacher for its log-probs at the student's candidate tokens; a candidate
    without an exact counterpart in a teacher's vocabulary is left out (and counted), not guessed.
    """
    src_conv, tgt_conv = detect_conventions(source), detect_conventions(target)
    src_canon, tgt_canon = canonical_strings(source, src_conv), canonical_strings(target, tgt_conv)
    emitted, roles = _preferred_ids(source, src_canon, src_conv), _special_targets(source)
    out = np.full(len(target), NO_TOKEN, dtype=np.int64)
    for i, (tok, c) in enumerate(zip(target, tgt_canon, strict=True)):
        if not tok:
            continue
        if is_special(tok):
            out[i] = roles.get(SPECIAL_ROLES.get(tok, ""), NO_TOKEN)
        else:
            out[i] = emitted.get(c, NO_TOKEN)
    return out
