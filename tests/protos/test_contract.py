"""What teacher.proto tells clients in other languages holds for the real encoder and real tokenizers:
the worst-case response size, TeacherInfo's vocabulary encoding as the server detects it, and the
overlapping spans of byte-fragment tokens. (The Node client in test_node_client.py checks the rest end to end.)
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from protos import teacher_pb2 as pb
from protos.codec import decode
from protos.scores import GATHER_PADDING, TeacherScores, encode_gather, encode_scores
from protos.vocabulary import detect_conventions, token_bytes
from teacher_server.limits import response_bytes
from teacher_server.server import build_info
from teacher_server.tokenizer import TeacherTokenizer
from tests.teacher_server.conftest import make_config

FINGERPRINT = "sha256:" + "0" * 64


def worst_case_scores(n: int, k: int, vocab_size: int, num_chars: int) -> TeacherScores:
    rng = np.random.default_rng(n * 1000 + k)
    return TeacherScores(input_ids=rng.integers(0, vocab_size, n), offsets=np.full((n, 2), num_chars),
                         topk_ids=rng.integers(0, vocab_size, (n, k)),
                         topk_logprobs=-rng.random((n, k), dtype=np.float32),
                         next_logprobs=-rng.random(max(n - 1, 0), dtype=np.float32), truncated=True)


@pytest.mark.parametrize(("lengths", "k", "gathered"), [
    ([1], 1, None), ([17, 300, 2], 64, None), ([4096] * 3, 64, None), ([70_000], 2, None),
    ([1], 1, (1, 1)), ([17, 300, 2], 64, (300, 64)), ([70_000], 2, (70_000, 3))])
def test_response_size_stays_within_the_bound_teacher_proto_gives(lengths, k, gathered):
    """<= 8k + 16 bytes per token at FLOAT32 with uint32 ids and offsets (vocabulary and text past 65,535),
    + 4 bytes per gathered id, + <= 160 bytes per text (a gathered array's framing included) + the two
    strings: what a client sizes its receive limit by."""
    vocab_size, num_chars, request_id = 1 << 20, 1 << 17, "r" * 40
    m, c = gathered or (0, 0)
    block = -np.random.default_rng(m).random((m, c), dtype=np.float32) if gathered else None
    results = [encode_scores(replace(worst_case_scores(n, k, vocab_size, num_chars), gathered_logprobs=block),
                             vocab_size, num_chars, pb.LOGPROB_FORMAT_FLOAT32) for n in lengths]
    response = pb.ScoreResponse(request_id=request_id, results=results, tokenizer_fingerprint=FINGERPRINT)
    assert all(r.input_ids.dtype == pb.D_TYPE_UINT32 and r.offsets.dtype == pb.D_TYPE_UINT32 for r in results)
    gathered_bytes = 4 * m * c * len(lengths)
    bound = sum(lengths) * (8 * k + 16) + gathered_bytes + 160 * len(lengths) + len(request_id) + len(FINGERPRINT) + 6
    assert response.ByteSize() <= bound
    assert response.ByteSize() >= sum(lengths) * (8 * k + 16) + gathered_bytes - 4  # tight (n-1 next)
    limit = response_bytes([(n, num_chars) for n in lengths], k, vocab_size, 4, m * c * len(lengths))
    assert response.ByteSize() <= limit  # the bound the server checks before the forward


def test_gather_spec_travels_as_uint32_with_padding_and_refuses_what_does_not_fit():
    spec = encode_gather([0, 3, 70_000], [[1, -1], [GATHER_PADDING, 5], [2, 3]])
    assert spec.ends.dtype == spec.ids.dtype == pb.D_TYPE_UINT32
    assert decode(spec.ids).tolist() == [[1, GATHER_PADDING], [GATHER_PADDING, 5], [2, 3]]
    assert list(encode_gather([], []).ids.shape) == [0, 0]
    for ends, ids in (([1, 2], [[1]]), ([1], [1]), ([-1], [[1]]), ([1], [[1 << 32]])):
        with pytest.raises(ValueError, match="gather"):
            encode_gather(ends, ids)


@pytest.mark.parametrize(("name", "encoding", "fallback"), [
    ("llama", pb.VOCAB_ENCODING_SENTENCEPIECE, True), ("gpt-neox", pb.VOCAB_ENCODING_SENTENCEPIECE, True),
    ("gpt2", pb.VOCAB_ENCODING_BYTE_LEVEL, False), ("mpt", pb.VOCAB_ENCODING_BYTE_LEVEL, False)])
def test_teacher_info_names_the_vocabulary_encoding(tiny_model_dirs, name, encoding, fallback):
    """build_info detects the conventions from the served vocabulary; decoding the raw token strings of a
    text by them gives the text's bytes back. Where the emoji is split into byte tokens, every fragment
    spans the whole character, so spans overlap (as teacher.proto warns)."""
    tokenizer = TeacherTokenizer(AutoTokenizer.from_pretrained(tiny_model_dirs[name]))
    backend = SimpleNamespace(name="hf", architecture="x", vocab_size=tokenizer.size, dtype="float32",
                              device="cpu", max_positions=None)
    info = build_info(make_config(tiny_model_dirs[name], default_top_k=7), backend, tokenizer)
    assert (info.vocab_encoding, info.vocab_byte_fallback, info.default_top_k) == (encoding, fallback, 7)
    text = "Ünï 😀 é\tx  y\n"
    vocab = tokenizer.vocab(info.vocab_size)
    conv = detect_conventions(vocab)
    encoded = tokenizer.encode([text])[0]
    decoded = b"".join(token_bytes(vocab[i], conv) for i in encoded.ids).decode()
    assert decoded in (text, " " + text)  # SentencePiece's leading space
    covering = [(s, e) for s, e in encoded.offsets.tolist() if s <= 4 < e]  # code point 4 is the emoji
    assert all(text[s:e].strip() == "😀" for s, e in covering)
    if name in ("llama", "gpt2"):  # llama-spm: 4 byte-fallback tokens; GPT-2: two byte-level pieces
        assert len(covering) >= 2
