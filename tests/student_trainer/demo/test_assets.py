"""The offline tokenizers reproduce llama.cpp's reference tokenisations (``ggml-vocab-*.gguf.inp/.out``)."""

from __future__ import annotations

import json

import pytest

from student_trainer.demo.assets import gguf_vocab_dir

SEPARATOR = "\n__ggml_vocab_test__\n"


def reference_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs; the ``.inp`` file ends with a separator, so its last piece is dropped."""
    folder = gguf_vocab_dir()
    texts = (folder / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    assert texts[-1] == ""
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    expected = [[int(x) for x in line.split()] for line in lines[:len(texts) - 1]]
    return list(zip(texts[:-1], expected, strict=True))


def _mismatches(tok, cases: list[tuple[str, list[int]]]) -> list[str]:
    bad = []
    for text, ids in cases:
        got = tok(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            bad.append(f"{text!r}: got {got}, expected {ids}")
    return bad


@pytest.mark.parametrize("name", ["gpt-2", "mpt"])
def test_tokenizer_matches_llama_cpp_reference(tokenizers, name):
    cases = reference_cases(name)
    assert len(cases) > 20
    assert _mismatches(tokenizers(name), cases) == []


def test_gpt_neox_matches_reference_through_mpt(tokenizers):
    """llama.cpp ships no reference file for gpt-neox; MPT uses the GPT-NeoX tokenizer, so its
    reference applies once the two tokenizers are shown to be the same model."""
    if (gguf_vocab_dir() / "ggml-vocab-gpt-neox.gguf.inp").exists():
        cases = reference_cases("gpt-neox")
    else:
        neox, mpt = tokenizers("gpt-neox"), tokenizers("mpt")
        assert json.loads(neox.backend_tokenizer.to_str()) == json.loads(mpt.backend_tokenizer.to_str())
        cases = reference_cases("mpt")
    assert _mismatches(tokenizers("gpt-neox"), cases) == []
