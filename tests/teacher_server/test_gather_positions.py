"""Where gather looks: character ends -> token positions (``teacher_server.gather.token_positions``).

The rule (teacher.proto, GatherSpec): for an end e, the last token whose span ends at e; it has read exactly
text[:e]. Checked against the rule spelled out as a loop (property-based), and on real tokenizers of four
families: at every end where they all have a token boundary, each one's position has read the same text —
by offsets (no token up to it reaches past e, none after it starts before e) and by the bytes of its tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from protos.vocabulary import detect_conventions, raw_vocab, token_bytes
from teacher_server.gather import token_positions

TEXTS = [
    "Ünï 😀 é\tx  y\n quick brown fox, déjà vu 🤖!",
    "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n",
    "中文字符 and ｆｕｌｌｗｉｄｔｈ, 🇫🇷 flags, e\u0301 combining",
]


def rule(token_ends: list[int], end: int, kept: int) -> int:
    found = [j for j, stop in enumerate(token_ends) if stop == end]
    return found[-1] if found and found[-1] < kept else -1


@given(st.lists(st.integers(0, 12), min_size=1, max_size=30), st.integers(0, 30), st.data())
def test_positions_follow_the_rule_for_any_token_ends(token_ends, kept, data):
    """Any order of token ends (offsets need not be monotonic for every tokenizer), shared ends, truncation."""
    ends = sorted(data.draw(st.sets(st.integers(0, 14), max_size=15)))
    got = token_positions(np.array(token_ends), np.array(ends, dtype=np.int64), kept)
    assert got.tolist() == [rule(token_ends, e, kept) for e in ends]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dirs):
    return {name: AutoTokenizer.from_pretrained(path) for name, path in tiny_model_dirs.items()}


def read_text(tokenizer, ids: list[int]) -> str:
    """The text the tokens spell (bytes of the raw token strings, as a client decodes GetVocab's)."""
    vocab = raw_vocab(tokenizer, len(tokenizer))
    conv = detect_conventions(vocab)
    return b"".join(token_bytes(vocab[i], conv) for i in ids).decode("utf-8", errors="strict")


@pytest.mark.parametrize("text", TEXTS)
def test_ends_where_every_tokenizer_has_a_boundary_pick_positions_that_read_the_same_text(tokenizers, text):
    ends = np.arange(len(text) + 1)
    seen = {}
    for name, tokenizer in tokenizers.items():
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], np.array(enc["offset_mapping"]).reshape(-1, 2)
        seen[name] = (ids, offsets, token_positions(offsets[:, 1], ends, len(ids)))
    common = [e for e in ends if all(pos[e] >= 0 for _, _, pos in seen.values())]
    assert len(common) > len(text) // 4, common  # word boundaries at least
    assert any(any(pos[e] < 0 for _, _, pos in seen.values()) for e in ends)  # and ends only some have
    for e in common:
        for name, (ids, offsets, pos) in seen.items():
            p = pos[e]
            assert offsets[: p + 1, 1].max() == e and offsets[p + 1:, 0].min(initial=e) >= e, (name, e)
            spelled = read_text(tokenizers[name], ids[: p + 1])
            assert spelled in (text[:e], " " + text[:e]), (name, e, spelled)  # SentencePiece's prefix space
