"""Shared fixtures: real tokenizers, real text (the standard library's code and prose), vocab pairs."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from student_trainer.core.alignment import TeacherOutput, Tokens, VocabPair, make_vocab_pair
from student_trainer.trainer.vocab_cache import cached_vocab_map

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# (source, target) pairs of the issue: Llama-2 SPM as the target with MPT and GPT-2 as sources, and
# Mistral's SentencePiece as a source for a GPT-2 target.
REAL_PAIRS = [("mpt", "llama-spm"), ("gpt-2", "llama-spm"), ("mistral-spm", "gpt-2")]


def code_text(chars: int = 12_000) -> str:
    """Python source: indentation runs, newlines, punctuation."""
    return (STDLIB / "argparse.py").read_text(encoding="utf-8")[4_000:4_000 + chars]


def prose_text(chars: int = 12_000) -> str:
    """English prose: the docstrings of a few standard-library modules, joined by blank lines."""
    docs: list[str] = []
    for name in ("textwrap.py", "difflib.py", "heapq.py", "fractions.py"):
        tree = ast.parse((STDLIB / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and ast.get_docstring(node):
                docs.append(ast.get_docstring(node) or "")
    return "\n\n".join(docs)[:chars]


def tokens_of(tok, text: str, limit: int | None = None) -> Tokens:
    """Tokenises ``text`` without special tokens: ids and char offsets, first ``limit`` tokens."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64)[:limit]
    return Tokens(ids, np.asarray(enc["offset_mapping"], np.int64)[:limit])


def common_span(a: Tokens, b: Tokens) -> tuple[Tokens, Tokens]:
    """Both tokenisations cut to the tokens ending within the shorter one's text span."""
    end = min(int(a.offsets[-1, 1]), int(b.offsets[-1, 1]))
    keep_a, keep_b = a.offsets[:, 1] <= end, b.offsets[:, 1] <= end
    return Tokens(a.ids[keep_a], a.offsets[keep_a]), Tokens(b.ids[keep_b], b.offsets[keep_b])


def fake_teacher(tokens: Tokens, vocab_size: int, k: int = 8, seed: int = 0) -> TeacherOutput:
    """A teacher output with random top-k (descending, valid log-probs) over ``vocab_size`` ids."""
    rng = np.random.default_rng(seed)
    n = len(tokens.ids)
    ids = np.stack([rng.choice(vocab_size, k, replace=False) for _ in range(n)])
    probs = rng.dirichlet(np.ones(4 * k), n)[:, :k]
    lp = np.sort(np.log(probs), axis=1)[:, ::-1].astype(np.float32)
    return TeacherOutput(tokens, ids, lp, lp[1:, 0].copy())


@pytest.fixture(scope="session")
def tokenizers():
    from student_trainer.demo.assets import named_tokenizer

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = named_tokenizer(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def vocabs(tokenizers):
    cache: dict[str, list[str]] = {}

    def get(name: str) -> list[str]:
        if name not in cache:
            tok = tokenizers(name)
            cache[name] = tok.convert_ids_to_tokens(list(range(len(tok))))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def vocab_pair(vocabs, tmp_path_factory):
    """(source, target) → VocabPair, maps built once per session through the on-disk cache."""
    folder = tmp_path_factory.mktemp("vocab-maps")
    cache: dict[tuple[str, str], VocabPair] = {}

    def get(source: str, target: str) -> VocabPair:
        if (source, target) not in cache:
            vmap = cached_vocab_map(vocabs(source), vocabs(target), source, target, folder)
            cache[source, target] = make_vocab_pair(vocabs(source), vocabs(target), vmap)
        return cache[source, target]

    return get


# Trainer tests: the target (tiny Llama with the Mistral tokenizer) and two live teachers, per module.
@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    from student_trainer.demo.assets import build_tiny_model

    from .trainer.helpers import TARGET

    return build_tiny_model(*TARGET, tmp_path_factory.mktemp("target") / "llama-mistral", seed=7)


@pytest.fixture(scope="module")
def teachers(tiny_model_dirs):
    from .trainer.helpers import Teacher

    running = {name: Teacher(tiny_model_dirs[name]) for name in ("gpt2", "mpt")}
    yield running
    for t in running.values():
        t.stop()
