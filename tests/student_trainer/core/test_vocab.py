"""MinED vocabulary mapping: conventions from the vocab, canonical strings, exact + edit-distance map."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.core.vocab import (
    NO_TOKEN,
    Conventions,
    build_vocab_map,
    canonical_strings,
    counterpart_map,
    detect_conventions,
    token_bytes,
)
from student_trainer.trainer import vocab_cache

SPM = Conventions(spm_marker=True, byte_fallback=True, byte_level=False)
BYTE_LEVEL = Conventions(spm_marker=False, byte_fallback=False, byte_level=True)


@pytest.mark.parametrize(("name", "expected"), [("llama-spm", SPM), ("mistral-spm", SPM),
                                                ("gpt-2", BYTE_LEVEL), ("mpt", BYTE_LEVEL)])
def test_conventions_detected_from_real_vocab(vocabs, name, expected):
    assert detect_conventions(vocabs(name)) == expected


def test_conventions_detected_from_vocab_not_class_name():
    """Plain lists of strings, no tokenizer object anywhere: the strings alone decide."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    spm = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *letters,
           *["\u2581" + a + b for a in letters for b in letters[:5]]]
    assert detect_conventions(spm) == SPM
    byte_level = [*letters, *["Ġ" + a + b for a in letters for b in letters[:5]], "Ċ", "<|endoftext|>"]
    assert detect_conventions(byte_level) == BYTE_LEVEL
    assert detect_conventions([*letters, "hello", "world"]) == Conventions(False, False, False)


def test_canonical_strings_normalise_space_markers_and_bytes():
    assert token_bytes("\u2581hello", SPM) == b" hello"
    assert token_bytes("Ġhello", BYTE_LEVEL) == b" hello"
    assert token_bytes("<0x0A>", SPM) == b"\n"
    assert token_bytes("Ċ", BYTE_LEVEL) == b"\n"
    assert token_bytes("Ã©", BYTE_LEVEL) == "é".encode()
    assert token_bytes("  ", BYTE_LEVEL) == b"  "  # MPT's raw whitespace-run tokens
    assert token_bytes("<|endoftext|>", BYTE_LEVEL) == b"<|endoftext|>"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text("abcdefgh\u2581", min_size=1, max_size=6), min_size=1, max_size=40, unique=True))
def test_identical_vocab_maps_to_itself(tokens):
    assert np.array_equal(build_vocab_map(tokens, tokens, workers=1), np.arange(len(tokens)))


def test_real_vocab_maps_to_itself(vocabs):
    """Every token maps to itself, except byte tokens, which map to the ordinary token of that byte."""
    tokens = vocabs("llama-spm")
    vmap = build_vocab_map(tokens, tokens)
    canon = canonical_strings(tokens)
    moved = np.flatnonzero(vmap != np.arange(len(tokens)))
    assert all(tokens[i].startswith("<0x") and canon[vmap[i]] == canon[i] for i in moved)
    assert vmap[tokens.index("<0x41>")] == tokens.index("A")


def test_exact_match_across_space_conventions(vocabs, vocab_pair):
    src, tgt = vocabs("mistral-spm"), vocabs("gpt-2")
    vmap = vocab_pair("mistral-spm", "gpt-2").vocab_map
    for s, t in [("\u2581the", "Ġthe"), ("<0x0A>", "Ċ"), ("\u2581(", "Ġ("), ("ing", "ing")]:
        assert tgt[vmap[src.index(s)]] == t


def test_min_edit_distance_first_minimum_wins():
    assert build_vocab_map(["abcd"], ["zzzz", "abcx", "abxd"], workers=1).tolist() == [1]
    assert build_vocab_map(["abcd"], ["zzzz", "abxd", "abcx"], workers=1).tolist() == [1]
    assert build_vocab_map(["abcd"], ["ab", "abcdef"], workers=1).tolist() == [0]


def test_padding_and_special_tokens():
    src = ["a", "", "</s>", "[PAD7]", "<unk>"]
    tgt = ["<|endoftext|>", "a", "b"]
    assert build_vocab_map(src, tgt, workers=1).tolist() == [1, NO_TOKEN, 0, NO_TOKEN, NO_TOKEN]
    # an ordinary token never lands on a special one, however close the strings are
    assert build_vocab_map(["<|endoftext"], tgt, workers=1).tolist() != [0]


def test_vocab_map_cache_builds_once_per_fingerprint_pair(tmp_path, monkeypatch):
    calls: list[int] = []

    def counting(source, target):
        calls.append(1)
        return build_vocab_map(source, target, workers=1)

    monkeypatch.setattr(vocab_cache, "build_vocab_map", counting)
    src, tgt = ["a", "bb", "c"], ["a", "b", "cc"]
    first = vocab_cache.cached_vocab_map(src, tgt, "fp-src", "fp-tgt", tmp_path)
    again = vocab_cache.cached_vocab_map(src, tgt, "fp-src", "fp-tgt", tmp_path)
    assert np.array_equal(first, again) and len(calls) == 1
    vocab_cache.cached_vocab_map(src, tgt, "fp-src-2", "fp-tgt", tmp_path)
    assert len(calls) == 2
    assert f"-v{vocab_cache.ALGORITHM_VERSION}-" in vocab_cache.cache_key("x", "y")
    vocab_cache.cached_vocab_map([*src, "d"], tgt, "fp-src", "fp-tgt", tmp_path)  # stale shape
    assert len(calls) == 3


@pytest.mark.parametrize(("source", "target"), [("gpt-2", "llama-spm"), ("mistral-spm", "gpt-2"), ("mpt", "llama-spm")])
def test_counterparts_are_exact_or_absent_and_invert_the_exact_part_of_the_mined_map(vocabs, source, target):
    """Target → source, exact only (on-policy gather): a counterpart has the same canonical string (or the
    same special role); a target token without one gets NO_TOKEN, never the nearest source token."""
    src, tgt = vocabs(source), vocabs(target)
    cmap = counterpart_map(src, tgt)
    src_canon, tgt_canon = canonical_strings(src), canonical_strings(tgt)
    has = np.flatnonzero(cmap != NO_TOKEN)
    assert all(src_canon[cmap[t]] == tgt_canon[t] for t in has if not tgt[t].startswith("<"))
    exact_strings = set(src_canon)
    none = np.flatnonzero(cmap == NO_TOKEN)
    assert all(tgt_canon[t] not in exact_strings for t in none if tgt[t] and not tgt[t].startswith("<|"))
    assert 0.2 < len(has) / len(tgt) < 1.0  # real pairs share a good part of their vocabularies, not all of it
    forward = build_vocab_map(src, tgt)
    back = [t for t in has if forward[cmap[t]] == t]
    assert len(back) / len(has) > 0.95  # where an exact string exists, MinED maps it back (ties aside)


def test_counterparts_prefer_the_token_the_source_emits():
    """Two source tokens spell four spaces (an added literal and its byte-level twin): the one the tokenizer
    emits for that text receives the candidate, as in the MinED map's other direction."""
    source = ["a", "Ġ", "ĠĠĠĠ", "    ", "<|endoftext|>", "Ġb"]
    target = ["<unk>", "<s>", "</s>", "▁▁▁▁", "▁b", "zz", "▁▁▁"]
    cmap = counterpart_map(source, target)
    assert source[cmap[3]] == "    "  # the added literal, not its byte-level twin "ĠĠĠĠ"
    assert source[cmap[4]] == "Ġb" and cmap[5] == NO_TOKEN and cmap[6] == NO_TOKEN  # no source token is 3 spaces
    assert cmap[2] == 4  # </s> and <|endoftext|> share the eos role
